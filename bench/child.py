"""One measurement in a fresh process, run by ``bench/run.py``: ``python bench/child.py TASK ARGS_JSON``.

Imports happen before the clock starts (the operation is measured "after imports"); the result is
one JSON document on the last line of stdout. Memory is the kernel's own accounting for this process:
``RssAnon`` (private, anonymous memory) sampled every 2 ms by a thread, and ``VmHWM`` (peak resident
set, file-backed pages included), reset through ``/proc/self/clear_refs`` when a measurement starts.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

CHUNK = 4 * 1024 * 1024
SAMPLE_SECONDS = 0.002


def status() -> dict[str, int]:
    """The ``kB`` fields of ``/proc/self/status``."""
    out: dict[str, int] = {}
    with open("/proc/self/status", "rb") as f:
        for line in f.read().decode().splitlines():
            key, _, value = line.partition(":")
            if value.strip().endswith("kB"):
                out[key] = int(value.split()[0])
    return out


class Meter:
    """Wall time and peak memory of the block it wraps."""

    def __init__(self) -> None:
        self.result: dict[str, Any] = {}

    @contextmanager
    def measure(self) -> Iterator[Meter]:
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # resets VmHWM to the current RSS
        except OSError:
            pass
        base = status()
        peak = {"anon": base.get("RssAnon", 0), "rss": base.get("VmRSS", 0)}
        stop = threading.Event()

        def sample() -> None:
            while not stop.wait(SAMPLE_SECONDS):
                now = status()
                peak["anon"] = max(peak["anon"], now.get("RssAnon", 0))
                peak["rss"] = max(peak["rss"], now.get("VmRSS", 0))

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        start = time.perf_counter()
        try:
            yield self
        finally:
            seconds = time.perf_counter() - start
            stop.set()
            sampler.join()
            end = status()
            self.result = {
                "seconds": seconds,
                "anon_base_kb": base.get("RssAnon", 0),
                "anon_peak_kb": max(peak["anon"], end.get("RssAnon", 0)),
                "rss_base_kb": base.get("VmRSS", 0),
                "rss_peak_kb": max(peak["rss"], end.get("VmHWM", 0)),
                "file_end_kb": end.get("RssFile", 0),
            }


def measured(fn: Callable[[], object]) -> dict[str, Any]:
    os.sync()  # earlier writes are on disk: their writeback does not land inside this measurement
    meter = Meter()
    with meter.measure():
        fn()
    return meter.result


def copy_pass(source: str, dest: str, *, fsync: bool) -> str:
    """The floor of push and pull: one read -> sha256 -> write pass (+ fsync), in 4 MiB chunks."""
    digest = hashlib.sha256()
    buf = bytearray(CHUNK)
    view = memoryview(buf)
    with open(source, "rb") as src, open(dest, "wb") as dst:
        while n := src.readinto(buf):
            digest.update(view[:n])
            dst.write(view[:n])
        if fsync:
            dst.flush()
            os.fsync(dst.fileno())
    return digest.hexdigest()


def sha256_file(path: str) -> str:
    digest = hashlib.sha256()
    buf = bytearray(CHUNK)
    view = memoryview(buf)
    with open(path, "rb") as f:
        while n := f.readinto(buf):
            digest.update(view[:n])
    return digest.hexdigest()


# -- tasks ------------------------------------------------------------------------------------


def task_build(a: dict[str, Any]) -> dict[str, Any]:
    """The test models: an nn.Sequential of square nn.Linear layers of about ``size`` bytes, in two formats."""
    import warnings

    import torch

    from registry.spec import capture

    size, width = int(a["size"]), int(a["width"])
    layers = max(1, round(size / (4 * (width * width + width))))
    out = Path(a["dir"])
    out.mkdir(parents=True, exist_ok=True)
    with torch.device("meta"):
        model = torch.nn.Sequential(*[torch.nn.Linear(width, width) for _ in range(layers)])
    model = model.to_empty(device="cpu")
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.uniform_(-0.05, 0.05, generator=gen)
    torch.save(model.state_dict(), out / "state_dict.pt")
    (out / "spec.json").write_text(json.dumps(capture(model)))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.jit.script(model).save(str(out / "torchscript.pt"))  # type: ignore[no-untyped-call]
    info = {"size": size, "width": width, "layers": layers,
            "state_dict_bytes": (out / "state_dict.pt").stat().st_size,
            "torchscript_bytes": (out / "torchscript.pt").stat().st_size}
    (out / "model.json").write_text(json.dumps(info))
    return info


def task_push(a: dict[str, Any]) -> dict[str, Any]:
    """In-process push after imports, and its floor (copy pass + fsync of the same file) in this process."""
    if a["format"] == "state_dict":
        import torch  # noqa: F401  (a state_dict push validates its spec with torch: imported before the clock)
    from registry.api import Registry

    reg = Registry(a["db"], a["storage"])
    reg.models()  # schema checked, connection open
    _ = reg.store
    spec = json.loads(Path(a["spec"]).read_text()) if a.get("spec") else None
    floor_out = Path(a["floor_dir"]) / "floor.part"
    floor_out.parent.mkdir(parents=True, exist_ok=True)

    def floor() -> dict[str, Any]:
        result = measured(lambda: copy_pass(a["file"], str(floor_out), fsync=True))
        floor_out.unlink()
        return result

    def push() -> dict[str, Any]:
        return measured(lambda: reg.push(a["name"], a["file"], format=a["format"], spec=spec))

    if a.get("floor_first", True):
        f, op = floor(), push()
    else:
        op, f = push(), floor()
    return {"op": op, "floor": f, "torch_imported": "torch" in sys.modules}


def task_copy_pass(a: dict[str, Any]) -> dict[str, Any]:
    """The floor alone, in a fresh process (for whole-process push and for pull)."""
    out = Path(a["dest"])
    out.parent.mkdir(parents=True, exist_ok=True)
    result = measured(lambda: copy_pass(a["file"], str(out), fsync=bool(a["fsync"])))
    out.unlink()
    return {"op": result}


def task_load(a: dict[str, Any]) -> dict[str, Any]:
    """``Registry().load(ref)`` after imports (optionally reading every weight), in this fresh process."""
    import torch

    from registry.api import Registry

    def load() -> None:
        module = Registry(a["db"], a["storage"]).load(a["ref"])
        if a.get("touch"):
            with torch.no_grad():
                total = sum(float(p.sum()) for p in module.parameters())
            assert total == total

    return {"op": measured(load)}


def task_load_floor(a: dict[str, Any]) -> dict[str, Any]:
    """sha256 of the blob + meta-device build + torch.load(mmap=True) + load_state_dict(assign=True)."""
    import torch

    width, layers = int(a["width"]), int(a["layers"])

    def floor() -> None:
        if sha256_file(a["blob"]) != a["sha256"]:
            raise SystemExit("blob does not match its sha256")
        with torch.device("meta"):
            model = torch.nn.Sequential(*[torch.nn.Linear(width, width) for _ in range(layers)])
        state = torch.load(a["blob"], mmap=True, weights_only=True, map_location="cpu")
        model.load_state_dict(state, assign=True)
        model.eval()
        if a.get("touch"):
            with torch.no_grad():
                total = sum(float(p.sum()) for p in model.parameters())
            assert total == total

    return {"op": measured(floor)}


def task_pull(a: dict[str, Any]) -> dict[str, Any]:
    from registry.api import Registry

    reg = Registry(a["db"], a["storage"])
    reg.models()
    _ = reg.store
    dest = Path(a["dest"])
    dest.parent.mkdir(parents=True, exist_ok=True)
    result = measured(lambda: reg.pull(a["ref"], dest=dest, force=True))
    dest.unlink()
    return {"op": result, "torch_imported": "torch" in sys.modules}


def task_setup(a: dict[str, Any]) -> dict[str, Any]:
    """A registry holding the state_dict of one test model (for load and pull)."""
    from registry.api import Registry

    reg = Registry(a["db"], a["storage"])
    spec = json.loads(Path(a["spec"]).read_text())
    mv = reg.push(a["name"], a["file"], format="state_dict", spec=spec)
    return {"sha256": mv.sha256, "blob": str(reg.store.key(mv.sha256)), "ref": mv.ref}


def task_make_scale(a: dict[str, Any]) -> dict[str, Any]:
    """A SQLite registry with ``versions`` versions of model ``big`` and ``models`` models in all.

    One real version is pushed; the others are copies of its row inserted with plain SQL in one
    transaction (every column the schema has, whatever later migrations added).
    """
    import sqlite3

    from registry.api import Registry

    db_path, versions, models = a["db_path"], int(a["versions"]), int(a["models"])
    reg = Registry(f"sqlite:///{db_path}", a["storage"])
    reg.push("big", a["file"])  # a tiny TorchScript file: no torch needed
    reg.close()
    con = sqlite3.connect(db_path, isolation_level=None)
    cols = [r[1] for r in con.execute("PRAGMA table_info(versions)") if r[1] not in ("id", "model_id", "version")]
    mcols = [r[1] for r in con.execute("PRAGMA table_info(models)") if r[1] not in ("id", "name", "last_version")]
    vlist, mlist = ", ".join(cols), ", ".join(mcols)
    tv, tm = ", ".join(f"t.{c}" for c in cols), ", ".join(f"t.{c}" for c in mcols)
    (big_id, template) = con.execute(
        "SELECT m.id, v.id FROM models m JOIN versions v ON v.model_id = m.id WHERE m.name = 'big'").fetchone()
    con.execute("BEGIN")
    con.execute(
        f"WITH RECURSIVE n(i) AS (SELECT 2 UNION ALL SELECT i + 1 FROM n WHERE i < ?) "
        f"INSERT INTO versions (model_id, version, {vlist}) SELECT ?, n.i, {tv} FROM n, versions t "
        f"WHERE t.id = ?", (versions, big_id, template))
    con.execute("UPDATE models SET last_version = ? WHERE id = ?", (versions, big_id))
    con.execute(
        f"WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < ?) "
        f"INSERT INTO models (name, last_version, {mlist}) SELECT printf('model-%06d', n.i), 1, {tm} "
        f"FROM n, models t WHERE t.id = ?", (models - 1, big_id))
    con.execute(
        f"INSERT INTO versions (model_id, version, {vlist}) SELECT m.id, 1, {tv} FROM models m, versions t "
        f"WHERE t.id = ? AND m.name LIKE 'model-%'", (template,))
    con.execute("COMMIT")
    counts = con.execute("SELECT (SELECT count(*) FROM versions), (SELECT count(*) FROM models)").fetchone()
    con.close()
    reg = Registry(f"sqlite:///{db_path}", a["storage"])
    reg.promote("big", versions // 2, "production")
    reg.promote("big", versions // 3, "staging")
    reg.close()
    return {"versions": counts[0], "models": counts[1]}


def task_scale(a: dict[str, Any]) -> dict[str, Any]:
    """Per-call medians (after a warm-up) of the lookups that must not grow with the number of versions."""
    import statistics

    from sqlalchemy import event

    from registry.api import Registry

    reg = Registry(a["db"], a["storage"])
    n = int(a["versions"])
    statements = [0]

    def count(*_: object) -> None:
        statements[0] += 1

    event.listen(reg._engine, "before_cursor_execute", count)
    flip = [0]

    def promote() -> None:
        flip[0] ^= 1
        reg.promote("big", n // 2 + flip[0], "staging")

    ops: dict[str, Callable[[], object]] = {
        "resolve NAME@ALIAS": lambda: reg.get("big@production"),
        "resolve NAME:N": lambda: reg.get(f"big:{n // 2}"),
        "resolve NAME (latest)": lambda: reg.get("big"),
        "move an alias": promote,
        "list NAME (first page)": lambda: reg.versions("big", limit=50),
        "list (all models)": reg.models,
    }
    out: dict[str, Any] = {}
    for name, fn in ops.items():
        iterations = 5 if name == "list (all models)" else int(a["iterations"])
        for _ in range(3):
            fn()
        times = []
        statements[0] = 0
        for _ in range(iterations):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
        out[name] = {"seconds": statistics.median(times), "min": min(times), "max": max(times),
                     "statements_per_call": statements[0] / iterations}
    return out


def task_diff_setup(a: dict[str, Any]) -> dict[str, Any]:
    """The test model as a state_dict (v1) and, one element of one tensor changed, as safetensors (v2)."""
    import torch

    from registry.api import Registry

    reg = Registry(a["db"], a["storage"])
    spec = json.loads(Path(a["spec"]).read_text())
    v1 = reg.push(a["name"], a["file"], format="state_dict", spec=spec)
    state = torch.load(a["file"], mmap=True, weights_only=True, map_location="cpu")
    names = [n for n, t in state.items() if t.dim() == 2]
    changed = names[len(names) // 2]
    state[changed] = state[changed].clone()
    state[changed][0, 0] += 0.25
    from safetensors.torch import save_file

    edited = Path(a["storage"]) / "edited.safetensors"
    save_file(dict(state), str(edited))
    del state
    v2 = reg.push(a["name"], edited, format="safetensors", spec=spec)
    edited.unlink()
    return {"a": v1.ref, "b": v2.ref, "changed": changed, "blobs": [str(reg.store.key(v1.sha256)),
                                                                     str(reg.store.key(v2.sha256))]}


def task_diff(a: dict[str, Any]) -> dict[str, Any]:
    """``Registry().diff(a, b)`` after imports: memory-mapped, one tensor pair at a time."""
    import torch  # noqa: F401  (imported before the clock, as by any caller that has tensors)

    from registry.api import Registry

    found: list[Any] = []
    result = measured(lambda: found.append(Registry(a["db"], a["storage"]).diff(a["a"], a["b"])))
    report = found[0]
    names = [(t.name, t.max_abs_diff) for t in report.tensors]
    if [n for n, _ in names] != [a["changed"]]:
        raise SystemExit(f"diff found {names}, expected only {a['changed']}")
    return {"op": result}


def task_diff_floor(a: dict[str, Any]) -> dict[str, Any]:
    """The naive diff: hash both blobs, load both models whole, max |a - b| tensor by tensor."""
    import torch
    from safetensors.torch import load

    def floor() -> None:
        sha256_file(a["blobs"][0])
        sha256_file(a["blobs"][1])
        sa = torch.load(a["blobs"][0], weights_only=True, map_location="cpu")
        sb = load(Path(a["blobs"][1]).read_bytes())
        for name, t in sa.items():
            float((t - sb[name]).abs().max())

    return {"op": measured(floor)}


TASKS: dict[str, Callable[[dict[str, Any]], dict[str, Any]]] = {
    "build": task_build,
    "push": task_push,
    "copy_pass": task_copy_pass,
    "load": task_load,
    "load_floor": task_load_floor,
    "pull": task_pull,
    "setup": task_setup,
    "make_scale": task_make_scale,
    "scale": task_scale,
    "diff_setup": task_diff_setup,
    "diff": task_diff,
    "diff_floor": task_diff_floor,
}


if __name__ == "__main__":
    result = TASKS[sys.argv[1]](json.loads(sys.argv[2]))
    print(json.dumps(result))
