"""A push killed with SIGKILL at each stage leaves the registry consistent; gc cleans up after it."""

from __future__ import annotations

import json
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import text

from registry import db as database
from tests.conftest import Cli
from tests.processes import model_files, registry_env, sha256, start, wait_for

#: What a push killed at each stage leaves behind in local storage.
ORPHAN = {"hashing": "partial", "uploaded": "blob", "before_commit": "blob"}


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    return model_files(tmp_path_factory.mktemp("models"), 2)


def paused_push(env: dict[str, str], stage: str, pause_file: Path, *args: str) -> subprocess.Popen[str]:
    """A ``registry push`` held at ``stage`` (see registry/_testhooks.py) until ``pause_file`` goes away."""
    proc = start(["-q", "--json", "push", *args],
                 {**env, "REGISTRY_TEST_PAUSE_AT": stage, "REGISTRY_TEST_PAUSE_FILE": str(pause_file)})
    wait_for(pause_file.exists, 60, what=f"push to pause at {stage}", procs=[proc])
    return proc


def files_under(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*") if p.is_file()}


def json_cli(cli: Cli, db_url: str, storage: Path) -> Callable[..., Any]:
    """``registry --json ARGS`` in this process (only the pushes that get killed need their own)."""
    def ok_json(args: list[str]) -> Any:
        return json.loads(cli.ok("--db", db_url, "--storage", str(storage), "--json", *args).stdout)
    return ok_json


@pytest.mark.parametrize("stage", sorted(ORPHAN))
def test_push_killed_at_stage_leaves_registry_consistent(
    db_url: str, tmp_path: Path, files: list[Path], stage: str, cli: Cli
) -> None:
    storage = tmp_path / "artifacts"
    env = registry_env(db_url, storage)
    ok_json = json_cli(cli, db_url, storage)
    kept, killed = files
    assert ok_json(["push", "net", str(kept)])["version"] == 1
    before = files_under(storage)

    proc = paused_push(env, stage, tmp_path / "paused", "net", str(killed))
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=30)
    assert proc.returncode == -signal.SIGKILL

    # Consistent: no version without its complete blob, and the killed push left no version.
    assert ok_json(["verify"]) == []
    assert [v["version"] for v in ok_json(["list", "net"])] == [1]
    left = files_under(storage) - before
    assert len(left) == 1, left  # exactly one orphan: the staging file, or the complete blob
    (orphan_path,) = left

    # Too young for the default grace of an hour: a push may still be about to commit it.
    assert ok_json(["gc", "--dry-run"]) == []
    assert ok_json(["gc"]) == []
    listed = ok_json(["gc", "--dry-run", "--grace", "0"])
    assert [g["kind"] for g in listed] == [ORPHAN[stage]]
    if ORPHAN[stage] == "blob":
        assert listed[0]["key"] == sha256(killed) and orphan_path.endswith(sha256(killed))
    else:
        assert orphan_path == f"tmp/{listed[0]['key']}"
    assert files_under(storage) - before == left  # a dry run removes nothing

    removed = ok_json(["gc", "--grace", "0"])
    assert [(g["kind"], g["key"], g["size"]) for g in removed] == [(g["kind"], g["key"], g["size"]) for g in listed]
    assert files_under(storage) == before
    assert ok_json(["gc", "--dry-run", "--grace", "0"]) == []

    # The registry carries on: the next push gets the next number (no gap) and its blob.
    again = ok_json(["push", "net", str(killed)])
    assert (again["version"], again["sha256"]) == (2, sha256(killed))
    assert ok_json(["verify"]) == []


def test_gc_removing_the_blob_of_a_push_in_flight_makes_the_push_store_it_again(
    db_url: str, tmp_path: Path, files: list[Path], cli: Cli
) -> None:
    # With --grace 0 gc may take the blob of a push that has stored it but not committed yet; the
    # push re-checks under the blob lock before committing and stores it again.
    storage = tmp_path / "artifacts"
    env = registry_env(db_url, storage)
    ok_json = json_cli(cli, db_url, storage)
    pause = tmp_path / "paused"
    proc = paused_push(env, "uploaded", pause, "net", str(files[0]))
    assert [g["key"] for g in ok_json(["gc", "--grace", "0"])] == [sha256(files[0])]
    pause.unlink()
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    assert '"version": 1' in out
    assert ok_json(["verify"]) == []
    assert ok_json(["gc", "--dry-run", "--grace", "0"]) == []


def test_gc_waits_for_a_committing_push_and_keeps_its_blob(
    db_url: str, tmp_path: Path, files: list[Path], cli: Cli
) -> None:
    storage = tmp_path / "artifacts"
    env = registry_env(db_url, storage)
    ok_json = json_cli(cli, db_url, storage)
    pause = tmp_path / "paused"
    proc = paused_push(env, "before_commit", pause, "net", str(files[0]))
    gc = start(["-q", "--json", "gc", "--grace", "0"], env)
    _wait_until_gc_blocks(db_url, gc)
    pause.unlink()
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    gc_out, gc_err = gc.communicate(timeout=90)
    assert gc.returncode == 0, gc_err
    assert gc_out.strip() == "[]"  # it saw the committed version under the lock: nothing removed
    assert ok_json(["verify"]) == []


def _wait_until_gc_blocks(db_url: str, gc: subprocess.Popen[str]) -> None:
    """Until gc waits for the lock the paused push holds (PostgreSQL shows it; SQLite: a moment)."""
    if not db_url.startswith("postgresql"):
        time.sleep(1.5)
        assert gc.poll() is None, "gc did not wait for the committing push"
        return
    engine = database.make_engine(db_url)
    try:
        def waiting() -> bool:
            with engine.connect() as conn:
                return bool(conn.execute(text(
                    "SELECT count(*) FROM pg_locks WHERE NOT granted AND locktype = 'advisory'"
                )).scalar())
        wait_for(waiting, 60, what="gc to wait for the blob lock", procs=[gc])
    finally:
        engine.dispose()
