"""Benchmark: each registry operation beside its floor, measured in fresh processes in the same run.

    python bench/run.py                          # 10 MB, 200 MB and 1 GB models (15-25 minutes)
    python bench/run.py --sizes 200M             # one size: a few minutes
    python bench/run.py --sizes 10M --repeat 3 --only push,meta

It builds its own test models (an ``nn.Sequential`` of square ``nn.Linear`` layers of the given
sizes, saved as a state_dict and as TorchScript), then runs every operation ``--repeat`` times,
each time in a new process, alternating with the operation's floor so that both see the same
machine. It prints one table (operation, size, median, min-max, floor, ratio to the floor, the
target, peak memory) and writes every sample as JSON to ``bench/out/``.

Floors: push = one read -> sha256 -> write pass of the same file + fsync, in the same process; whole
``registry push`` process = that pass + 0.5 s; load = sha256 of the blob + meta-device build +
``torch.load(mmap=True)`` + ``load_state_dict(assign=True)``; pull = one read -> sha256 -> write
pass; metadata commands = ``python -c "import sqlalchemy, click, fsspec"``; scale = the same lookup
in a registry of 100 versions.

Memory is the kernel's accounting: peak ``RssAnon`` (private memory; for in-process operations above
the process's baseline after imports) and peak RSS (``VmHWM``, page cache mapped by the process
included). Bytecode caching is on for the children (``PYTHONDONTWRITEBYTECODE`` is removed from
their environment), as it is for an installed package.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
CHILD = Path(__file__).resolve().parent / "child.py"
OUT = ROOT / "bench" / "out"
DEFAULT_SIZES = "10M,200M,1G"
GROUPS = ("push", "load", "pull", "diff", "meta", "scale")
UNITS = {"K": 10**3, "M": 10**6, "G": 10**9}
TARGET_SIZE = 10**9  # the issue states the push, load and pull targets for 1 GB
MIB = 1024  # kB per MiB
SCALE = ((100, 100), (100_000, 10_000))  # (versions of one model, models in all)


@dataclass
class Row:
    """One line of the table: an operation's samples beside its floor's."""

    operation: str
    size: str
    seconds: list[float] = field(default_factory=list)
    floor: list[float] = field(default_factory=list)
    floor_offset: float = 0.0  # the target is floor + offset (whole-process push), not a ratio
    target: str = ""
    limit: float | None = None  # ratio (or seconds above floor) the target allows
    memory: list[dict[str, Any]] = field(default_factory=list)
    memory_limit_kb: int | None = None  # peak private memory allowed above the baseline
    notes: list[str] = field(default_factory=list)
    stated: bool = True  # False: the target is stated for 1 GB; this smaller size is shown for information

    @property
    def median(self) -> float:
        return statistics.median(self.seconds)

    @property
    def floor_median(self) -> float | None:
        return statistics.median(self.floor) if self.floor else None

    @property
    def ratio(self) -> float | None:
        f = self.floor_median
        return self.median / f if f else None

    def met(self) -> bool | None:
        if self.limit is None or self.floor_median is None:
            return None
        ok = (self.median <= self.floor_median + self.limit) if self.floor_offset else (self.ratio or 0) <= self.limit
        if self.memory_limit_kb is not None:
            ok = ok and self.anon_above_kb() <= self.memory_limit_kb
        return ok

    def anon_above_kb(self) -> int:
        return max((m["anon_peak_kb"] - m.get("anon_base_kb", 0) for m in self.memory), default=0)

    def memory_text(self) -> str:
        if not self.memory:
            return ""
        rss = max(m["rss_peak_kb"] for m in self.memory) / MIB
        if all("anon_base_kb" in m for m in self.memory):
            return f"+{self.anon_above_kb() / MIB:.0f} MiB anon, {rss:.0f} MiB rss"
        anon = max(m["anon_peak_kb"] for m in self.memory) / MIB
        return f"{anon:.0f} MiB anon, {rss:.0f} MiB rss"

    def to_json(self) -> dict[str, Any]:
        return {"operation": self.operation, "size": self.size, "seconds": self.seconds, "floor": self.floor,
                "median": self.median, "floor_median": self.floor_median, "ratio": self.ratio,
                "target": self.target, "met": self.met(), "target_applies": self.stated, "memory": self.memory,
                "notes": self.notes}


# -- processes --------------------------------------------------------------------------------


def child_env(home: Path | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("REGISTRY_") and k != "PYTHONDONTWRITEBYTECODE"}
    env["REGISTRY_USER"] = "bench"
    env["REGISTRY_HOME"] = str(home or OUT / "work" / "home")
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), *filter(None, [env.get("PYTHONPATH")])])
    return env


@dataclass
class Finished:
    seconds: float
    stdout: str
    memory: dict[str, Any]


def run(cmd: Sequence[str], env: dict[str, str], *, cwd: Path | None = None) -> Finished:
    """Run a process to its end: wall time, and peak RssAnon/VmRSS sampled from /proc every 2 ms."""
    os.sync()  # earlier writes are on disk: their writeback does not land inside this measurement
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        start = time.perf_counter()
        proc = subprocess.Popen(list(cmd), stdout=out, stderr=err, env=env, cwd=cwd)
        peak = {"anon_peak_kb": 0, "rss_peak_kb": 0}
        done = threading.Event()

        def sample() -> None:
            path = f"/proc/{proc.pid}/status"
            while not done.is_set():
                try:
                    with open(path, "rb") as f:
                        text = f.read().decode()
                except OSError:
                    return
                for line in text.splitlines():
                    if line.startswith("RssAnon:"):
                        peak["anon_peak_kb"] = max(peak["anon_peak_kb"], int(line.split()[1]))
                    elif line.startswith(("VmRSS:", "VmHWM:")):
                        peak["rss_peak_kb"] = max(peak["rss_peak_kb"], int(line.split()[1]))
                done.wait(0.002)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        _, status, usage = os.wait4(proc.pid, 0)
        seconds = time.perf_counter() - start
        proc.returncode = os.waitstatus_to_exitcode(status)
        done.set()
        sampler.join()
        peak["rss_peak_kb"] = max(peak["rss_peak_kb"], usage.ru_maxrss)  # Linux: kB
        out.seek(0)
        err.seek(0)
        stdout, stderr = out.read().decode(), err.read().decode()
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({proc.returncode}):\n{stderr[-3000:]}")
    return Finished(seconds, stdout, peak)


def child(task: str, args: dict[str, Any], env: dict[str, str]) -> dict[str, Any]:
    done = run([sys.executable, str(CHILD), task, json.dumps(args)], env)
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


def registry_cmd() -> list[str]:
    """The installed console script beside this interpreter (not a pyenv shim), else ``python -m cli``."""
    script = Path(sys.executable).with_name("registry")
    return [str(script)] if script.exists() else [sys.executable, "-m", "cli"]


# -- the benchmark ----------------------------------------------------------------------------


def parse_size(text: str) -> int:
    text = text.strip().upper().removesuffix("B")
    unit = UNITS.get(text[-1:], 1)
    return int(float(text.rstrip("KMG")) * unit)


def label(size: int) -> str:
    return f"{size / 10**9:g} GB" if size >= 10**9 else f"{size / 10**6:g} MB"


class Bench:
    def __init__(self, work: Path, repeat: int) -> None:
        self.work, self.repeat = work, repeat
        self.rows: list[Row] = []

    def say(self, text: str) -> None:
        print(f"[{time.strftime('%H:%M:%S')}] {text}", file=sys.stderr, flush=True)

    def model(self, size: int) -> dict[str, Any]:
        where = self.work / "models" / str(size)
        meta = where / "model.json"
        if meta.exists():
            info: dict[str, Any] = json.loads(meta.read_text())
        else:
            self.say(f"building the {label(size)} test model")
            width = 16 if size < 10**6 else 1024 if size <= 300 * 10**6 else 2048
            info = child("build", {"dir": str(where), "size": size, "width": width}, child_env())
        info["dir"] = str(where)
        return info

    def fresh(self, name: str) -> Path:
        path = self.work / "runs" / name
        shutil.rmtree(path, ignore_errors=True)
        path.mkdir(parents=True)
        return path

    # -- push ---------------------------------------------------------------------------------

    def push(self, size: int, m: dict[str, Any]) -> None:
        files = {"state_dict": f"{m['dir']}/state_dict.pt", "torchscript": f"{m['dir']}/torchscript.pt"}
        rows = {
            fmt: Row(f"push {fmt} (in process)", label(size), target="<=1.3x floor, +64 MiB",
                     limit=1.3, memory_limit_kb=64 * MIB, stated=size >= TARGET_SIZE)
            for fmt in files
        }
        cli = Row("registry push torchscript (process)", label(size), floor_offset=0.5, target="<=floor+0.5s",
                  limit=0.5, stated=size >= TARGET_SIZE)
        for i in range(self.repeat):
            self.say(f"push {label(size)} {i + 1}/{self.repeat}")
            for fmt, path in files.items():
                run_dir = self.fresh("push")
                r = child("push", {
                    "file": path, "format": fmt, "spec": f"{m['dir']}/spec.json" if fmt == "state_dict" else None,
                    "db": f"sqlite:///{run_dir}/registry.db", "storage": str(run_dir / "artifacts"),
                    "name": "bench", "floor_dir": str(run_dir / "artifacts" / "floor"), "floor_first": i % 2 == 0,
                }, child_env(run_dir / "home"))
                row = rows[fmt]
                row.seconds.append(r["op"]["seconds"])
                row.floor.append(r["floor"]["seconds"])
                row.memory.append(r["op"])
                if fmt == "torchscript" and r["torch_imported"]:
                    row.notes.append("torch was imported")
            run_dir = self.fresh("push")
            env = child_env(run_dir / "home")
            db, storage = f"sqlite:///{run_dir}/registry.db", str(run_dir / "artifacts")
            run([*registry_cmd(), "--db", db, "--storage", storage, "list"], env)  # schema created, not timed
            floor = child("copy_pass", {"file": files["torchscript"], "dest": f"{storage}/floor/floor.part",
                                        "fsync": True}, env)
            shutil.rmtree(f"{storage}/floor")
            done = run([*registry_cmd(), "-q", "--db", db, "--storage", storage, "push", "bench",
                        files["torchscript"]], env)
            cli.seconds.append(done.seconds)
            cli.floor.append(floor["op"]["seconds"])
            cli.memory.append(done.memory)
        self.rows += [*rows.values(), cli]

    # -- load ---------------------------------------------------------------------------------

    def setup(self, size: int, m: dict[str, Any]) -> tuple[Path, dict[str, Any]]:
        reg = self.work / "registries" / str(size)
        shutil.rmtree(reg, ignore_errors=True)
        reg.mkdir(parents=True)
        info = child("setup", {"db": f"sqlite:///{reg}/registry.db", "storage": str(reg / "artifacts"),
                               "name": "bench", "file": f"{m['dir']}/state_dict.pt",
                               "spec": f"{m['dir']}/spec.json"}, child_env(reg / "home"))
        time.sleep(2.2)  # a blob is recorded as verified only once its timestamps have settled
        return reg, info

    def load(self, size: int, m: dict[str, Any]) -> None:
        reg, info = self.setup(size, m)
        env = child_env(reg / "home")
        base = {"db": f"sqlite:///{reg}/registry.db", "storage": str(reg / "artifacts"), "ref": info["ref"]}
        floor_args = {"blob": info["blob"], "sha256": info["sha256"], "width": m["width"], "layers": m["layers"]}
        limit_kb = int(0.05 * m["state_dict_bytes"] / 1024)
        rows = {
            "first": Row("load state_dict (first: hashes the blob)", label(size), target="<=1.2x floor, +5%",
                         limit=1.2, memory_limit_kb=limit_kb, stated=size >= TARGET_SIZE),
            "recorded": Row("load state_dict (verified before)", label(size), target="<=1.2x floor, +5%",
                            limit=1.2, memory_limit_kb=limit_kb, stated=size >= TARGET_SIZE),
            "touch": Row("load state_dict + read every weight", label(size), target="<=1.2x floor, +5%",
                         limit=1.2, memory_limit_kb=limit_kb, stated=size >= TARGET_SIZE),
        }
        verified = reg / "home" / "verified"
        child("load", base, env)  # warm-up: page cache, bytecode, and the verification record
        for i in range(self.repeat):
            self.say(f"load {label(size)} {i + 1}/{self.repeat}")
            floor = child("load_floor", floor_args, env)["op"]
            floor_touch = child("load_floor", {**floor_args, "touch": True}, env)["op"]
            shutil.rmtree(verified, ignore_errors=True)
            first = child("load", base, env)["op"]
            recorded = child("load", base, env)["op"]
            touch = child("load", {**base, "touch": True}, env)["op"]
            for key, op, f in (("first", first, floor), ("recorded", recorded, floor), ("touch", touch, floor_touch)):
                rows[key].seconds.append(op["seconds"])
                rows[key].floor.append(f["seconds"])
                rows[key].memory.append(op)
        self.rows += rows.values()

    # -- pull ---------------------------------------------------------------------------------

    def pull(self, size: int, m: dict[str, Any]) -> None:
        reg, info = self.setup(size, m)
        env = child_env(reg / "home")
        base = {"db": f"sqlite:///{reg}/registry.db", "storage": str(reg / "artifacts"), "ref": info["ref"],
                "dest": str(reg / "pulled" / "model.pt")}
        rows = {
            "first": Row("pull (first: hashes the blob)", label(size), target="<=1.2x floor", limit=1.2,
                         stated=size >= TARGET_SIZE),
            "recorded": Row("pull (verified before)", label(size), target="<=1.2x floor", limit=1.2,
                            stated=size >= TARGET_SIZE),
        }
        verified = reg / "home" / "verified"
        child("pull", base, env)  # warm-up
        for i in range(self.repeat):
            self.say(f"pull {label(size)} {i + 1}/{self.repeat}")
            floor = child("copy_pass", {"file": info["blob"], "dest": str(reg / "pulled" / "floor.part"),
                                        "fsync": False}, env)["op"]
            shutil.rmtree(verified, ignore_errors=True)
            first = child("pull", base, env)
            recorded = child("pull", base, env)
            for key, op in (("first", first), ("recorded", recorded)):
                rows[key].seconds.append(op["op"]["seconds"])
                rows[key].floor.append(floor["seconds"])
                rows[key].memory.append(op["op"])
                if op["torch_imported"]:
                    rows[key].notes.append("torch was imported")
        self.rows += rows.values()

    # -- diff ---------------------------------------------------------------------------------

    def diff(self, size: int, m: dict[str, Any]) -> None:
        """Two versions differing in one tensor (state_dict vs safetensors): memory stays near one tensor pair."""
        reg = self.work / "registries" / f"diff-{size}"
        shutil.rmtree(reg, ignore_errors=True)
        reg.mkdir(parents=True)
        env = child_env(reg / "home")
        base = {"db": f"sqlite:///{reg}/registry.db", "storage": str(reg / "artifacts")}
        info = child("diff_setup", {**base, "name": "bench", "file": f"{m['dir']}/state_dict.pt",
                                    "spec": f"{m['dir']}/spec.json"}, env)
        pair_kb = 2 * 4 * (m["width"] * m["width"] + m["width"]) // 1024  # one weight and bias of each side
        row = Row("diff (one tensor changed)", label(size), target="<=3x naive, +2 tensors+64 MiB anon",
                  limit=3.0, memory_limit_kb=pair_kb + 64 * MIB)
        row.notes.append("floor: the naive diff (hash both, load both whole, compare); its peak memory is both "
                         "models; diff's mapped pages are given back after each pair, so its RSS stays near one pair")
        args = {**base, **info}
        child("diff", args, env)  # warm-up: page cache, bytecode, verification records
        for i in range(self.repeat):
            self.say(f"diff {label(size)} {i + 1}/{self.repeat}")
            pair = [("floor", "diff_floor"), ("op", "diff")]
            for kind, task in pair if i % 2 == 0 else pair[::-1]:
                op = child(task, args, env)["op"]
                if kind == "floor":
                    row.floor.append(op["seconds"])
                    row.notes.append(f"naive diff peak: {op['rss_peak_kb'] / MIB:.0f} MiB rss")
                else:
                    row.seconds.append(op["seconds"])
                    row.memory.append(op)
        self.rows.append(row)

    # -- metadata commands --------------------------------------------------------------------

    def meta(self, tiny: dict[str, Any]) -> None:
        reg = self.fresh("meta")
        env = child_env(reg / "home")
        db, storage = f"sqlite:///{reg}/registry.db", str(reg / "artifacts")
        cmd = [*registry_cmd(), "--db", db, "--storage", storage]
        for _ in range(3):
            run([*cmd, "push", "mlp", f"{tiny['dir']}/torchscript.pt"], env)
        commands = {
            "registry list": ["list"],
            "registry list NAME": ["list", "mlp"],
            "registry show NAME:1": ["show", "mlp:1"],
            "registry promote": None,  # alternates between two versions
            "registry history NAME": ["history", "mlp"],
        }
        rows = {name: Row(name, "-", target="<=1.6x floor", limit=1.6) for name in commands}
        floor_cmd = [sys.executable, "-c", "import sqlalchemy, click, fsspec"]
        for warm in (floor_cmd, [*cmd, "list"]):
            run(warm, env)
        rounds = max(3 * self.repeat, 9)  # a command takes a fraction of a second: more samples, steadier medians
        for i in range(rounds):
            self.say(f"metadata commands {i + 1}/{rounds}")
            for name, args in commands.items():
                args = args or ["promote", "mlp", "--version", str(1 + i % 2)]
                pair = [("floor", floor_cmd), ("op", [*cmd, *args])]
                for kind, c in pair if i % 2 == 0 else pair[::-1]:
                    done = run(c, env)
                    if kind == "floor":
                        rows[name].floor.append(done.seconds)
                    else:
                        rows[name].seconds.append(done.seconds)
                        rows[name].memory.append(done.memory)
        self.rows += rows.values()

    # -- scale --------------------------------------------------------------------------------

    def scale(self, tiny: dict[str, Any]) -> None:
        where: dict[int, Path] = {}
        for versions, models in SCALE:
            where[versions] = self.fresh(f"scale-{versions}")
            self.say(f"scale: a registry of {versions:,} versions and {models:,} models")
            child("make_scale", {"db_path": str(where[versions] / "registry.db"),
                                 "storage": str(where[versions] / "artifacts"),
                                 "file": f"{tiny['dir']}/torchscript.pt", "versions": versions,
                                 "models": models}, child_env(where[versions] / "home"))
        (small, _), (large, large_models) = SCALE
        size = f"{large // 1000}k v / {large_models // 1000}k m"
        rows: dict[str, Row] = {}
        statements: dict[str, dict[int, float]] = {}
        cli = Row("registry list NAME (process)", size, target="<=2x at 100 v", limit=2.0)
        for i in range(max(self.repeat, 5)):
            self.say(f"scale {i + 1}/{max(self.repeat, 5)}")
            for versions in (small, large) if i % 2 == 0 else (large, small):
                env = child_env(where[versions] / "home")
                db, storage = f"sqlite:///{where[versions]}/registry.db", str(where[versions] / "artifacts")
                result = child("scale", {"db": db, "storage": storage, "versions": versions, "iterations": 30}, env)
                for op, r in result.items():
                    every = op == "list (all models)"  # 10,000 models against 100: no target
                    row = rows.setdefault(op, Row(op, size, target="none: lists them all" if every else
                                                  "<=2x at 100 v", limit=None if every else 2.0))
                    (row.seconds if versions == large else row.floor).append(r["seconds"])
                    statements.setdefault(op, {})[versions] = r["statements_per_call"]
                done = run([*registry_cmd(), "--db", db, "--storage", storage, "list", "big"], env)
                (cli.seconds if versions == large else cli.floor).append(done.seconds)
        for op, row in rows.items():
            row.notes.append(f"SQL statements per call: {statements[op][small]:g} at {small} versions, "
                             f"{statements[op][large]:g} at {large:,}")
        self.rows += [*rows.values(), cli]

    # -- output -------------------------------------------------------------------------------

    def table(self) -> str:
        head = ("operation", "size", "median", "min-max", "floor", "ratio", "target", "met", "peak memory")
        lines = []
        for r in self.rows:
            f = r.floor_median
            met = r.met()
            ratio = "" if r.ratio is None else (f"{r.median - (f or 0):+.2f}s" if r.floor_offset else f"{r.ratio:.2f}x")
            verdict = {True: "yes", False: "NO", None: ""}[met]
            if met is not None and not r.stated:
                verdict = f"({verdict.lower()})"
            lines.append((
                r.operation, r.size, _secs(r.median), f"{_secs(min(r.seconds))}-{_secs(max(r.seconds))}",
                "" if f is None else _secs(f), ratio, r.target, verdict,
                r.memory_text(),
            ))
        widths = [max(len(str(x)) for x in col) for col in zip(head, *lines, strict=True)]
        fmt = lambda row: "  ".join(str(c).ljust(w) for c, w in zip(row, widths, strict=True)).rstrip()  # noqa: E731
        return "\n".join([fmt(head), fmt(tuple("-" * w for w in widths)), *map(fmt, lines)])


def _secs(s: float) -> str:
    return f"{s * 1000:.2f} ms" if s < 0.1 else f"{s:.3f} s"


def machine() -> dict[str, Any]:
    info: dict[str, Any] = {"cores": os.cpu_count(), "python": platform.python_version(),
                            "platform": platform.platform()}
    try:
        mem = Path("/proc/meminfo").read_text().splitlines()[0].split()[1]
        info["memory_gib"] = round(int(mem) / 1024**2, 1)
        cpu = [line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("model name")]
        info["cpu"] = cpu[0].split(":", 1)[1].strip() if cpu else None
    except OSError:
        pass
    for package in ("torch", "sqlalchemy", "click", "fsspec"):
        from importlib.metadata import version

        info[package] = version(package)
    try:
        info["commit"] = subprocess.run(["git", "-C", str(ROOT), "describe", "--always", "--dirty"],
                                        capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        pass
    return info


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", default=DEFAULT_SIZES, help=f"model sizes (default {DEFAULT_SIZES})")
    parser.add_argument("--repeat", type=int, default=5, help="fresh processes per operation (default 5)")
    parser.add_argument("--only", default=",".join(GROUPS), help=f"groups to run, of {','.join(GROUPS)}")
    parser.add_argument("--work", type=Path, default=OUT / "work", help="scratch directory (models are kept)")
    args = parser.parse_args(argv)
    groups = [g.strip() for g in args.only.split(",") if g.strip()]
    unknown = set(groups) - set(GROUPS)
    if unknown:
        parser.error(f"unknown groups: {', '.join(sorted(unknown))}")
    sizes = [parse_size(s) for s in args.sizes.split(",") if s.strip()]
    bench = Bench(args.work, args.repeat)
    started = dt.datetime.now(dt.UTC)
    steps: list[Callable[[], None]] = []
    tiny = bench.model(4096) if {"meta", "scale"} & set(groups) else None
    for size in sizes if {"push", "load", "pull", "diff"} & set(groups) else []:
        m = bench.model(size)
        for group in ("push", "load", "pull", "diff"):
            if group in groups:
                steps.append(lambda g=group, s=size, mm=m: getattr(bench, g)(s, mm))
    if "meta" in groups:
        steps.append(lambda: bench.meta(tiny or {}))
    if "scale" in groups:
        steps.append(lambda: bench.scale(tiny or {}))
    for step in steps:
        step()
    shutil.rmtree(args.work / "runs", ignore_errors=True)
    shutil.rmtree(args.work / "registries", ignore_errors=True)
    if importlib_find("mlflow"):
        bench.say("mlflow is importable, but the MLflow comparison is not implemented in this benchmark")
    else:
        bench.say("mlflow is not importable: no peer comparison (the issue's figures for MLflow are quoted in README)")
    table = bench.table()
    info = machine()
    print(f"\nregistry benchmark, {started:%Y-%m-%d %H:%M} UTC, {info.get('cores')} cores, "
          f"{info.get('memory_gib')} GiB, torch {info['torch']}, repeat {args.repeat}\n")
    print(table)
    if any(not r.stated for r in bench.rows):
        print("\n(yes)/(no): the push, load and pull targets are stated for 1 GB; smaller sizes, where fixed "
              "costs (imports, the SQLite commit) weigh more, are shown for information.")
    notes = [f"- {r.operation} ({r.size}): {n}" for r in bench.rows for n in dict.fromkeys(r.notes)]
    if notes:
        print("\n" + "\n".join(notes))
    OUT.mkdir(parents=True, exist_ok=True)
    doc = {"started": started.isoformat(), "machine": info, "repeat": args.repeat, "sizes": sizes,
           "rows": [r.to_json() for r in bench.rows], "table": table}
    path = OUT / f"bench-{started:%Y%m%dT%H%M%S}.json"
    path.write_text(json.dumps(doc, indent=2))
    (OUT / "latest.json").write_text(json.dumps(doc, indent=2))
    print(f"\nwritten {path.relative_to(ROOT)}")


def importlib_find(name: str) -> bool:
    from importlib.util import find_spec

    return find_spec(name) is not None


if __name__ == "__main__":
    main()
