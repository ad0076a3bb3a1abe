"""Behaviour behind the performance targets (bench/run.py measures the times): what is imported,
read, copied, hashed and queried — never how long it takes."""

from __future__ import annotations

import builtins
import json
import os
import sqlite3
import textwrap
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from sqlalchemy import event

from registry import IntegrityError, Registry
from registry import verified as verified_mod
from registry.verified import VerifiedFiles
from tests.helpers import fresh_python, tutorial_model

MiB = 1024 * 1024


@pytest.fixture
def settled(monkeypatch: pytest.MonkeyPatch) -> None:
    """Blobs written during a test are seconds old at most: let the record accept them at once."""
    monkeypatch.setattr(verified_mod, "SETTLE_NS", 0)


@pytest.fixture
def hashes(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The files the verification record hashes (rather than answering from a record)."""
    from registry import blobfile

    seen: list[str] = []
    real, real_fd = verified_mod.hash_stream, blobfile.hash_fd

    def counting(f: Any, progress: Any = None) -> str:
        seen.append(f.name)
        return real(f, progress)

    def counting_fd(fd: int) -> str:  # how a blob is hashed: through the descriptor that is then read
        seen.append(os.readlink(f"/proc/self/fd/{fd}"))
        return real_fd(fd)

    monkeypatch.setattr(verified_mod, "hash_stream", counting)
    monkeypatch.setattr(blobfile, "hash_fd", counting_fd)
    return seen


def _blob(reg: Registry, ref: str) -> Path:
    return Path(reg.store.key(reg.get(ref).sha256))


def _scripted(path: Path, width: int = 256, layers: int = 1) -> Path:
    model = torch.nn.Sequential(*[torch.nn.Linear(width, width) for _ in range(layers)])
    torch.jit.script(model).save(str(path))
    return path


# -- metadata commands ----------------------------------------------------------------------------


def test_metadata_commands_import_neither_torch_nor_alembic_nor_fsspec(home: Path, tmp_path: Path) -> None:
    with Registry() as reg:
        reg.push("m", _scripted(tmp_path / "m.pt", 16))
        reg.push("m", _scripted(tmp_path / "m2.pt", 8))
    code = textwrap.dedent("""
        import sys
        from cli import cli
        heavy = ("torch", "alembic", "fsspec", "sqlalchemy.dialects.postgresql")
        for args in (["list"], ["list", "m", "--limit", "1"], ["show", "m:1"], ["show", "m"],
                     ["promote", "m", "--version", "1"], ["show", "m@production"], ["history", "m"],
                     ["demote", "m", "production"]):
            try:
                cli.main(args, prog_name="registry", standalone_mode=False)
            except SystemExit as e:
                assert not e.code, (args, e.code)
            loaded = sorted(m for m in sys.modules if m.split(".")[0] in heavy or m in heavy)
            assert not loaded, (args, loaded)
        print("clean")
    """)
    assert fresh_python(code, cwd=tmp_path).strip().endswith("clean")


# -- push reads its source once -------------------------------------------------------------------


class _CountingFile:
    """A file object that counts the bytes read through it."""

    def __init__(self, f: Any, counts: list[int]) -> None:
        self._f, self._counts = f, counts

    def _add(self, n: int) -> None:
        self._counts[-1] += n

    def read(self, *args: Any) -> bytes:
        data: bytes = self._f.read(*args)
        self._add(len(data))
        return data

    def read1(self, *args: Any) -> bytes:
        data: bytes = self._f.read1(*args)
        self._add(len(data))
        return data

    def readinto(self, buf: Any) -> int:
        n: int = self._f.readinto(buf)
        self._add(n or 0)
        return n

    def readinto1(self, buf: Any) -> int:
        n: int = self._f.readinto1(buf)
        self._add(n or 0)
        return n

    def __enter__(self) -> _CountingFile:
        self._f.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._f.__exit__(*exc)

    def __iter__(self) -> Iterator[bytes]:
        return iter(self._f)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._f, name)


@pytest.fixture
def source_reads(monkeypatch: pytest.MonkeyPatch) -> Callable[[Path], list[int]]:
    """``watch(path)``: bytes read from ``path`` through each ``open()`` of it, one count per open."""
    watched: dict[str, list[int]] = {}
    real_open = builtins.open

    def counting_open(file: Any, mode: str = "r", *args: Any, **kwargs: Any) -> Any:
        f = real_open(file, mode, *args, **kwargs)
        key = os.path.abspath(file) if isinstance(file, (str, os.PathLike)) else None
        if key in watched and "r" in mode and "b" in mode:
            watched[key].append(0)
            return _CountingFile(f, watched[key])
        return f

    monkeypatch.setattr(builtins, "open", counting_open)

    def watch(path: Path) -> list[int]:
        return watched.setdefault(os.path.abspath(path), [])

    return watch


@pytest.mark.parametrize("fmt", ["torchscript", "state_dict"])
def test_push_reads_the_source_once(registry: Registry, tmp_path: Path, fmt: str,
                                    source_reads: Callable[[Path], list[int]]) -> None:
    model = torch.nn.Sequential(torch.nn.Linear(1024, 1024), torch.nn.Linear(1024, 1024))  # ~8 MB
    path = tmp_path / "m.pt"
    if fmt == "torchscript":
        torch.jit.script(model).save(str(path))
    else:
        torch.save(model.state_dict(), path)
    from registry.spec import capture

    size = path.stat().st_size
    reads = source_reads(path)
    registry.push("m", path, format=fmt, spec=capture(model) if fmt == "state_dict" else None)
    whole = [n for n in reads if n >= size]
    assert len(whole) == 1, reads  # one pass over the bytes: hashed while they are copied
    # Format detection reads the zip directory and the pickles only, not the tensor data.
    assert sum(reads) - size < size // 20, reads
    assert registry.get("m").size == size


def test_push_of_a_live_module_hashes_its_staged_file_once(registry: Registry, tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    from registry import localstore

    passes: list[int] = []
    real = localstore.copy_hashing

    def counting(src: Any, dst: Any, progress: Any) -> tuple[str, int]:
        digest, size = real(src, dst, progress)
        passes.append(size)
        return digest, size

    monkeypatch.setattr(localstore, "copy_hashing", counting)
    registry.push("m", tutorial_model())
    assert len(passes) == 1


# -- loading maps the weights instead of copying them ----------------------------------------------


MEMORY_PROBE = """
import json, sys, threading, time
import torch
from registry import Registry

def anon():
    for line in open("/proc/self/status"):
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) * 1024
base = anon()
peak = [base]
stop = threading.Event()
def sample():
    while not stop.wait(0.002):
        peak[0] = max(peak[0], anon())
threading.Thread(target=sample, daemon=True).start()
module = Registry().load("big")
loaded = anon()
with torch.no_grad():
    total = sum(float(p.sum()) for p in module.parameters())
touched = anon()
stop.set()
params = list(module.parameters())
print(json.dumps({"base": base, "peak": max(peak[0], loaded, touched), "loaded": loaded, "touched": touched,
                  "bytes": sum(p.numel() * p.element_size() for p in params)}))
"""


@pytest.mark.slow
def test_loading_a_state_dict_maps_it_without_a_private_copy(home: Path, tmp_path: Path) -> None:
    width, layers = 2048, 12  # 12 x 16 MiB = ~200 MB of float32 weights
    with torch.device("meta"):
        model = torch.nn.Sequential(*[torch.nn.Linear(width, width) for _ in range(layers)])
    model = model.to_empty(device="cpu")
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(0.5)
    with Registry() as reg:
        reg.push("big", model)
    del model
    result = json.loads(fresh_python(MEMORY_PROBE, cwd=tmp_path).strip().splitlines()[-1])
    size = result["bytes"]
    assert size > 180 * MiB
    # A copying load (build, torch.load, load_state_dict) holds 1-2x the model in private memory;
    # mmap + assign holds none of it: the weights stay file-backed, even once every one is read.
    assert result["peak"] - result["base"] < size // 4, result
    assert result["touched"] - result["base"] < size // 4, result


def test_load_builds_on_meta_and_assigns_the_mapped_tensors(registry: Registry,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    registry.push("m", tutorial_model())
    calls: list[dict[str, Any]] = []
    real_load = torch.load

    def spying_load(*args: Any, **kwargs: Any) -> Any:
        calls.append(kwargs)
        return real_load(*args, **kwargs)

    monkeypatch.setattr(torch, "load", spying_load)
    assigned: list[bool] = []
    real_lsd = torch.nn.Module.load_state_dict

    def spying_lsd(self: torch.nn.Module, state: Any, strict: bool = True, assign: bool = False) -> Any:
        assigned.append(assign)
        return real_lsd(self, state, strict=strict, assign=assign)

    monkeypatch.setattr(torch.nn.Module, "load_state_dict", spying_lsd)
    module = registry.load("m")
    assert calls and all(c.get("mmap") is True and c.get("weights_only") is True for c in calls)
    assert assigned == [True]
    assert not any(p.is_meta for p in module.parameters())


# -- lookups stay flat as versions pile up --------------------------------------------------------


def _grow(db: Path, versions: int) -> None:
    """Copies of version 1's row as versions 2..N of model m, in one transaction (as the benchmark does)."""
    con = sqlite3.connect(db, isolation_level=None)
    cols = [r[1] for r in con.execute("PRAGMA table_info(versions)") if r[1] not in ("id", "model_id", "version")]
    model_id, template = con.execute(
        "SELECT m.id, v.id FROM models m JOIN versions v ON v.model_id = m.id WHERE m.name = 'm'").fetchone()
    listed, copied = ", ".join(cols), ", ".join(f"t.{c}" for c in cols)
    con.execute("BEGIN")
    con.execute(f"WITH RECURSIVE n(i) AS (SELECT 2 UNION ALL SELECT i + 1 FROM n WHERE i < ?) "
                f"INSERT INTO versions (model_id, version, {listed}) SELECT ?, n.i, {copied} FROM n, versions t "
                f"WHERE t.id = ?", (versions, model_id, template))
    con.execute("UPDATE models SET last_version = ? WHERE id = ?", (versions, model_id))
    con.execute("COMMIT")
    con.close()


def _statements(tmp_path: Path, versions: int) -> dict[str, list[tuple[str, Any]]]:
    db = tmp_path / f"r{versions}.db"
    with Registry(f"sqlite:///{db}", tmp_path / "artifacts") as reg:
        reg.push("m", tutorial_model())
    _grow(db, versions)
    out: dict[str, list[tuple[str, Any]]] = {}
    with Registry(f"sqlite:///{db}", tmp_path / "artifacts") as reg:
        reg.promote("m", versions // 2)
        seen: list[tuple[str, Any]] = []
        event.listen(reg._engine, "before_cursor_execute",
                     lambda _c, _cur, statement, params, _ctx, _many: seen.append((statement, params)))
        ops: dict[str, Callable[[], object]] = {
            "alias": lambda: reg.get("m@production"),
            "number": lambda: reg.get(f"m:{versions // 3}"),
            "latest": lambda: reg.get("m"),
            "promote": lambda: reg.promote("m", versions - 1, "staging"),
            "page": lambda: reg.versions("m", limit=50),
        }
        for name, op in ops.items():
            seen.clear()
            op()
            out[name] = list(seen)
        assert [v.version for v in reg.versions("m", limit=3)] == [versions, versions - 1, versions - 2]
        assert [v.version for v in reg.versions("m", limit=2, before=5)] == [4, 3]
    return out


def test_lookups_issue_the_same_few_statements_at_10_and_1000_versions(tmp_path: Path) -> None:
    small, large = _statements(tmp_path / "small", 10), _statements(tmp_path / "large", 1000)
    for op in small:
        assert len(small[op]) == len(large[op]) <= 8, (op, small[op], large[op])


def test_lookups_use_indexes_not_scans(tmp_path: Path) -> None:
    statements = _statements(tmp_path, 200)
    con = sqlite3.connect(tmp_path / "r200.db")
    for op, seen in statements.items():
        for sql, params in seen:
            if not sql.lstrip().upper().startswith("SELECT") or "alembic_version" in sql:
                continue
            plan = " / ".join(row[3] for row in con.execute(f"EXPLAIN QUERY PLAN {sql}", params))
            assert "SCAN versions" not in plan and "SCAN aliases" not in plan, (op, sql, plan)


def test_listing_models_reads_each_model_once(registry: Registry, tmp_path: Path) -> None:
    for name in ("a", "b", "c"):
        registry.push(name, tutorial_model())
    registry.push("b", tutorial_model(seed=3))
    registry.promote("b", 2)
    seen: list[str] = []
    event.listen(registry._engine, "before_cursor_execute", lambda *a: seen.append(a[2]))
    models = registry.models()
    assert [(m.name, m.latest_version, m.version_count, m.aliases) for m in models] == [
        ("a", 1, 1, {}), ("b", 2, 2, {"production": 2}), ("c", 1, 1, {})]
    assert len([s for s in seen if s.lstrip().upper().startswith("SELECT")]) <= 3


# -- the verification record ----------------------------------------------------------------------


def test_a_verified_blob_is_not_hashed_again(registry: Registry, settled: None, hashes: list[str]) -> None:
    registry.push("m", tutorial_model())
    registry.load("m")
    assert len(hashes) == 1
    registry.load("m")
    with Registry() as other:  # a new process reads the same record
        other.load("m")
    assert len(hashes) == 1


def test_a_blob_rewritten_with_its_mtime_restored_is_hashed_and_refused(
        registry: Registry, settled: None, hashes: list[str], tmp_path: Path) -> None:
    registry.push("m", tutorial_model())
    registry.load("m")
    blob = _blob(registry, "m")
    st = blob.stat()
    data = bytearray(blob.read_bytes())
    data[-200] ^= 0xFF  # same size, different bytes
    os.chmod(blob, 0o644)
    blob.write_bytes(bytes(data))
    os.utime(blob, ns=(st.st_atime_ns, st.st_mtime_ns))  # mtime restored; ctime cannot be
    assert blob.stat().st_mtime_ns == st.st_mtime_ns and blob.stat().st_size == st.st_size
    with pytest.raises(IntegrityError, match="expected sha256"):
        registry.load("m")
    with pytest.raises(IntegrityError):
        registry.pull("m", dest=tmp_path / "out.pt")
    assert not (tmp_path / "out.pt").exists()
    assert len(hashes) == 2  # the first load, and the load that found the change


def test_records_from_another_machine_or_of_fresh_files_are_not_trusted(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, hashes: list[str]) -> None:
    path = tmp_path / "f.bin"
    path.write_bytes(b"x" * 1000)
    record = VerifiedFiles(tmp_path / "records")
    record.sha256(path)
    assert record.lookup(path) is None  # just written: its timestamps have not settled yet
    monkeypatch.setattr(verified_mod, "SETTLE_NS", 0)
    digest = record.sha256(path)
    assert record.lookup(path) == digest and len(hashes) == 2
    monkeypatch.setattr(verified_mod, "machine_id", lambda: "another-machine")
    assert record.lookup(path) is None
    monkeypatch.undo()
    monkeypatch.setattr(verified_mod, "SETTLE_NS", 0)
    os.utime(path)  # any metadata change moves the ctime
    assert record.lookup(path) is None


def test_a_file_changed_while_it_is_hashed_is_not_recorded(tmp_path: Path, settled: None) -> None:
    path = tmp_path / "f.bin"
    path.write_bytes(b"y" * 1000)
    record = VerifiedFiles(tmp_path / "records")
    with open(path, "rb") as f:
        before = os.fstat(f.fileno())
        digest = verified_mod.hash_stream(f)
    with open(path, "ab") as f:
        f.write(b"more")
    assert not record.remember(path, digest, before)
    assert record.lookup(path) is None


def test_pull_of_a_verified_blob_is_a_byte_exact_kernel_copy(registry: Registry, settled: None, tmp_path: Path,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    from registry import localstore

    copies: list[bool] = []
    real = localstore._kernel_copy

    def spying(*args: Any) -> bool:
        copies.append(real(*args))
        return copies[-1]

    monkeypatch.setattr(localstore, "_kernel_copy", spying)
    source = _scripted(tmp_path / "m.pt", 512, 4)
    registry.push("m", source)
    first = registry.pull("m", dest=tmp_path / "first.pt")  # hashed on the way, which records the blob
    assert copies == []
    second = registry.pull("m", dest=tmp_path / "second.pt")  # the record vouches for the blob
    assert len(copies) == 1
    assert first.read_bytes() == second.read_bytes() == source.read_bytes()
    assert not list(tmp_path.glob(".*.part"))


def test_deleting_a_blob_forgets_its_record(registry: Registry, settled: None) -> None:
    registry.push("m", tutorial_model())
    registry.load("m")
    blob = _blob(registry, "m")
    assert registry.store.verified is not None and registry.store.verified.lookup(blob) is not None
    registry.delete("m:1")
    assert not any(registry.store.verified.directory.rglob("*.json"))


# -- the console script's fast exit ---------------------------------------------------------------


def test_the_console_script_exits_fast_with_its_output_and_status_intact(home: Path, tmp_path: Path) -> None:
    from tests.helpers import run_registry

    source = _scripted(tmp_path / "m.pt", 16)
    pushed = run_registry("--json", "push", "m", str(source))
    assert pushed.returncode == 0, pushed.stderr
    assert json.loads(pushed.stdout)["version"] == 1
    listed = run_registry("--json", "list")
    assert listed.returncode == 0 and [m["name"] for m in json.loads(listed.stdout)] == ["m"]
    missing = run_registry("show", "nope")
    assert (missing.returncode, missing.stdout) == (1, "") and missing.stderr.startswith("error: ")
    assert run_registry("no-such-command").returncode == 2
    with Registry() as reg:
        blob = _blob(reg, "m")
    os.chmod(blob, 0o644)
    blob.write_bytes(b"corrupt")
    verify = run_registry("verify")  # exits 1 through sys.exit() inside the command
    assert verify.returncode == 1 and "m:1" in verify.stdout


def test_the_cache_of_remote_blobs_uses_the_record_too(tmp_path: Path, settled: None, hashes: list[str]) -> None:
    from registry.cache import BlobCache
    from registry.localstore import LocalStore
    from registry.objectstore import ObjectStore

    source = tmp_path / "f.bin"
    source.write_bytes(os.urandom(100_000))
    blob = LocalStore(str(tmp_path / "remote")).put_file(source)
    cache = BlobCache(tmp_path / "cache", verified=VerifiedFiles(tmp_path / "records"))
    remote = ObjectStore(str(tmp_path / "remote"), cache=cache)  # any fsspec store; the cache only reads it
    for _ in range(3):
        with remote.open_verified(blob.sha256, blob.size, artifact="m:1") as path:
            assert path.read_bytes() == source.read_bytes()
    assert len(hashes) == 1  # downloaded (hashed while streaming), hashed once from disk, then recorded
