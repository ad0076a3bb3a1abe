"""Reliability soak: writers, readers, a looping gc and SIGKILLs, then the invariants. Exits 1 if one fails.

    python bench/soak.py --seconds 60 --db sqlite --storage local
    python bench/soak.py --seconds 60 --db postgres            # REGISTRY_TEST_POSTGRES_URL or --postgres-url
    python bench/soak.py --seconds 60 --storage s3             # a moto server on 127.0.0.1, started here
    python bench/soak.py --seconds 30 --writers 64 --readers 0 --kill-every 0 --gc-every 0   # write load only

For ``--seconds``, ``--writers`` processes push small distinct whole-model files (``nn.Linear``,
2.4 kB) in a loop to ``--models`` names, ``--readers`` processes load or pull random versions, one
process runs ``gc`` (with ``--gc-grace``, longer than any push) every ``--gc-every`` seconds, and
every ``--kill-every`` seconds a random writer gets SIGKILL and is started again. Then every
process is stopped and these must hold:

- versions of each model are exactly 1..N (a killed push leaves no gap: the number is allocated
  in the transaction that commits the row), and each push a writer was told succeeded is there
  with its sha256;
- no push or read failed (only killed writers may lose a push);
- ``registry verify`` is clean, and after ``registry gc --grace 0s`` a dry run finds nothing more,
  and (local storage) the storage holds exactly the referenced blobs.

It prints one table: pushes/s, reads/s, p50/p99 push and read latency, the SQLite write lock's
wait and hold time per push (``registry.db.watch_write_lock``), kills and failures. Everything
lives in a temporary directory (a PostgreSQL database of its own, dropped at the end).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
POSTGRES_DEFAULT = "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"
S3_BUCKET = "soak"
S3_CREDENTIALS = {"AWS_ACCESS_KEY_ID": "soak-key-id", "AWS_SECRET_ACCESS_KEY": "soak-secret",
                  "AWS_DEFAULT_REGION": "us-east-1"}
#: Seconds each worker gets to finish its current operation once asked to stop.
STOP_SECONDS = 60.0


# -- workers: one process each, one JSON line per operation on stdout -----------------------------


def _ready(args: argparse.Namespace) -> None:
    """Say the imports are done, then wait for the conductor's start (a restarted writer goes on at once)."""
    _emit(op="ready", ok=True)
    go = Path(args.stop).with_name("go")
    while not go.exists():
        time.sleep(0.02)


def _emit(**fields: Any) -> None:
    sys.stdout.write(json.dumps(fields) + "\n")
    sys.stdout.flush()


def writer(args: argparse.Namespace) -> None:
    from registry import Registry
    from registry import db as database

    files = sorted(Path(args.files).glob("*.pt"))
    mine = files[args.index::args.writers] or files
    model = f"m{args.index % args.models}"
    stop = Path(args.stop)
    position = random.randrange(len(mine))  # a restarted writer does not replay the same files
    with Registry() as reg, database.watch_write_lock() as locks:
        reg.models()  # imports done and the schema there: the clock may start
        _ready(args)
        while not stop.exists():
            path = mine[position % len(mine)]
            position += 1
            started = time.monotonic()
            try:
                mv = reg.push(model, path)
            except Exception as e:  # reported and counted: the soak fails on any
                _emit(op="push", ok=False, error=f"{type(e).__name__}: {e}")
                continue
            lock = locks[-1] if locks else None
            _emit(op="push", ok=True, model=model, version=mv.version, sha256=mv.sha256,
                  seconds=time.monotonic() - started, waited=lock.waited if lock else None,
                  held=lock.held if lock else None, attempts=lock.attempts if lock else None)
            locks.clear()


def reader(args: argparse.Namespace) -> None:
    from registry import Registry

    stop = Path(args.stop)
    out = Path(tempfile.mkdtemp(prefix="pull-"))
    try:
        with Registry() as reg:
            import torch  # noqa: F401  (loading needs it; imported before the clock starts)

            reg.models()
            _ready(args)
            while not stop.exists():
                name = f"m{random.randrange(args.models)}"
                started = time.monotonic()
                try:
                    versions = reg.versions(name, limit=50)
                except LookupError:  # nothing pushed to this name yet
                    time.sleep(0.05)
                    continue
                ref = f"{name}:{random.choice(versions).version}"
                op = random.choice(("load", "pull"))
                try:
                    if op == "load":
                        reg.load(ref)
                    else:
                        reg.pull(ref, dest=out / "model.pt", force=True)
                except Exception as e:
                    _emit(op=op, ok=False, error=f"{ref}: {type(e).__name__}: {e}")
                    continue
                _emit(op=op, ok=True, seconds=time.monotonic() - started)
    finally:
        shutil.rmtree(out, ignore_errors=True)


def collector(args: argparse.Namespace) -> None:
    from datetime import timedelta

    from registry import Registry

    stop = Path(args.stop)
    with Registry() as reg:
        reg.models()
        _ready(args)
        while not stop.exists():
            started = time.monotonic()
            try:
                removed = reg.gc(grace=timedelta(seconds=args.gc_grace))
            except Exception as e:
                _emit(op="gc", ok=False, error=f"{type(e).__name__}: {e}")
            else:
                _emit(op="gc", ok=True, removed=len(removed), warnings=[w.message for w in removed.warnings],
                      seconds=time.monotonic() - started)
            while time.monotonic() - started < args.gc_every and not stop.exists():
                time.sleep(0.1)


WORKERS = {"writer": writer, "reader": reader, "gc": collector}


# -- the conductor -------------------------------------------------------------------------------


@dataclass
class Worker:
    role: str
    index: int
    proc: subprocess.Popen[str]
    thread: threading.Thread
    log: Path


@dataclass
class Soak:
    args: argparse.Namespace
    env: dict[str, str]
    work: Path
    events: list[dict[str, Any]] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    kills: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)

    def start(self, role: str, index: int) -> Worker:
        a = self.args
        cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", role, "--index", str(index),
               "--writers", str(a.writers), "--models", str(a.models), "--files", str(self.work / "files"),
               "--stop", str(self.work / "stop"), "--gc-every", str(a.gc_every), "--gc-grace", str(a.gc_grace)]
        log = self.work / "logs" / f"{role}-{index}-{uuid.uuid4().hex[:6]}.log"
        log.parent.mkdir(exist_ok=True)
        with open(log, "w") as err:  # a file, not a pipe nobody reads: a chatty worker must not block
            proc = subprocess.Popen(cmd, env=self.env, stdout=subprocess.PIPE, stderr=err, text=True, cwd=self.work)
        thread = threading.Thread(target=self._read, args=(proc,), daemon=True)
        thread.start()
        return Worker(role, index, proc, thread, log)

    def _read(self, proc: subprocess.Popen[str]) -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            try:
                event = json.loads(line)
            except json.JSONDecodeError:  # cut short by SIGKILL
                continue
            event["at"] = time.monotonic()
            with self.lock:
                self.events.append(event)

    def run(self) -> list[str]:
        """Run the load for ``--seconds``; returns the invariants that failed."""
        a = self.args
        writers = [self.start("writer", i) for i in range(a.writers)]
        others = [self.start("reader", i) for i in range(a.readers)]
        if a.gc_every > 0:
            others.append(self.start("gc", 0))
        everyone = [*writers, *others]
        ready_by = time.monotonic() + STOP_SECONDS * 5
        while self._count("ready") < len(everyone):  # 25 interpreters importing share the CPUs
            dead = [w for w in everyone if w.proc.poll() is not None]
            if dead or time.monotonic() > ready_by:
                for w in everyone:
                    w.proc.kill()
                raise SystemExit(f"workers did not start: {[self._stderr(w) for w in dead][:3]}")
            time.sleep(0.05)
        (self.work / "go").touch()
        self.t0 = time.monotonic()
        deadline = self.t0 + a.seconds
        next_kill = self.t0 + a.kill_every if a.kill_every > 0 else float("inf")
        while time.monotonic() < deadline:
            time.sleep(0.05)
            for w in [*writers, *others]:
                if w.proc.poll() is not None:  # a worker must not die on its own
                    self.errors.append(f"{w.role} {w.index} exited {w.proc.returncode}: {self._stderr(w)}")
                    self._replace(writers if w.role == "writer" else others, w)
            if time.monotonic() >= next_kill:
                victim = random.choice(writers)
                victim.proc.send_signal(signal.SIGKILL)
                victim.proc.wait()
                self.kills += 1
                self._replace(writers, victim)
                next_kill += a.kill_every
        self.elapsed = time.monotonic() - self.t0
        (self.work / "stop").touch()
        for w in [*writers, *others]:
            try:
                w.proc.wait(timeout=STOP_SECONDS)
            except subprocess.TimeoutExpired:
                w.proc.kill()
                w.proc.wait()
                self.errors.append(f"{w.role} {w.index} did not stop within {STOP_SECONDS:.0f} s")
            w.thread.join(timeout=10)
            if w.proc.returncode != 0:
                self.errors.append(f"{w.role} {w.index} exited {w.proc.returncode}: {self._stderr(w)}")
        return self.check()

    def _count(self, op: str) -> int:
        with self.lock:
            return sum(1 for e in self.events if e["op"] == op)

    def _replace(self, pool: list[Worker], old: Worker) -> None:
        old.thread.join(timeout=10)
        pool[pool.index(old)] = self.start(old.role, old.index)

    @staticmethod
    def _stderr(w: Worker) -> str:
        return (w.log.read_text(errors="replace").strip().splitlines() or [""])[-1]

    def cli(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "cli", *args], env=self.env, capture_output=True, text=True,
                              timeout=600, cwd=ROOT)

    def check(self) -> list[str]:
        from registry import Registry

        failed = list(self.errors)
        failed += [f"{e['op']} failed: {e['error']}" for e in self.events if not e["ok"]]
        told = [e for e in self.events if e["op"] == "push" and e["ok"]]
        with Registry() as reg:
            stored = {m.name: {v.version: v.sha256 for v in reg.versions(m.name)} for m in reg.models()}
        for name, versions in sorted(stored.items()):
            if sorted(versions) != list(range(1, len(versions) + 1)):
                missing = sorted(set(range(1, max(versions) + 1)) - set(versions))
                failed.append(f"{name}: versions are not gapless: missing {missing[:10]}")
        for e in told:
            if stored.get(e["model"], {}).get(e["version"]) != e["sha256"]:
                failed.append(f"{e['model']}:{e['version']} was pushed (sha256 {e['sha256'][:12]}) but is not stored")
        verify = self.cli("--json", "verify")
        if verify.returncode != 0:
            failed.append(f"registry verify exited {verify.returncode}: {verify.stdout.strip()[:300]} "
                          f"{verify.stderr.strip()[:300]}")
        gc = self.cli("--json", "gc", "--grace", "0s")
        if gc.returncode != 0:
            failed.append(f"registry gc --grace 0s exited {gc.returncode}: {gc.stderr.strip()[:300]}")
        left = self.cli("--json", "gc", "--grace", "0s", "--dry-run")
        if left.returncode != 0 or json.loads(left.stdout or "[]"):
            failed.append(f"orphans after gc --grace 0s: {left.stdout.strip()[:300]} {left.stderr.strip()[:300]}")
        if self.args.storage == "local":
            used = {sha for versions in stored.values() for sha in versions.values()}
            files = {p.name for p in (self.work / "artifacts").rglob("*") if p.is_file()}
            if files != used:
                failed.append(f"storage holds {len(files - used)} unreferenced files "
                              f"({sorted(files - used)[:3]}) and lacks {len(used - files)} referenced blobs")
        self.stored = stored
        return failed

    def table(self) -> str:
        def pct(values: list[float], q: float) -> str:
            if not values:
                return "-"
            ordered = sorted(values)
            return f"{ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000:.0f} ms"

        pushes = [e for e in self.events if e["op"] == "push" and e["ok"]]
        reads = [e for e in self.events if e["op"] in ("load", "pull") and e["ok"]]
        failures = [e for e in self.events if not e["ok"]]
        waited = [e["waited"] for e in pushes if e.get("waited") is not None]
        held = [e["held"] for e in pushes if e.get("held") is not None]
        gcs = [e for e in self.events if e["op"] == "gc" and e["ok"]]
        a = self.args
        rows = [
            ("setup", f"{a.db} + {a.storage}, {a.writers} writers, {a.readers} readers, {self.elapsed:.0f} s, "
                      f"{os.cpu_count()} CPUs"),
            ("pushes", f"{len(pushes)} ({len(pushes) / self.elapsed:.1f}/s), "
                       f"{sum(len(v) for v in self.stored.values())} versions in {len(self.stored)} models"),
            ("push latency", f"p50 {pct([e['seconds'] for e in pushes], 0.5)}, "
                             f"p99 {pct([e['seconds'] for e in pushes], 0.99)}, "
                             f"max {pct([e['seconds'] for e in pushes], 1.0)}"),
            ("reads", f"{len(reads)} ({len(reads) / self.elapsed:.1f}/s), p50 "
                      f"{pct([e['seconds'] for e in reads], 0.5)}, p99 {pct([e['seconds'] for e in reads], 0.99)}"),
            ("write lock wait", f"p50 {pct(waited, 0.5)}, p99 {pct(waited, 0.99)}, max {pct(waited, 1.0)}"
             if waited else "- (PostgreSQL: row locks)"),
            ("write lock held", f"p50 {pct(held, 0.5)}, p99 {pct(held, 0.99)}, max {pct(held, 1.0)}"
             if held else "-"),
            ("gc runs", f"{len(gcs)}, removed {sum(e['removed'] for e in gcs)}"),
            ("kills", str(self.kills)),
            ("failures", str(len(failures) + len(self.errors))),
        ]
        width = max(len(k) for k, _ in rows)
        return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


def make_files(directory: Path, count: int) -> None:
    """``count`` distinct whole-model pickles of ``nn.Linear(4, 2)``: pushing one needs no torch."""
    import torch

    directory.mkdir(parents=True)
    for i in range(count):
        torch.manual_seed(i)
        torch.save(torch.nn.Linear(4, 2), directory / f"m{i:05d}.pt")


@contextmanager
def database(kind: str, work: Path, postgres_url: str) -> Iterator[str]:
    if kind == "sqlite":
        yield f"sqlite:///{work / 'registry.db'}"
        return
    from sqlalchemy import create_engine
    from sqlalchemy.engine import make_url

    server = make_url(postgres_url)
    admin = create_engine(server, isolation_level="AUTOCOMMIT")
    name = f"registry_soak_{uuid.uuid4().hex[:10]}"
    with admin.connect() as conn:
        conn.exec_driver_sql(f'CREATE DATABASE "{name}"')
    try:
        yield server.set(database=name).render_as_string(hide_password=False)
    finally:
        with admin.connect() as conn:
            conn.exec_driver_sql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        admin.dispose()


@contextmanager
def storage(kind: str, work: Path) -> Iterator[dict[str, str]]:
    """Environment variables for the storage: a folder, or a bucket on a moto server on loopback."""
    if kind == "local":
        yield {"REGISTRY_STORAGE": str(work / "artifacts")}
        return
    import logging

    import boto3  # type: ignore[import-untyped]
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    try:
        host, port = server.get_host_and_port()
        endpoint = f"http://{host}:{port}"
        boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1",
                     aws_access_key_id=S3_CREDENTIALS["AWS_ACCESS_KEY_ID"],
                     aws_secret_access_key=S3_CREDENTIALS["AWS_SECRET_ACCESS_KEY"]).create_bucket(Bucket=S3_BUCKET)
        yield {"REGISTRY_STORAGE": f"s3://{S3_BUCKET}/registry", **S3_CREDENTIALS,
               "REGISTRY_STORAGE_OPTIONS": json.dumps({"endpoint_url": endpoint}),
               "AWS_CONFIG_FILE": str(work / "no-aws-config"), "AWS_SHARED_CREDENTIALS_FILE": str(work / "no-aws")}
    finally:
        server.stop()


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seconds", type=float, default=60.0, help="how long the load runs")
    p.add_argument("--db", choices=("sqlite", "postgres"), default="sqlite", help="metadata database")
    p.add_argument("--storage", choices=("local", "s3"), default="local", help="artifact storage (s3: moto)")
    p.add_argument("--postgres-url", default=os.environ.get("REGISTRY_TEST_POSTGRES_URL") or POSTGRES_DEFAULT,
                   help="a PostgreSQL server on which to create (and drop) a database for the soak")
    p.add_argument("--writers", type=int, default=16, help="pushing processes")
    p.add_argument("--readers", type=int, default=8, help="loading/pulling processes")
    p.add_argument("--models", type=int, default=4, help="model names the writers share")
    p.add_argument("--files", default="", help=argparse.SUPPRESS)
    p.add_argument("--file-count", type=int, default=2000, help="distinct model files to push (then reused)")
    p.add_argument("--kill-every", type=float, default=3.0, help="seconds between SIGKILLs of a writer; 0: none")
    p.add_argument("--gc-every", type=float, default=2.0, help="seconds between gc runs; 0: no gc process")
    p.add_argument("--gc-grace", type=float, default=30.0, help="gc's grace in seconds while pushes run")
    p.add_argument("--keep", action="store_true", help="keep the working directory and print its path")
    p.add_argument("--worker", choices=sorted(WORKERS), help=argparse.SUPPRESS)
    p.add_argument("--index", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--stop", default="", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    if args.worker:
        sys.path.insert(0, str(ROOT))  # a checkout: `registry` and `cli` import from here
        WORKERS[args.worker](args)
        return 0
    work = Path(tempfile.mkdtemp(prefix="registry-soak-"))
    try:
        make_files(work / "files", max(args.file_count, args.writers))
        with database(args.db, work, args.postgres_url) as db_url, storage(args.storage, work) as store_env:
            env = {k: v for k, v in os.environ.items() if not k.startswith(("REGISTRY_", "AWS_"))}
            env.update(store_env, REGISTRY_DB=db_url, REGISTRY_HOME=str(work / "home"), REGISTRY_USER="soak",
                       PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
            os.environ.update(env)  # the final checks use the same registry in this process
            for var in [k for k in os.environ if k.startswith(("REGISTRY_", "AWS_")) and k not in env]:
                del os.environ[var]
            soak = Soak(args, env, work)
            failed = soak.run()
            print(soak.table())
    finally:
        if args.keep:
            print(f"working directory: {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    distinct: dict[str, int] = {}
    for line in failed:  # one line per distinct failure: a broken reader fails thousands of times alike
        key = line.split(": ", 2)[-1] if line.startswith(("load", "pull")) else line
        distinct[key] = distinct.get(key, 0) + 1
    for line, count in list(distinct.items())[:20]:
        print(f"FAILED ({count}x): {line}" if count > 1 else f"FAILED: {line}")
    print("invariants: " + ("FAILED" if failed else "ok (gapless versions, verify clean, nothing orphaned)"))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
