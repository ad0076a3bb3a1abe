"""Tests for pickle opcode scanning and model-file format detection."""

from __future__ import annotations

import collections
import functools
import json
import os
import pickle
import random
import subprocess
import sys
import warnings
import zipfile
from pathlib import Path

import pytest
import torch
from torch import nn

from registry import pickles
from registry.errors import FormatError
from registry.pickles import Detected, dangerous, detect, global_name, parse_globals, scan_pickle
from registry.records import Format

ROOT = Path(__file__).resolve().parent.parent


class _Evil:
    """Pickles as a call to os.system; only ever pickled and scanned here, never unpickled."""

    def __init__(self, command: str) -> None:
        self.command = command

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return os.system, (self.command,)


class _Small(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(2, 3)
        self.register_buffer("offset", torch.zeros(3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x) + self.offset


def _save(obj: object, path: Path) -> Path:
    torch.save(obj, path)
    return path


def _member(path: Path, suffix: str) -> bytes:
    with zipfile.ZipFile(path) as zf:
        (name,) = [n for n in zf.namelist() if n.endswith(suffix)]
        return zf.read(name)


def _rewrite(src: Path, dst: Path, replace: dict[str, bytes] | None = None,
             add: dict[str, bytes] | None = None) -> Path:
    """Copy a zip, replacing members by their name below the top-level folder and appending others."""
    replace, add = replace or {}, add or {}
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w") as zout:
        root = zin.namelist()[0].split("/", 1)[0]
        for info in zin.infolist():
            rel = info.filename.split("/", 1)[1]
            zout.writestr(info.filename, replace.get(rel, zin.read(info)))
        for rel, data in add.items():
            zout.writestr(f"{root}/{rel}", data)
    return dst


def _evil_pickle(marker: Path, protocol: int) -> bytes:
    return pickle.dumps(_Evil(f"touch {marker}"), protocol=protocol)


# --- scan_pickle ------------------------------------------------------------------------------------


def test_scan_finds_the_classes_of_a_pickled_module(tmp_path: Path) -> None:
    path = _save(nn.Sequential(nn.Linear(2, 3), nn.ReLU(), nn.Linear(3, 1)), tmp_path / "seq.pt")
    found = scan_pickle(_member(path, "/data.pkl"))
    assert {
        ("torch.nn.modules.container", "Sequential"),
        ("torch.nn.modules.linear", "Linear"),
        ("torch.nn.modules.activation", "ReLU"),
        ("torch._utils", "_rebuild_parameter"),
    } <= found
    assert dangerous(found) == []


@pytest.mark.parametrize("protocol", [0, 2, 4, 5])
def test_scan_reports_os_system_without_running_it(tmp_path: Path, protocol: int) -> None:
    marker = tmp_path / "MARKER"
    found = scan_pickle(_evil_pickle(marker, protocol))
    assert (os.system.__module__, "system") in found  # "posix" on Linux
    assert dangerous(found) == [f"{os.system.__module__}.system"]
    assert not marker.exists()


def test_stack_global_operands_resolve_through_the_memo() -> None:
    data = (
        b"\x80\x04\x95\x00\x00\x00\x00\x00\x00\x00\x00"  # PROTO 4, FRAME
        b"\x8c\x08builtins\x94"  # SHORT_BINUNICODE, MEMOIZE -> memo 0
        b"\x8c\x07getattr\x94"  # memo 1
        b"00"  # POP POP: only the memo still holds the names
        b"h\x00h\x01\x93."  # BINGET 0, BINGET 1, STACK_GLOBAL, STOP
    )
    assert scan_pickle(data) == {("builtins", "getattr")}
    assert dangerous(scan_pickle(data)) == ["builtins.getattr"]


def test_stack_global_through_binget_as_pickle_writes_it() -> None:
    data = pickle.dumps([collections.OrderedDict, collections.Counter], protocol=4)
    assert b"h" in data  # the second "collections" is a BINGET of the first
    assert scan_pickle(data) == {("collections", "OrderedDict"), ("collections", "Counter")}


def test_stack_global_with_computed_operands_is_refused() -> None:
    # str("builtins") built by REDUCE: pickle resolves it at load time, a scanner cannot see it.
    data = b"\x80\x04cbuiltins\nstr\n\x8c\x08builtins\x85R\x8c\x03len\x93."
    assert pickle.loads(data) is len  # harmless target: the trick works on the real unpickler
    with pytest.raises(FormatError, match="could not be scanned.*not constant strings.*refused"):
        scan_pickle(data)


@pytest.mark.parametrize(
    "data",
    [
        pytest.param(pickle.dumps({"a": [1, 2]}, protocol=2)[:-3], id="truncated"),
        pytest.param(pickle.dumps(1) + pickle.dumps(2), id="two-pickles"),
        pytest.param(pickle.dumps(1) + b"garbage", id="trailing-garbage"),
        pytest.param(b"", id="empty"),
        pytest.param(b"hello world", id="text"),
        pytest.param(b"\x80\x02\x82\x01.", id="ext1"),
        pytest.param(b"\x80\x02h\x05.", id="unknown-memo"),
        pytest.param(b"\x80\x02\x8c\x02os\x93.", id="stack-underflow"),
        pytest.param(b"\x80\x09N.", id="unknown-protocol"),
    ],
)
def test_malformed_pickles_are_refused(data: bytes) -> None:
    with pytest.raises(FormatError, match="could not be scanned") as info:
        scan_pickle(data)
    assert "\n" not in str(info.value)


def test_dangerous_callables_are_flagged() -> None:
    found = scan_pickle(pickle.dumps(functools.partial(print, 1), protocol=4))
    assert ("functools", "partial") in found
    assert dangerous(found) == ["functools.partial"]
    assert dangerous(scan_pickle(pickle.dumps(getattr, protocol=2))) == ["__builtin__.getattr"]


@pytest.mark.parametrize(
    ("g", "bad"),
    [
        (("__torch__.torch.nn.modules.linear", "Linear"), False),
        (("__torch__.x", "Y"), False),
        (("__builtin__", "set"), False),
        (("copy_reg", "_reconstructor"), False),
        (("torch._utils", "_rebuild_tensor_v2"), False),
        (("torch.jit._pickle", "build_intlist"), False),
        (("numpy.core.multiarray", "_reconstruct"), False),
        (("__torch__.x", "__reduce__"), True),
        (("__main__", "Net"), True),
        (("builtins", "eval"), True),
        (("builtins", "object.__subclasses__"), True),
        (("os.path", "join"), True),
        (("nt", "system"), True),
        (("commands", "getoutput"), True),  # Python 2 name pickle maps to subprocess
        (("torch", "os.system"), True),  # protocol 4 resolves dotted qualnames attribute by attribute
        (("torch", "load"), True),
        (("torch.serialization", "load"), True),
        (("torch", "serialization.load"), True),
        (("operator", "attrgetter"), True),
        (("numpy", "load"), True),
    ],
)
def test_dangerous_deny_list(g: tuple[str, str], bad: bool) -> None:
    assert dangerous([g]) == ([global_name(g)] if bad else [])


def test_parse_globals_round_trips_for_dangerous() -> None:
    names = ["posix.system", "torch.nn.modules.linear.Linear", "__builtin__.set"]
    assert dangerous(parse_globals(names)) == ["posix.system"]


# --- detect -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "make",
    [
        pytest.param(lambda: nn.Linear(3, 4).state_dict(), id="linear"),
        pytest.param(lambda: nn.Conv2d(3, 4, 3).state_dict(), id="conv2d"),
        pytest.param(lambda: nn.BatchNorm1d(4).state_dict(), id="batchnorm1d"),
        pytest.param(lambda: nn.Embedding(10, 3).state_dict(), id="embedding"),
        pytest.param(lambda: nn.LSTM(3, 4, num_layers=2).state_dict(), id="lstm"),
        pytest.param(lambda: nn.Linear(3, 4).half().state_dict(), id="float16"),
        pytest.param(lambda: nn.Linear(3, 4).bfloat16().state_dict(), id="bfloat16"),
        pytest.param(lambda: nn.TransformerEncoderLayer(8, 2).state_dict(), id="transformer"),
        pytest.param(lambda: {"a": torch.zeros(3), "b": torch.arange(4)}, id="plain-dict"),
        pytest.param(lambda: {"a": torch.zeros(3, dtype=torch.float8_e4m3fn)}, id="float8"),
        pytest.param(lambda: {"a": torch.zeros(3, dtype=torch.uint16)}, id="uint16"),
        pytest.param(lambda: dict(nn.Linear(2, 2).named_parameters()), id="parameters"),
    ],
)
def test_state_dicts_are_detected(tmp_path: Path, make: object) -> None:
    path = _save(make(), tmp_path / "weights.pt")  # type: ignore[operator]
    detected = detect(path)
    assert detected.format is Format.STATE_DICT, detected.globals_
    assert detected.pickles == ("weights/data.pkl",)


def test_batchnorm_int64_buffer_is_seen(tmp_path: Path) -> None:
    detected = detect(_save(nn.BatchNorm1d(4).state_dict(), tmp_path / "bn.pt"))
    assert "torch.LongStorage" in detected.globals_  # num_batches_tracked
    assert detected.format is Format.STATE_DICT


def test_full_model_is_detected(tmp_path: Path) -> None:
    detected = detect(_save(nn.Sequential(nn.Linear(2, 3), nn.ReLU()), tmp_path / "full.pt"))
    assert detected == Detected(Format.FULL, detected.globals_, ("full/data.pkl",))
    assert "torch.nn.modules.linear.Linear" in detected.globals_
    assert dangerous(parse_globals(detected.globals_)) == []


def test_torchscript_is_detected(tmp_path: Path) -> None:
    path = tmp_path / "script.pt"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.jit.script(nn.Sequential(nn.Linear(2, 3), nn.ReLU())).save(str(path))
    detected = detect(path)
    assert detected.format is Format.TORCHSCRIPT
    assert {"script/data.pkl", "script/constants.pkl"} <= set(detected.pickles)
    assert any(p.endswith(".debug_pkl") for p in detected.pickles)
    # TorchScript mangles a class scripted more than once in a process (linear.___torch_mangle_3.Linear).
    assert any(g.startswith("__torch__.torch.nn.modules.linear.") and g.endswith(".Linear")
               for g in detected.globals_), detected.globals_
    assert dangerous(parse_globals(detected.globals_)) == []


@pytest.fixture
def pt2(tmp_path: Path) -> Path:
    path = tmp_path / "program.pt2"
    program = torch.export.export(_Small(), (torch.randn(1, 2),))
    torch.export.save(program, path)
    return path


def test_export_is_detected_and_its_sample_inputs_scanned(pt2: Path) -> None:
    detected = detect(pt2)
    assert detected.format is Format.EXPORT
    assert detected.pickles == ("program/data/sample_inputs/model.pt!archive/data.pkl",)
    assert "torch._utils._rebuild_tensor_v2" in detected.globals_


def test_export_opaque_constant_pickle_is_scanned(pt2: Path, tmp_path: Path) -> None:
    # Opaque constants are plain pickle.dumps output that torch.export.load unpickles: protocol 0 here,
    # so only the payload config, not the leading byte, says it is a pickle.
    marker = tmp_path / "MARKER"
    config = {"config": {"c": {"path_name": "opaque_obj_0", "is_param": False, "use_pickle": True,
                               "tensor_meta": None}}}
    path = _rewrite(pt2, tmp_path / "evil.pt2",
                    replace={"data/constants/model_constants_config.json": json.dumps(config).encode()},
                    add={"data/constants/opaque_obj_0": _evil_pickle(marker, 0)})
    detected = detect(path)
    assert detected.format is Format.EXPORT
    assert dangerous(parse_globals(detected.globals_)) == [f"{os.system.__module__}.system"]
    assert not marker.exists()


def test_export_with_aotinductor_code_is_refused(pt2: Path, tmp_path: Path) -> None:
    path = _rewrite(pt2, tmp_path / "aoti.pt2", add={"data/aotinductor/model/model.so": b"\x7fELF"})
    with pytest.raises(FormatError, match="AOTInductor"):
        detect(path)


def test_pre_pt2_export_archive_is_detected(tmp_path: Path) -> None:
    weights = _save(nn.Linear(2, 2).state_dict(), tmp_path / "w.pt").read_bytes()
    path = tmp_path / "old.pt2"
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("serialized_exported_program.json", "{}")
        zf.writestr("serialized_state_dict.pt", weights)
        zf.writestr("version", "8.0")
    detected = detect(path)
    assert detected.format is Format.EXPORT
    assert detected.pickles == ("serialized_state_dict.pt!w/data.pkl",)


def test_safetensors_is_detected(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    path = tmp_path / "w.safetensors"
    save_file({"w": torch.zeros(2, 2), "b": torch.ones(2)}, str(path))
    assert detect(path) == Detected(Format.SAFETENSORS, (), ())


def test_malicious_module_pickle_is_full_and_dangerous(tmp_path: Path) -> None:
    marker = tmp_path / "MARKER"
    model = nn.Linear(2, 2)
    model.payload = _Evil(f"touch {marker}")
    detected = detect(_save(model, tmp_path / "evil.pt"))
    assert detected.format is Format.FULL
    assert f"{os.system.__module__}.system" in dangerous(parse_globals(detected.globals_))
    assert not marker.exists()


@pytest.mark.parametrize("member", ["data.pkl", "DATA.PKL"])
def test_malicious_data_pkl_in_a_state_dict_archive(tmp_path: Path, member: str) -> None:
    # torch's zip reader matches member names case-insensitively, so DATA.PKL is what torch.load reads.
    marker = tmp_path / "MARKER"
    src = _save(nn.Linear(2, 2).state_dict(), tmp_path / "src.pt")
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(tmp_path / "evil.pt", "w") as zout:
        for info in zin.infolist():
            data = _evil_pickle(marker, 2) if info.filename.endswith("/data.pkl") else zin.read(info)
            zout.writestr(info.filename.replace("data.pkl", member), data)
    detected = detect(tmp_path / "evil.pt")
    assert detected.format is Format.FULL
    assert dangerous(parse_globals(detected.globals_)) == [f"{os.system.__module__}.system"]
    assert not marker.exists()


def test_duplicate_members_are_refused(tmp_path: Path) -> None:
    # torch.load reads the first of two same-named members and zipfile the last: never guess.
    src = _save(nn.Linear(2, 2).state_dict(), tmp_path / "src.pt")
    path = tmp_path / "dup.pt"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # zipfile's "Duplicate name"
        _rewrite(src, path, add={"DATA.pkl": pickle.dumps({}, protocol=2)})
    with pytest.raises(FormatError, match="'dup.pt' has duplicate member names"):
        detect(path)


def test_unscannable_member_fails_closed(tmp_path: Path) -> None:
    src = _save(nn.Linear(2, 2).state_dict(), tmp_path / "src.pt")
    path = _rewrite(src, tmp_path / "bad.pt", replace={"data.pkl": _member(src, "/data.pkl")[:-4]})
    with pytest.raises(FormatError, match="'bad.pt' member src/data.pkl could not be scanned"):
        detect(path)


def test_oversized_pickle_member_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(pickles, "_MAX_PICKLE_BYTES", 64)
    with pytest.raises(FormatError, match="larger than 64 bytes"):
        detect(_save(nn.Linear(2, 2).state_dict(), tmp_path / "big.pt"))


def _corrupt(path: Path, suffix: str) -> None:
    """Flip the first data byte of a stored member, so reading it would fail zipfile's CRC check."""
    with zipfile.ZipFile(path) as zf:
        (info,) = [i for i in zf.infolist() if i.filename.endswith(suffix)]
    with open(path, "r+b") as f:
        f.seek(info.header_offset + 26)
        name_len, extra_len = int.from_bytes(f.read(2), "little"), int.from_bytes(f.read(2), "little")
        f.seek(info.header_offset + 30 + name_len + extra_len)
        first = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([first[0] ^ 0xFF]))
    with zipfile.ZipFile(path) as zf, pytest.raises(zipfile.BadZipFile, match="CRC"):
        zf.read(info)


def test_tensor_data_is_never_read(tmp_path: Path, pt2: Path) -> None:
    sd = _save(nn.Linear(2, 2).state_dict(), tmp_path / "sd.pt")
    _corrupt(sd, "/data/0")
    _corrupt(pt2, "/data/weights/weight_0")
    assert detect(sd).format is Format.STATE_DICT
    assert detect(pt2).format is Format.EXPORT


def test_legacy_torch_save_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "legacy.pt"
    torch.save(nn.Linear(2, 2).state_dict(), path, _use_new_zipfile_serialization=False)
    with pytest.raises(FormatError, match="'legacy.pt' uses the legacy non-zip torch.save format.*re-save"):
        detect(path)


@pytest.mark.parametrize(
    "content",
    [
        pytest.param(b"", id="empty"),
        pytest.param(b"just some text\n", id="text"),
        pytest.param(b"\x01" + random.Random(0).randbytes(4096), id="random"),
        pytest.param(b"\x10\x00\x00\x00\x00\x00\x00\x00not json at all!", id="bad-safetensors-header"),
        pytest.param(b"PK\x03\x04 broken", id="broken-zip"),
    ],
)
def test_other_files_are_refused(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "thing.bin"
    path.write_bytes(content)
    with pytest.raises(FormatError, match="'thing.bin' is (not a PyTorch model file|a damaged zip)"):
        detect(path)


@pytest.mark.parametrize(
    "names",
    [
        pytest.param({"a/readme.txt": b"hi"}, id="no-data-pkl"),
        pytest.param({"a/data.pkl": pickle.dumps({}), "b/x": b""}, id="two-roots"),
    ],
)
def test_foreign_zip_archives_are_refused(tmp_path: Path, names: dict[str, bytes]) -> None:
    path = tmp_path / "other.zip"
    with zipfile.ZipFile(path, "w") as zf:
        for name, data in names.items():
            zf.writestr(name, data)
    with pytest.raises(FormatError, match="'other.zip' is a zip archive.*not a PyTorch model file"):
        detect(path)


def test_detect_never_imports_torch(tmp_path: Path, pt2: Path) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.jit.script(nn.Linear(2, 2)).save(str(tmp_path / "script.pt"))
    paths = [
        _save(nn.Linear(2, 2).state_dict(), tmp_path / "sd.pt"),
        _save(nn.Linear(2, 2), tmp_path / "full.pt"),
        tmp_path / "script.pt",
        pt2,
    ]
    code = (
        "import sys\nfrom registry.pickles import detect\n"
        "print([detect(p).format.value for p in sys.argv[1:]])\n"
        "assert 'torch' not in sys.modules, 'torch was imported'\n"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    result = subprocess.run([sys.executable, "-c", code, *map(str, paths)], capture_output=True, text=True,
                            env=env, check=False)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "['state_dict', 'full', 'torchscript', 'export']"
