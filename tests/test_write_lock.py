"""SQLite's write lock: BEGIN IMMEDIATE retried with backoff within a budget, and 64 pushing processes at once."""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from sqlalchemy import Engine, text
from sqlalchemy import exc as sa_exc

from registry import db
from tests.processes import model_files, ok_json, registry_env, sha256, wait_for

WRITERS = 64

#: A ``registry`` process that imports first, says so (argv[1]), then blocks on stdin until the
#: test closes it: 64 interpreters importing on 2 cores must not also poll for the start signal.
BARRIER = """
import sys
from pathlib import Path
import cli, registry.api
Path(sys.argv[1]).touch()
sys.stdin.read()
sys.argv = ["registry", *sys.argv[2:]]
cli.main()
"""


def _hold_write_lock(path: Path, seconds: float) -> threading.Thread:
    """Another connection takes the write lock and keeps it for ``seconds``."""
    taken = threading.Event()

    def hold() -> None:
        conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        conn.execute("BEGIN IMMEDIATE")
        taken.set()
        time.sleep(seconds)
        conn.execute("COMMIT")
        conn.close()

    thread = threading.Thread(target=hold)
    thread.start()
    taken.wait(10)
    return thread


def _engine(tmp_path: Path) -> tuple[Path, Engine]:
    path = tmp_path / "r.db"
    engine = db.make_engine(f"sqlite:///{path}")
    db.ensure_schema(engine)
    return path, engine


def test_writer_waits_for_the_lock_with_backoff_and_records_its_timing(tmp_path: Path) -> None:
    path, engine = _engine(tmp_path)
    holder = _hold_write_lock(path, 0.5)
    with db.watch_write_lock() as timings:
        with db.writer(engine).begin() as conn:
            conn.execute(text("SELECT 1"))
    holder.join()
    assert len(timings) == 1
    assert timings[0].waited >= 0.4 and timings[0].attempts > 1
    assert 0 <= timings[0].held < 5
    with engine.connect() as conn:
        # The short per-attempt timeout is not left behind for readers on the pooled connection.
        assert conn.exec_driver_sql("PRAGMA busy_timeout").scalar() == db.SQLITE_BUSY_TIMEOUT_MS
    engine.dispose()


def test_writer_gives_up_after_the_budget_with_a_one_line_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(db, "SQLITE_WRITE_BUDGET", 0.3)
    path, engine = _engine(tmp_path)
    holder = _hold_write_lock(path, 1.5)
    started = time.monotonic()
    with pytest.raises(sa_exc.OperationalError) as caught:
        with db.writer(engine).begin():
            pass
    assert 0.25 < time.monotonic() - started < 1.4
    holder.join()
    message = str(db.database_error(engine, caught.value))
    assert "database is locked: no write lock after" in message and "\n" not in message
    assert "use PostgreSQL" in message
    engine.dispose()


@pytest.mark.slow
def test_64_concurrent_pushes_on_sqlite_all_succeed_gapless(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    files = model_files(tmp_path / "models", WRITERS)
    env = registry_env(f"sqlite:///{tmp_path / 'registry.db'}", tmp_path / "artifacts")
    ready = [tmp_path / f"ready-{i}" for i in range(WRITERS)]
    # One pipe for all: every process blocks reading it, and closing its write end releases them at once.
    gate, release = os.pipe()
    procs = [subprocess.Popen([sys.executable, "-c", BARRIER, str(ready[i]), "-q", "--json", "push", "net", str(f)],
                              env=env, stdin=gate, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for i, f in enumerate(files)]
    os.close(gate)
    try:
        wait_for(lambda: all(r.exists() for r in ready), 300, what="64 processes to import", procs=procs)
        released = time.monotonic()
        os.close(release)
        release = -1
        results = [p.communicate(timeout=300) for p in procs]
        seconds = time.monotonic() - released
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.communicate()
        if release != -1:
            os.close(release)
    failed = [(p.returncode, err.strip()) for p, (_out, err) in zip(procs, results, strict=True)
              if p.returncode != 0 or err]
    assert failed == [], failed
    told = {json.loads(out)["version"]: json.loads(out)["sha256"] for out, _err in results}
    assert sorted(told) == list(range(1, WRITERS + 1))  # all 64, no gap, no duplicate
    assert sorted(told.values()) == sorted(sha256(f) for f in files)
    listed = ok_json(["list", "net", "--limit", "100"], env)
    assert {v["version"]: v["sha256"] for v in listed} == told
    with capsys.disabled():
        print(f"\n{WRITERS} concurrent pushes on sqlite: {seconds:.1f}s after release")
