"""gc racing pushes: no version is ever committed without its blob, on SQLite and PostgreSQL.

A push checks that its blobs exist and commits its version row holding the lock gc takes before it
removes a blob; gc re-checks, under that lock, that the blob is unused and still older than the grace.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import text

from registry import Registry
from registry import db as database
from registry.store import BlobInfo
from tests.conftest import S3, Cli, Storage
from tests.processes import model_files, ok_json, registry_env, sha256, start, wait_for
from tests.test_crash import json_cli, paused_push

HOUR = 3600


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    return model_files(tmp_path_factory.mktemp("models"), 2)


def blob_path(storage: Path, sha: str) -> Path:
    return storage / "blobs" / "sha256" / sha[:2] / sha


def age(path: Path, seconds: float) -> None:
    then = time.time() - seconds
    os.utime(path, (then, then))


def gc_at_the_lock(db_url: str, env: dict[str, str], reached: Path, *args: str) -> subprocess.Popen[str]:
    """A ``registry gc ARGS`` that has tried to take the lock of a blob it found unused.

    It stops just before (the ``removing`` stage), is let go at once, and is returned once it waits for
    the lock (PostgreSQL shows that in pg_locks; SQLite does not: it is given a moment) or has finished.
    """
    gc = start(["-q", "--json", "gc", *args],
               {**env, "REGISTRY_TEST_PAUSE_AT": "removing", "REGISTRY_TEST_PAUSE_FILE": str(reached)})
    wait_for(lambda: reached.exists() or gc.poll() is not None, 60, what="gc to find a blob to remove")
    reached.unlink(missing_ok=True)
    if not db_url.startswith("postgresql"):
        deadline = time.monotonic() + 1.5  # without the lock, gc is done in milliseconds
        while gc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.01)
        return gc
    engine = database.make_engine(db_url)
    try:
        def waiting() -> bool:
            with engine.connect() as conn:
                return bool(conn.execute(text(
                    "SELECT count(*) FROM pg_locks WHERE NOT granted AND locktype = 'advisory'"
                )).scalar())
        wait_for(lambda: gc.poll() is not None or waiting(), 60, what="gc to wait for the blob lock")
    finally:
        engine.dispose()
    return gc


def finish(proc: subprocess.Popen[str], what: str) -> str:
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, f"{what}: exit {proc.returncode}\n{err}"
    return out


def test_gc_at_the_race_point_cannot_take_the_blob_of_a_committing_push(
    db_url: str, tmp_path: Path, files: list[Path], cli: Cli
) -> None:
    # The push has checked, under the blob lock, that its blob exists, and is about to write its
    # version row. A `gc --grace 0s` now must wait for that lock (or leave the blob alone).
    storage = tmp_path / "artifacts"
    env = registry_env(db_url, storage)
    ok = json_cli(cli, db_url, storage)
    pause = tmp_path / "paused"
    push = paused_push(env, "checked", pause, "net", str(files[0]))
    gc = gc_at_the_lock(db_url, env, tmp_path / "gc-reached", "--grace", "0s")
    pause.unlink()
    assert json.loads(finish(push, "push"))["version"] == 1
    removed = json.loads(finish(gc, "gc"))
    assert sha256(files[0]) not in [g["key"] for g in removed]
    assert ok(["verify"]) == []
    assert blob_path(storage, sha256(files[0])).is_file()


@pytest.mark.parametrize("where", ["local", pytest.param("s3", marks=pytest.mark.s3)])
def test_an_old_orphan_pushed_again_survives_a_gc_at_the_race_point(
    db_url: str, tmp_path: Path, files: list[Path], cli: Cli, where: str, request: pytest.FixtureRequest
) -> None:
    # The bytes are already stored, as an orphan older than the grace (a killed push's, or a deleted
    # version's). A push of the same bytes reuses it; a gc listing it as garbage must not remove it.
    sha = sha256(files[0])
    if where == "local":
        storage = tmp_path / "artifacts"
        env = registry_env(db_url, storage)
        orphan = blob_path(storage, sha)
        orphan.parent.mkdir(parents=True)
        orphan.write_bytes(files[0].read_bytes())
        age(orphan, 2 * HOUR)
        grace: list[str] = []  # the default: an hour

        def stored() -> list[str]:
            return sorted(p.name for p in (storage / "blobs").rglob("*") if p.is_file())
    else:
        # S3 keeps its own LastModified (moto's cannot be set): a short grace, and an orphan older than it.
        s3: S3 = request.getfixturevalue("s3")
        env = {**os.environ, "REGISTRY_DB": db_url, "REGISTRY_STORAGE": s3.url,
               "REGISTRY_STORAGE_OPTIONS": json.dumps(s3.options)}
        s3.client.put_object(Bucket=s3.bucket, Key=s3.blob_key(sha), Body=files[0].read_bytes())
        time.sleep(2.5)
        grace = ["--grace", "2s"]

        def stored() -> list[str]:
            return [k.rsplit("/", 1)[-1] for k in s3.keys(f"{s3.blob_key(sha).rsplit('/', 3)[0]}/")]
    assert [(g["kind"], g["key"]) for g in ok_json(["gc", "--dry-run", *grace], env)] == [("blob", sha)]

    pause = tmp_path / "paused"
    push = paused_push(env, "checked", pause, "net", str(files[0]))
    gc = gc_at_the_lock(db_url, env, tmp_path / "gc-reached", *grace)
    pause.unlink()
    assert json.loads(finish(push, "push"))["sha256"] == sha
    assert json.loads(finish(gc, "gc")) == []
    assert ok_json(["verify"], env) == []
    assert stored() == [sha]


def test_gc_rechecks_the_age_of_a_blob_under_the_lock(
    storage: Storage, files: list[Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    # gc lists a blob as an old orphan; by the time it holds the lock, the blob is young again (a push
    # stored or touched it and is about to reference it). The listing is stale: gc keeps the blob.
    with Registry() as reg:
        blob = reg.store.put_file(files[1])
        stale = BlobInfo(blob.sha256, blob.size, time.time() - 2 * HOUR)
        monkeypatch.setattr(reg.store, "iter_blobs", lambda: iter([stale]))
        assert [g.key for g in reg.gc(dry_run=True)] == [blob.sha256]  # what the listing says
        assert reg.gc() == []
        assert reg.gc(grace=timedelta(hours=3)) == []
        assert storage.blobs() == [blob.sha256]


def test_a_push_reusing_an_old_local_blob_makes_it_young(registry: Registry, files: list[Path]) -> None:
    import torch

    # Example inputs already stored are reused as they are (not written again): the push touches them.
    first = registry.push("net", files[0], example_inputs=torch.ones(1, 4))
    assert first.example_sha256 is not None
    example = Path(registry.store.key(first.example_sha256))
    data = example.read_bytes()
    registry.delete("net:1")
    assert not example.exists()
    example.write_bytes(data)  # an orphan left by a killed push, long ago
    age(example, 2 * HOUR)
    inode = example.stat().st_ino
    again = registry.push("net", files[0], example_inputs=torch.ones(1, 4))
    assert again.example_sha256 == first.example_sha256
    assert example.stat().st_ino == inode and example.stat().st_mtime > time.time() - 60


#: A soak pusher: pushes (some with example inputs) and deletes its own versions at random until
#: the time is up, so blobs keep going from used to orphan and back while gc runs. Prints a summary.
#: A push may fail with no grace at all: gc takes its staging file, or its blob before every attempt
#: or before the push re-reads it (FileNotFoundError from ``sources.recheck``, outside the lock).
#: Then it commits nothing, which is allowed; a version without its blob is not.
PUSHER = """
import json, random, sys, time
import torch
from registry import Registry
from registry.errors import StorageError
db, storage, seed, seconds, *paths = sys.argv[1:]
rng = random.Random(int(seed))
pushed = deleted = failed = 0
with Registry(db=db, storage=storage) as reg:
    end = time.monotonic() + float(seconds)
    while time.monotonic() < end:
        example = torch.full((1, 4), float(rng.randrange(3))) if rng.random() < 0.3 else None
        try:
            mv = reg.push(rng.choice(["a", "b"]), rng.choice(paths), example_inputs=example)
        except (StorageError, FileNotFoundError):
            failed += 1
            continue
        pushed += 1
        if rng.random() < 0.6:
            reg.delete(mv.ref)
            deleted += 1
print(json.dumps({"pushed": pushed, "deleted": deleted, "failed": failed}))
"""

#: Runs gc with no grace over and over until the stop file appears; prints how many runs removed what.
COLLECTOR = """
import json, sys, time
from datetime import timedelta
from pathlib import Path
from registry import Registry
db, storage, stop = sys.argv[1:]
runs = removed = 0
with Registry(db=db, storage=storage) as reg:
    while not Path(stop).exists():
        removed += sum(g.kind == "blob" for g in reg.gc(grace=timedelta(0)))
        runs += 1
print(json.dumps({"runs": runs, "removed": removed}))
"""

SOAK_PUSHERS = 4
SOAK_SECONDS = 12


@pytest.mark.slow
def test_soak_pushes_deletes_and_gc_leave_no_version_without_its_blob(
    db_url: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    storage = tmp_path / "artifacts"
    paths = [str(p) for p in model_files(tmp_path / "models", 5)]  # repeated across pushers: shared blobs
    with Registry(db=db_url, storage=storage) as reg:
        reg.models()  # the schema exists before the processes start
    stop = tmp_path / "stop"
    pushers = [subprocess.Popen([sys.executable, "-c", PUSHER, db_url, str(storage), str(i), str(SOAK_SECONDS),
                                 *paths], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
               for i in range(SOAK_PUSHERS)]
    collector = subprocess.Popen([sys.executable, "-c", COLLECTOR, db_url, str(storage), str(stop)],
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        summaries: list[dict[str, Any]] = [json.loads(finish(p, "pusher")) for p in pushers]
        stop.touch()
        collected: dict[str, Any] = json.loads(finish(collector, "gc loop"))
    finally:
        stop.touch()
        for p in [*pushers, collector]:
            if p.poll() is None:
                p.kill()
            p.communicate()
    assert all(s["pushed"] > 0 for s in summaries), summaries
    assert collected["runs"] > 0

    env = registry_env(db_url, storage)
    assert ok_json(["verify"], env) == []
    loaded = 0
    with Registry(db=db_url, storage=storage) as reg:
        for model in reg.models():
            for mv in reg.versions(model.name):
                reg.load(mv.ref)
                if mv.example_sha256 is not None:
                    reg.example_inputs(mv.ref)
                loaded += 1
    assert loaded == sum(s["pushed"] - s["deleted"] for s in summaries)
    with capsys.disabled():
        print(f"\nsoak on {db_url.split(':')[0]}: {summaries}, gc {collected}, {loaded} versions load")
