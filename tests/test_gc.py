"""gc: the grace period (also for --dry-run), blobs in use are never removed, duration parsing."""

from __future__ import annotations

import json
import os
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest

from registry import Registry
from registry.config import parse_duration
from registry.errors import ConfigError
from tests.conftest import Cli
from tests.processes import model_files, sha256

HOUR = 3600


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    return model_files(tmp_path_factory.mktemp("models"), 3)


def age(path: Path, seconds: float) -> None:
    then = time.time() - seconds
    os.utime(path, (then, then))


def blob(storage: Path, sha: str) -> Path:
    return storage / "blobs" / "sha256" / sha[:2] / sha


def gc_json(cli: Cli, db_url: str, storage: Path, *args: str) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = json.loads(
        cli.ok("--db", db_url, "--storage", str(storage), "--json", "gc", *args).stdout)
    return out


@pytest.mark.parametrize(("text", "seconds"), [
    ("0", 0), ("90s", 90), ("30m", 1800), ("2h", 7200), ("1d", 86400), ("45", 45), ("1.5h", 5400), (" 2H ", 7200),
])
def test_parse_duration(text: str, seconds: int) -> None:
    assert parse_duration(text) == timedelta(seconds=seconds)


@pytest.mark.parametrize("text", ["", "soon", "-1s", "2w", "1h30m", "h"])
def test_parse_duration_refuses(text: str) -> None:
    with pytest.raises(ConfigError, match="invalid duration"):
        parse_duration(text)


def test_bad_grace_is_a_usage_error(cli: Cli) -> None:
    result = cli.run("gc", "--grace", "soon")
    assert result.exit_code == 2 and "Invalid value for --grace" in result.stderr
    assert "invalid duration 'soon'" in result.stderr


def test_gc_never_removes_a_blob_a_version_uses(db_url: str, tmp_path: Path, files: list[Path], cli: Cli) -> None:
    storage = tmp_path / "artifacts"
    with Registry(db=db_url, storage=storage) as reg:
        reg.push("a", files[0])
        reg.push("b", files[0])  # the same bytes: one blob, two users
        reg.push("a", files[1])
        reg.delete("b:1")  # one user left: the blob stays
    for sha in map(sha256, files[:2]):
        age(blob(storage, sha), 30 * 24 * HOUR)
    assert gc_json(cli, db_url, storage, "--grace", "0", "--dry-run") == []
    assert gc_json(cli, db_url, storage, "--grace", "0") == []
    assert all(blob(storage, sha256(f)).exists() for f in files[:2])
    with Registry(db=db_url, storage=storage) as reg:
        assert reg.verify() == []
        reg.delete("a:1")  # the last user: its blob goes with it
    assert not blob(storage, sha256(files[0])).exists()


PART = "0123456789abcdef0123456789abcdef.part"  # a staging file name: <uuid4 hex>.part


def test_grace_applies_to_gc_and_to_dry_run(db_url: str, tmp_path: Path, files: list[Path], cli: Cli) -> None:
    storage = tmp_path / "artifacts"
    with Registry(db=db_url, storage=storage) as reg:
        reg.push("a", files[0])
    # What killed pushes leave: a complete blob no version uses, and a staging file.
    orphan = blob(storage, sha256(files[1]))
    orphan.parent.mkdir(parents=True, exist_ok=True)
    orphan.write_bytes(files[1].read_bytes())
    age(orphan, 30 * 60)
    partial = storage / "tmp" / PART
    partial.write_bytes(b"half a model")
    age(partial, 3 * HOUR)
    stranger = storage / "tmp" / "notes.txt"  # not a staging file of ours: gc never touches it
    stranger.write_text("keep me")
    age(stranger, 3 * HOUR)
    age(blob(storage, sha256(files[0])), 3 * HOUR)

    def listed(*args: str) -> set[tuple[str, str]]:
        return {(g["kind"], g["key"]) for g in gc_json(cli, db_url, storage, *args)}

    assert listed("--dry-run") == {("partial", PART)}  # default grace: 1h
    assert listed("--dry-run", "--grace", "2h") == {("partial", PART)}
    assert listed("--dry-run", "--grace", "10m") == {("partial", PART), ("blob", sha256(files[1]))}
    assert listed("--dry-run", "--grace", "4h") == set()
    assert orphan.exists() and partial.exists()  # dry runs remove nothing

    assert listed() == {("partial", PART)}
    assert orphan.exists() and not partial.exists()
    assert listed("--grace", "90s") == {("blob", sha256(files[1]))}
    assert not orphan.exists() and blob(storage, sha256(files[0])).exists()
    assert listed("--grace", "0") == set()
    assert stranger.read_text() == "keep me"
    human = cli.ok("--db", db_url, "--storage", str(storage), "gc", "--grace", "30m").stdout
    assert human.strip() == "nothing to remove (grace 30m)"


def test_gc_lists_everything_before_it_removes_anything(db_url: str, tmp_path: Path, files: list[Path], cli: Cli,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    from registry.errors import StorageError
    from registry.localstore import LocalStore

    storage = tmp_path / "artifacts"
    orphans = [blob(storage, sha256(f)) for f in files[:2]]
    for path, source in zip(orphans, files[:2], strict=True):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(source.read_bytes())
        age(path, 2 * HOUR)

    def unlistable(self: LocalStore) -> Any:
        raise StorageError(f"cannot list storage {self.display_url}: injected", url=self.display_url)

    # A listing that fails is an error, and nothing has been removed yet.
    with monkeypatch.context() as patch:
        patch.setattr(LocalStore, "iter_partials", unlistable)
        cli.fails("--db", db_url, "--storage", str(storage), "gc", match="injected")
    assert all(p.exists() for p in orphans)

    # Once removing has begun, a removal that fails is a warning: the rest goes on, and gc exits 0.
    real_delete = LocalStore.delete

    def delete(self: LocalStore, sha: str) -> None:
        if sha == sha256(files[0]):
            raise StorageError(f"cannot delete storage {self.display_url}: injected", url=self.display_url)
        real_delete(self, sha)

    monkeypatch.setattr(LocalStore, "delete", delete)
    result = cli.ok("--db", db_url, "--storage", str(storage), "--json", "gc")
    data = json.loads(result.stdout)
    assert [(d["kind"], d["key"]) for d in data] == [("blob", sha256(files[1])), ("warning", sha256(files[0]))]
    assert data[1]["message"] == f"could not remove {sha256(files[0])}: cannot delete storage {storage}: injected"
    assert result.stderr == f"warning: {data[1]['message']}\n"
    assert orphans[0].exists() and not orphans[1].exists()
