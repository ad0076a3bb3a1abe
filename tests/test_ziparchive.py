"""The zip structure check: archives Python's zipfile and torch's miniz could read differently are refused."""

from __future__ import annotations

import hashlib
import io
import json
import sqlite3
import struct
import zipfile
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

import pytest
import torch
from torch import nn

from registry import FormatError, Registry
from registry.pickles import detect
from registry.ziparchive import check_archive, open_zip
from tests.helpers import blob_path, run_python, tutorial_model

fast = pytest.mark.fast

#: Runs posix.system("touch MARKER") when unpickled (protocol 0: torch.load hands it to pickle as is).
EVIL_PICKLE = b"cposix\nsystem\n(S'touch MARKER'\ntR."
U32 = 0xFFFFFFFF


# -- building archives by hand ----------------------------------------------------------------------

@dataclass
class Member:
    """One member; the optional fields make its local header or directory entry lie."""

    name: bytes
    data: bytes
    method: int = 0
    flags: int = 0
    local_name: bytes | None = None
    local_method: int | None = None
    local_usize: int | None = None
    declared_usize: int | None = None  # in the central directory
    central_extra: bytes = b""
    offset: int | None = None  # recorded in the central directory instead of the real one
    payload: bytes = field(init=False, default=b"")


def build(members: list[Member], *, prefix: bytes = b"", gap: bytes = b"", comment: bytes = b"",
          trailing: bytes = b"", count: int | None = None, cd_shift: int = 0, zip64: str | None = None) -> bytes:
    """A stored/deflated archive without data descriptors; ``zip64`` adds zip64 end records ("ok" or a flaw)."""
    out = bytearray(prefix)
    offsets = []
    for m in members:
        offsets.append(len(out))
        m.payload = zlib.compress(m.data)[2:-4] if m.method == 8 else m.data
        usize = len(m.data) if m.local_usize is None else m.local_usize
        method = m.method if m.local_method is None else m.local_method
        name = m.name if m.local_name is None else m.local_name
        out += struct.pack("<IHHHHHIIIHH", 0x04034B50, 20, m.flags, method, 0, 0x21, zlib.crc32(m.data),
                           len(m.payload), usize, len(name), 0) + name + m.payload + gap
    cd_offset = len(out)
    for m, off in zip(members, offsets, strict=True):
        usize = len(m.data) if m.declared_usize is None else m.declared_usize
        out += struct.pack("<IHHHHHHIIIHHHHHII", 0x02014B50, 20, 20, m.flags, m.method, 0, 0x21,
                           zlib.crc32(m.data), len(m.payload), usize, len(m.name), len(m.central_extra), 0, 0, 0,
                           0, off if m.offset is None else m.offset) + m.name + m.central_extra
    cd_size = len(out) - cd_offset
    n = len(members) if count is None else count
    if zip64:
        record = len(out)
        out += struct.pack("<IQHHIIQQQQ", 0x06064B50, 45 if zip64 == "record-size" else 44, 45, 45, 0, 0,
                           n, n, cd_size, cd_offset)
        out += struct.pack("<IIQI", 0x07064B50, 0, record + (8 if zip64 == "locator" else 0), 1)
        if zip64 == "disagree":
            n += 1
        elif zip64 == "sentinel":
            n, cd_size, cd_offset = 0xFFFF, U32, U32
    out += struct.pack("<IHHHHIIH", 0x06054B50, 0, 0, n, n, cd_size, cd_offset - cd_shift, len(comment)) + comment
    return bytes(out + trailing)


def plain() -> list[Member]:
    return [Member(b"m/data.pkl", b"\x80\x02}q\x00."), Member(b"m/version", b"3\n")]


def refused(data: bytes, match: str) -> None:
    with pytest.raises(FormatError, match=match) as info:
        check_archive(io.BytesIO(data), "'x.pt'")
    message = str(info.value)
    assert "\n" not in message and message.startswith("'x.pt' ") and "re-save the model with torch.save" in message


# -- torch's own archives pass -------------------------------------------------------------------------

def _torch_archives(tmp: Path) -> dict[str, Path]:
    torch.manual_seed(0)
    small = tutorial_model()
    big = nn.Sequential(nn.Linear(1024, 1024), nn.ReLU(), nn.Linear(1024, 512), nn.Linear(512, 8))  # ~6 MB
    paths: dict[str, Path] = {}

    def save(name: str, fn: Callable[[io.BufferedWriter], None]) -> None:
        paths[name] = tmp / name
        with open(paths[name], "wb") as f:
            fn(f)

    save("state_dict.pt", lambda f: torch.save(small.state_dict(), f))
    save("big_state_dict.pt", lambda f: torch.save(big.state_dict(), f))
    save("many.pt", lambda f: torch.save({f"t{i}": torch.randn(i + 1) for i in range(200)}, f))
    save("full.pt", lambda f: torch.save(small, f))
    save("script.pt", lambda f: torch.jit.save(torch.jit.script(small), f))
    save("big_script.pt", lambda f: torch.jit.save(torch.jit.script(big), f))
    save("program.pt2", lambda f: torch.export.save(torch.export.export(small, (torch.randn(2, 128),)), f))
    save("big_program.pt2", lambda f: torch.export.save(torch.export.export(big, (torch.randn(2, 1024),)), f))
    return paths


@pytest.fixture(scope="module")
def torch_archives(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return _torch_archives(tmp_path_factory.mktemp("torch-archives"))


@fast
@pytest.mark.parametrize("name", ["state_dict.pt", "big_state_dict.pt", "many.pt", "full.pt", "script.pt",
                                  "big_script.pt", "program.pt2", "big_program.pt2"])
def test_archives_torch_writes_pass_unchanged(torch_archives: dict[str, Path], name: str) -> None:
    path = torch_archives[name]
    before = path.read_bytes()
    with open(path, "rb") as f:
        names = check_archive(f, name)
    with zipfile.ZipFile(path) as zf:
        assert names == zf.namelist() and len(names) >= 6
    with open(path, "rb") as f, open_zip(f, name) as zf:
        assert zf.namelist() == names
    assert path.read_bytes() == before
    if "big" in name:
        assert len(before) > 4_000_000
    detect(path)  # and the whole scan still accepts it


@fast
@pytest.mark.parametrize("compression", [zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED])
def test_archives_pythons_zipfile_writes_pass(compression: int) -> None:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression) as zf:
        zf.writestr("m/data.pkl", b"\x80\x02}q\x00." * 1000)
        zf.writestr("m/modèle", b"x")
    assert check_archive(buf, "x") == ["m/data.pkl", "m/modèle"]


@fast
def test_a_hand_built_archive_passes_with_and_without_zip64_records() -> None:
    assert check_archive(io.BytesIO(build(plain())), "x") == ["m/data.pkl", "m/version"]
    assert check_archive(io.BytesIO(build(plain(), zip64="ok")), "x") == ["m/data.pkl", "m/version"]


# -- the EOCD central-directory-offset differential ---------------------------------------------------

def _split(data: bytes) -> tuple[bytes, bytes, int]:
    """Members region, central directory and entry count of a small archive."""
    _, _, _, count, _, cd_size, cd_offset, _ = struct.unpack("<IHHHHIIH", data[-22:])
    return data[:cd_offset], data[cd_offset : cd_offset + cd_size], count


def _shift_offsets(cd: bytes, delta: int) -> bytes:
    out, pos = bytearray(cd), 0
    while pos < len(out):
        nlen, elen, clen = struct.unpack_from("<HHH", out, pos + 28)
        struct.pack_into("<I", out, pos + 42, struct.unpack_from("<I", out, pos + 42)[0] + delta)
        pos += 46 + nlen + elen + clen
    return bytes(out)


def differential(benign: bytes, hostile: bytes) -> bytes:
    """One file: zipfile reads ``benign`` (it assumes prepended data), miniz reads ``hostile``.

    Layout: hostile members, padding, hostile directory (at the offset the end record gives), benign members,
    benign directory (where zipfile looks: right before the end record), end record.
    """
    mem_h, cd_h, count = _split(hostile)
    mem_b, cd_b, _ = _split(benign)
    assert len(cd_h) == len(cd_b), "same names, same directory size: miniz parses the whole of it"
    pad = b"\0" * max(0, len(mem_b) - len(mem_h))
    cd_offset = len(mem_h) + len(pad)
    benign_start = cd_offset + len(cd_h)
    concat = benign_start + len(mem_b) - cd_offset  # what zipfile adds to every offset it reads
    eocd = struct.pack("<IHHHHIIH", 0x06054B50, 0, 0, count, count, len(cd_b), cd_offset, 0)
    return mem_h + pad + cd_h + mem_b + _shift_offsets(cd_b, benign_start - concat) + eocd


def _rewrite(src: bytes, edit: dict[str, bytes]) -> bytes:
    """The same members in the same order, written by zipfile, with some contents replaced (by suffix)."""
    buf = io.BytesIO()
    with zipfile.ZipFile(io.BytesIO(src)) as zin, zipfile.ZipFile(buf, "w") as zout:
        for name in zin.namelist():
            data = next((v for k, v in edit.items() if name.endswith(k)), None)
            zout.writestr(name, zin.read(name) if data is None else data)
    return buf.getvalue()


def _hostile_pt2(benign: bytes) -> bytes:
    """``benign`` with weight_0 a pickle that runs ``touch MARKER`` and the config saying to unpickle it."""
    with zipfile.ZipFile(io.BytesIO(benign)) as zf:
        name = next(n for n in zf.namelist() if n.endswith("_weights_config.json"))
        config = json.loads(zf.read(name))
    entry = next(e for e in config["config"].values() if e["path_name"] == "weight_0")
    entry["use_pickle"] = True
    return _rewrite(benign, {name.split("/", 1)[1]: json.dumps(config).encode(), "/weight_0": EVIL_PICKLE})


@fast
@pytest.mark.parametrize(("name", "member"), [("state_dict.pt", "data.pkl"), ("full.pt", "data.pkl"),
                                               ("script.pt", "constants.pkl"), ("program.pt2", "weight_0")])
def test_a_central_directory_offset_zipfile_reads_as_prepended_data_is_refused(
        torch_archives: dict[str, Path], tmp_path: Path, name: str, member: str) -> None:
    benign = torch_archives[name].read_bytes()
    hostile = _hostile_pt2(benign) if name.endswith(".pt2") else _rewrite(benign, {member: EVIL_PICKLE})
    path = tmp_path / name
    path.write_bytes(differential(benign, hostile))
    # The differential is real: zipfile shows the benign member, miniz (torch's reader) the hostile one.
    with zipfile.ZipFile(path) as zf:
        python_sees = zf.read(next(n for n in zf.namelist() if n.endswith(member)))
    record = next(r for r in torch._C.PyTorchFileReader(str(path)).get_all_records() if r.endswith(member))
    assert python_sees != EVIL_PICKLE
    assert torch._C.PyTorchFileReader(str(path)).get_record(record) == EVIL_PICKLE
    with pytest.raises(FormatError, match=f"'{name}' is a damaged zip archive .*central directory .* does not end "
                                          "where the end records start"):
        detect(path)


@fast
def test_a_nested_archive_inside_a_pt2_is_checked_too(torch_archives: dict[str, Path], tmp_path: Path) -> None:
    with zipfile.ZipFile(torch_archives["program.pt2"]) as zf:
        inputs = zf.read(next(n for n in zf.namelist() if n.endswith("sample_inputs/model.pt")))
    nested = differential(inputs, _rewrite(inputs, {"data.pkl": EVIL_PICKLE}))
    path = tmp_path / "nested.pt2"
    path.write_bytes(_rewrite(torch_archives["program.pt2"].read_bytes(), {"sample_inputs/model.pt": nested}))
    with pytest.raises(FormatError, match="'nested.pt2' member .*sample_inputs/model.pt is a damaged zip archive"):
        detect(path)


# -- other ambiguities ------------------------------------------------------------------------------------

@fast
@pytest.mark.parametrize(("kwargs", "match"), [
    ({"prefix": b"MZ" + b"\0" * 62}, "64 bytes that belong to no member lie before the first member"),
    ({"trailing": b"\0" * 10}, "not at the very end"),
    ({"comment": b"hello"}, "archive comment"),
    ({"gap": b"PK\x05\x06"}, "bytes that belong to no member lie before member 'm/version'"),
    ({"count": 1}, "counts 1 members but its central directory holds 2"),
    ({"cd_shift": 1}, "does not end where the end records start"),
])
def test_bytes_outside_the_members_and_inconsistent_end_records_are_refused(kwargs: dict[str, object],
                                                                             match: str) -> None:
    refused(build(plain(), **kwargs), match)  # type: ignore[arg-type]


@fast
def test_a_second_end_record_that_could_parse_is_refused() -> None:
    # A fake end record in the last member's data, whose "comment" would run exactly to the end of the file.
    data = bytearray(build(plain() + [Member(b"m/z", b"PK\x05\x06" + b"\0" * 18)]))
    at = data.rfind(b"PK\x05\x06", 0, len(data) - 22)
    struct.pack_into("<H", data, at + 20, len(data) - at - 22)
    refused(bytes(data), "a second end-of-central-directory record could be read")


@fast
@pytest.mark.parametrize(("names", "match"), [
    ([b"m/data.pkl", b"m/DATA.pkl"], "duplicate member names .*same ignoring case"),
    ([b"m/data.pkl", b"m/data.pkl"], "duplicate member names"),
    ([b"m\\data.pkl"], "backslash"),
    ([b"/m/data.pkl"], "absolute path"),
    ([b"C:/m/data.pkl"], "absolute path"),
    ([b"m/../data.pkl"], r"'\.\.' component"),
    ([b"m//data.pkl"], "empty"),
    ([b"m/data.pkl\x00.txt"], "control characters"),
    ([b"m/data\n.pkl"], "control characters"),
    ([b"m/\xe9.pkl"], "not valid ASCII"),
])
def test_ambiguous_member_names_are_refused(names: list[bytes], match: str) -> None:
    refused(build([Member(n, b"x") for n in names]), match)


@fast
@pytest.mark.parametrize(("change", "match"), [
    ({"local_name": b"m/other.pk"}, "is called b'm/other.pk' in its local header"),
    ({"local_usize": 3}, "another CRC or size in its local header"),
    ({"local_method": 8}, "other flags or another compression method"),
    ({"flags": 0x1}, "is encrypted"),
    ({"flags": 0x10}, "general-purpose flags"),
    ({"method": 12}, "compression method 12"),
    ({"declared_usize": 99}, "is stored but its sizes differ"),
])
def test_a_local_header_or_entry_that_disagrees_is_refused(change: dict[str, object], match: str) -> None:
    members = plain()
    members[0] = replace(members[0], **change)  # type: ignore[arg-type]
    refused(build(members), match)


@fast
def test_overlapping_members_are_refused() -> None:
    # m/a's data holds a complete local header and data for m/b, and the directory points m/b there.
    inner = build([Member(b"m/b", b"hidden")])
    a = Member(b"m/a", b"\0\0" + inner[: inner.index(b"PK\x01\x02")])
    b = Member(b"m/b", b"hidden", offset=30 + len(b"m/a") + 2)
    refused(build([a, b]), "member 'm/b' overlaps the member before it")


@fast
@pytest.mark.parametrize(("flaw", "match"), [
    ("locator", "zip64 locator does not point at a zip64 end record right before it"),
    ("record-size", "zip64 end record is missing or carries extensible data"),
    ("disagree", "end record and zip64 end record disagree"),
])
def test_inconsistent_zip64_end_records_are_refused(flaw: str, match: str) -> None:
    refused(build(plain(), zip64=flaw), match)


@fast
def test_zip64_markers_are_accepted_only_where_zip64_supplies_the_value() -> None:
    assert check_archive(io.BytesIO(build(plain(), zip64="sentinel")), "x") == ["m/data.pkl", "m/version"]
    data = bytearray(build(plain()))
    struct.pack_into("<I", data, len(data) - 6, U32)  # the central directory offset, without zip64
    refused(bytes(data), "zip64 markers but there is no zip64 end record")
    members = plain()
    members[1] = replace(members[1], declared_usize=U32)  # a marker with no zip64 field to resolve it
    refused(build(members), "zip64 markers and a zip64 field that do not match")
    members[1] = replace(members[1], declared_usize=U32, central_extra=struct.pack("<HHQ", 1, 8, 2))
    assert check_archive(io.BytesIO(build(members)), "x") == ["m/data.pkl", "m/version"]
    members[1] = replace(members[1], declared_usize=U32, central_extra=struct.pack("<HHQ", 1, 8, 7))
    refused(build(members), "stored but its sizes differ")


@fast
def test_a_data_descriptor_must_follow_and_match() -> None:
    # torch's writer sets flag 0x08 and zeroes the local CRC/sizes; a wrong descriptor is refused.
    buf = io.BytesIO()
    torch.save({"w": torch.zeros(3)}, buf)
    data = bytearray(buf.getvalue())
    at = data.index(b"PK\x07\x08")
    struct.pack_into("<I", data, at + 8, 1)
    refused(bytes(data), "data descriptor")


@fast
def test_deflate_bombs_are_refused() -> None:
    bomb = b"\0" * (8 << 20)
    members = [Member(b"m/data.pkl", bomb, method=8), Member(b"m/version", b"3\n")]
    data = build(members)
    assert len(data) < 64 * 1024
    refused(data, "decompression bomb")
    # Declared small, inflates to more: miniz and zipfile would stop at different points or fail.
    members = [Member(b"m/data.pkl", b"\0" * (4 << 10), method=8, declared_usize=1024, local_usize=1024),
               Member(b"m/version", b"3\n")]
    refused(build(members), "inflates to more than its declared 1024 bytes")
    # Many members, each inside the ratio bound, together beyond 10x the archive + 64 MiB.
    many = [Member(f"m/{i}".encode(), b"\0" * (1 << 20), method=8) for i in range(80)]
    refused(build(many), "members declare more than 10x the archive's size")


# -- end to end: the .pt2 that runs code where miniz looks -----------------------------------------

@pytest.mark.slow
def test_a_pt2_that_runs_code_where_torch_looks_is_refused_at_push_and_at_load(
        tmp_path: Path, registry: Registry, home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    torch.manual_seed(0)
    buf = io.BytesIO()
    torch.export.save(torch.export.export(nn.Linear(4, 2), (torch.randn(3, 4),)), buf)
    benign = buf.getvalue()
    evil = tmp_path / "evil.pt2"
    evil.write_bytes(differential(benign, _hostile_pt2(benign)))
    with zipfile.ZipFile(evil) as zf:  # what the vetting code would have read without the check: benign
        assert not any(zf.read(n) == EVIL_PICKLE for n in zf.namelist())

    # Proof the file is hostile: unvetted, torch.export.load runs the hidden pickle (in a throwaway process).
    probe = tmp_path / "probe"
    probe.mkdir()
    run_python(f"import torch\ntorch.export.load({str(evil)!r})\n", cwd=probe)
    assert (probe / "MARKER").exists(), "torch.export.load should have run the pickle miniz finds"

    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)  # where the pickle would touch MARKER
    with pytest.raises(FormatError, match="'evil.pt2' is a damaged zip archive .* does not end where"):
        registry.push("evil", evil)
    assert not (work / "MARKER").exists()

    # A good push, then its blob swapped for the hostile bytes, the recorded sha256 and size fixed up to match.
    good = tmp_path / "good.pt2"
    good.write_bytes(benign)
    mv = registry.push("lin", good)
    data = evil.read_bytes()
    sha = hashlib.sha256(data).hexdigest()
    target = blob_path(home, sha)
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_bytes(data)
    with sqlite3.connect(home / "registry.db") as conn:
        conn.execute("UPDATE versions SET sha256 = ?, size = ? WHERE sha256 = ?", (sha, len(data), mv.sha256))
    conn.close()
    with pytest.raises(FormatError, match="is a damaged zip archive .* does not end where"):
        registry.load("lin:1")
    assert not (work / "MARKER").exists()
