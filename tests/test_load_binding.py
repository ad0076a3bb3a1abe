"""Loading reads exactly the bytes that were verified: one descriptor, read-only blobs, no special files.

Each hostile case is built here and shown to fail closed: a marker file that a successful attack
would create never appears, and the model that loads is the one that was pushed.
"""

from __future__ import annotations

import mmap
import os
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest
import torch

from registry import FormatError, IntegrityError, Registry, UntrustedPickle
from registry.records import Format
from tests.helpers import TUTORIAL_SPEC, blob_path, registry_command, tutorial_model

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


class _Evil:
    """Pickles as a call to os.system; only ever pickled here."""

    def __init__(self, command: str) -> None:
        self.command = command

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return os.system, (self.command,)


def _swap_at(monkeypatch: pytest.MonkeyPatch, stage: str, blob: Path, replacement: bytes) -> list[str]:
    """At test hook ``stage``, replace the blob's path with other bytes (a new file renamed over it)."""
    from registry import _testhooks

    fired: list[str] = []
    real = _testhooks.pause

    def swap(name: str) -> None:
        if name == stage and not fired:
            fired.append(name)
            tmp = blob.with_name(blob.name + ".evil")
            tmp.write_bytes(replacement)
            os.replace(tmp, blob)
        real(name)

    monkeypatch.setattr(_testhooks, "pause", swap)
    return fired


@pytest.mark.fast
def test_blobs_are_stored_read_only(registry: Registry, home: Path) -> None:
    mv = registry.push("m", tutorial_model())
    assert blob_path(home, mv.sha256).stat().st_mode & 0o777 == 0o444


@pytest.mark.fast
def test_a_blob_swapped_after_verification_is_not_what_loads(
    registry: Registry, home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    model = tutorial_model(seed=1)
    mv = registry.push("m", model)
    other = tmp_path / "other.pt"
    torch.save(tutorial_model(seed=2).state_dict(), other)
    fired = _swap_at(monkeypatch, "verified", blob_path(home, mv.sha256), other.read_bytes())
    loaded = registry.load("m")
    assert fired == ["verified"]  # the path now holds other weights...
    for name, tensor in model.state_dict().items():  # ...but what loaded is what was verified
        assert torch.equal(loaded.state_dict()[name], tensor), name


@pytest.mark.fast
def test_a_pickle_swapped_in_after_verification_never_runs(
    registry: Registry, home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    marker = tmp_path / "MARKER"
    model = torch.nn.Linear(2, 2)
    mv = registry.push("m", model, format="full")
    evil = tmp_path / "evil.pt"
    torch.save({"x": _Evil(f"touch {marker}")}, evil)
    _swap_at(monkeypatch, "verified", blob_path(home, mv.sha256), evil.read_bytes())
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    loaded = registry.load("m", trust_code=True)  # even trusting its author: the author's bytes load
    assert type(loaded) is torch.nn.Linear
    assert not marker.exists()


@pytest.mark.fast
def test_example_inputs_are_read_from_the_verified_descriptor(
    registry: Registry, home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    x = torch.randn(3, 128)
    mv = registry.push("m", tutorial_model(), example_inputs=x)
    assert mv.example_sha256 is not None
    other = tmp_path / "other.pt"
    torch.save((torch.zeros(3, 128),), other)
    _swap_at(monkeypatch, "verified", blob_path(home, mv.example_sha256), other.read_bytes())
    (got,) = registry.example_inputs("m")
    assert torch.equal(got, x)


def test_a_writable_blob_is_rehashed_whatever_the_record_says(registry: Registry, home: Path) -> None:
    """A write through a shared mapping to an already-dirty page moves neither mtime nor ctime (Linux)."""
    mv = registry.push("m", torch.nn.Linear(64, 64))
    blob = blob_path(home, mv.sha256)
    blob.chmod(0o644)  # a blob someone made writable (or from before blobs were read-only)
    with zipfile.ZipFile(blob) as zf:  # a byte inside the weight's data, not the archive's own records
        info = max(zf.infolist(), key=lambda i: i.file_size)
        with zf.open(info) as member:
            member.read(1)
            end = member._fileobj.tell() + 100  # type: ignore[attr-defined]
    with open(blob, "r+b") as f, mmap.mmap(f.fileno(), 0) as mapped:
        mapped[end] = mapped[end]  # dirty the page: this write updates the timestamps
        time.sleep(2.2)  # older than the verification record's settle time
        registry.load("m")  # hashes it (and, before this change, recorded it as verified)
        mapped[end] = mapped[end] ^ 0xFF  # same dirty page: no timestamp changes
        mapped.flush()
        with pytest.raises(IntegrityError, match="is corrupt"):
            registry.load("m")


@pytest.mark.parametrize("kind", ["fifo", "symlink-to-dev-zero", "directory"])
def test_a_special_file_where_a_blob_should_be_fails_at_once(home: Path, tmp_path: Path, kind: str) -> None:
    env = {"REGISTRY_HOME": str(home)}
    model = tmp_path / "m.pt"
    torch.save(tutorial_model().state_dict(), model)
    spec = tmp_path / "spec.json"
    spec.write_text(__import__("json").dumps(TUTORIAL_SPEC))
    pushed = subprocess.run([registry_command(), "--json", "push", "m", str(model), "--arch", str(spec)],
                            env={**os.environ, **env}, capture_output=True, text=True, timeout=120)
    assert pushed.returncode == 0, pushed.stderr
    sha = __import__("json").loads(pushed.stdout)["sha256"]
    blob = blob_path(home, sha)
    blob.unlink()
    if kind == "fifo":
        os.mkfifo(blob)
    elif kind == "directory":
        blob.mkdir()
    else:
        blob.symlink_to("/dev/zero")
    for args in (["load", "m"], ["pull", "m", "-o", str(tmp_path / "out.pt")], ["verify"]):
        started = time.monotonic()
        proc = subprocess.run([registry_command(), *args], env={**os.environ, **env}, capture_output=True,
                              text=True, timeout=60)
        assert time.monotonic() - started < 30, args  # never blocks on a FIFO or reads /dev/zero forever
        assert proc.returncode == 1, (args, proc.stdout, proc.stderr)
        if args[0] != "verify":
            lines = proc.stderr.strip().splitlines()
            assert len(lines) == 1 and lines[0].startswith("error:"), (args, proc.stderr)
        assert "Traceback" not in proc.stderr
    assert not (tmp_path / "out.pt").exists()


# --- bounded resources -----------------------------------------------------------------------


class _Bytes:
    def __init__(self, n: int) -> None:
        self.n = n

    def __reduce__(self) -> tuple[object, tuple[int]]:
        return bytearray, (self.n,)


@pytest.mark.fast
def test_a_pickle_that_asks_for_a_huge_bytearray_is_refused(registry: Registry, tmp_path: Path) -> None:
    path = tmp_path / "bomb.pt"
    torch.save({"weight": torch.zeros(2), "x": _Bytes(10**9)}, path)
    assert path.stat().st_size < 4096
    with pytest.raises(FormatError, match="calls builtins.bytearray with a number"):
        registry.push("bomb", path, spec={"target": "torch.nn.Linear", "args": [1, 2]})
    example = tmp_path / "example.pt"
    torch.save((torch.zeros(1), _Bytes(10**9)), example)
    from registry.signature import read_example

    with pytest.raises(FormatError, match="calls builtins.bytearray with a number"):
        read_example(example)


def test_a_refused_bytearray_bomb_costs_no_memory(tmp_path: Path) -> None:
    path = tmp_path / "bomb.pt"
    torch.save({"weight": torch.zeros(2), "x": _Bytes(10**9)}, path)
    code = f"""
import resource, registry, torch
reg = registry.Registry()
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
try:
    reg.push("bomb", {str(path)!r}, spec={{"target": "torch.nn.Linear", "args": [1, 2]}})
except registry.FormatError:
    pass
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base)
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert int(proc.stdout.strip().splitlines()[-1]) < 64 * 1024  # KiB: far below the 1 GB it asked for


def _pt2_declaring(tmp_path: Path, sizes: list[int]) -> Path:
    """A real .pt2 whose first weight's metadata declares ``sizes`` (payload unchanged)."""
    import json

    program = torch.export.export(torch.nn.Linear(4, 3).eval(), (torch.randn(2, 4),))
    good = tmp_path / "good.pt2"
    with open(good, "wb") as f:
        torch.export.save(program, f)
    out = tmp_path / "declared.pt2"
    with zipfile.ZipFile(good) as zin, zipfile.ZipFile(out, "w", zipfile.ZIP_STORED) as zout:
        for info in zin.infolist():
            data = zin.read(info)
            if info.filename.endswith("_weights_config.json"):
                config = json.loads(data)
                meta = next(iter(config["config"].values()))["tensor_meta"]
                meta["sizes"] = [{"as_int": n} for n in sizes]
                meta["strides"] = [{"as_int": s} for s in ([sizes[1], 1] if len(sizes) == 2 else [1])]
                data = json.dumps(config).encode()
            zout.writestr(info.filename, data)
    return out


@pytest.mark.fast
def test_a_pt2_declaring_more_bytes_than_its_weights_hold_is_refused(registry: Registry, tmp_path: Path) -> None:
    with pytest.raises(FormatError, match=r"declares a tensor of 10000000000 bytes but its payload holds 48"):
        registry.push("big", _pt2_declaring(tmp_path, [50000, 50000]))


# --- pickles: an allow-list at push ----------------------------------------------------------


def _pickle_referencing(path: Path, module: str, name: str) -> Path:
    """A torch.save archive whose pickle references ``module.name`` (protocol 2 GLOBAL), not called."""
    torch.save({"weight": torch.zeros(2)}, path)
    with zipfile.ZipFile(path) as zin:
        infos = zin.infolist()
        members = {i.filename: zin.read(i) for i in infos}
    pkl = next(n for n in members if n.endswith("data.pkl"))
    # Replace the top-level dict with a tuple (dict, global): unpickling would import the global.
    body = members[pkl]
    assert body[:2] == b"\x80\x02" and body[-1:] == b"."
    members[pkl] = body[:-1] + b"c" + module.encode() + b"\n" + name.encode() + b"\n" + b"\x86."
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as zout:
        for info in infos:
            zout.writestr(info.filename, members[info.filename])
    return path


@pytest.mark.fast
@pytest.mark.parametrize("target", ["torch.fx.graph_module._exec_with_source", "sympy.sympify",
                                    "numpy.testing._private.utils.runstring"])
def test_exec_wrappers_a_deny_list_misses_are_refused_at_push(
    registry: Registry, tmp_path: Path, target: str
) -> None:
    module, _, name = target.rpartition(".")
    path = _pickle_referencing(tmp_path / "wrapped.pt", module, name)
    with pytest.raises(UntrustedPickle, match=target.replace(".", r"\.")):
        registry.push("wrapped", path)
    with pytest.raises(Exception):  # noqa: B017 - not found: nothing was recorded
        registry.get("wrapped")


@pytest.mark.fast
def test_transformer_layers_holding_functions_round_trip_as_full_pickles(registry: Registry) -> None:
    torch.manual_seed(0)
    for activation in ("relu", "gelu"):
        layer = torch.nn.TransformerEncoderLayer(8, 2, 16, activation=activation, dropout=0.0).eval()
        registry.push(f"layer-{activation}", layer, format="full")
        loaded = registry.load(f"layer-{activation}")
        x = torch.randn(3, 2, 8)
        with torch.no_grad():
            assert torch.equal(loaded(x), layer(x))


@pytest.mark.fast
def test_an_artifact_whose_bytes_are_not_its_recorded_format_is_refused(
    registry: Registry, home: Path, tmp_path: Path
) -> None:
    mv = registry.push("m", tutorial_model())
    full = tmp_path / "full.pt"
    torch.save(tutorial_model(), full)
    blob = registry.store.put_file(full)
    # Point the version at bytes of another format, as a compromised database writer could.
    from sqlalchemy import update

    from registry.models import Version

    with registry._session(write=True) as s:
        s.execute(update(Version).where(Version.sha256 == mv.sha256).values(sha256=blob.sha256, size=blob.size))
    with pytest.raises(FormatError, match="recorded as state_dict but its bytes are full"):
        registry.load("m")
    assert registry.get("m").format is Format.STATE_DICT

