"""verify at scale, on both databases: a line per problem, exit 1, --json, streamed in pages, each blob hashed once."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path

import pytest
from sqlalchemy import event, insert, select

from registry import Registry, maintenance
from registry.localstore import LocalStore
from registry.models import Model, Version
from tests.conftest import Cli
from tests.processes import model_files, sha256


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    return model_files(tmp_path_factory.mktemp("models"), 3)


@pytest.fixture
def counted_checks(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The sha256 of every blob verify hashes."""
    seen: list[str] = []
    original = LocalStore.check

    def check(self: LocalStore, sha256: str, size: int) -> tuple[str, str] | None:
        seen.append(sha256)
        return original(self, sha256, size)

    monkeypatch.setattr(LocalStore, "check", check)
    return seen


def blob(storage: Path, sha: str) -> Path:
    return storage / "blobs" / "sha256" / sha[:2] / sha


def test_verify_reports_every_problem(
    db_url: str, tmp_path: Path, files: list[Path], cli: Cli, counted_checks: list[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    storage = tmp_path / "artifacts"
    base = ("--db", db_url, "--storage", str(storage))
    with Registry(db=db_url, storage=storage) as reg:
        for name, f in [("a", files[0]), ("a", files[1]), ("b", files[0]), ("b", files[2])]:
            reg.push(name, f)
    assert cli.ok(*base, "verify").stdout == "all artifacts verified\n"
    assert json.loads(cli.ok(*base, "--json", "verify").stdout) == []

    shared, gone, grown = (blob(storage, sha256(f)) for f in files)
    data = bytearray(shared.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shared.write_bytes(bytes(data))
    gone.unlink()
    grown.write_bytes(grown.read_bytes() + b"!")

    monkeypatch.setattr(maintenance, "VERIFY_PAGE", 2)  # several pages even for four versions
    counted_checks.clear()
    result = cli.run(*base, "verify")
    assert result.exit_code == 1
    problems = result.stdout.splitlines()
    assert sorted(line.split(" ", 2)[:2] for line in problems) == [
        ["a:1", "corrupt:"], ["a:2", "missing:"], ["b:1", "corrupt:"], ["b:2", "size:"]]
    assert sorted(counted_checks) == sorted(sha256(f) for f in files)  # the shared blob once
    assert result.stderr == ""

    listed = json.loads(cli.run(*base, "--json", "verify").stdout)
    assert sorted((p["name"], p["version"], p["kind"]) for p in listed) == [
        ("a", 1, "corrupt"), ("a", 2, "missing"), ("b", 1, "corrupt"), ("b", 2, "size")]
    assert {p["sha256"] for p in listed if p["kind"] == "corrupt"} == {sha256(files[0])}
    assert cli.run(*base, "--json", "verify").exit_code == 1

    only_b = json.loads(cli.run(*base, "--json", "verify", "b").stdout)
    assert sorted((p["name"], p["version"]) for p in only_b) == [("b", 1), ("b", 2)]
    cli.fails(*base, "verify", "nobody", match="'nobody' not found")


def test_verify_streams_many_versions_in_pages(
    db_url: str, tmp_path: Path, files: list[Path], counted_checks: list[str], monkeypatch: pytest.MonkeyPatch,
) -> None:
    storage = tmp_path / "artifacts"
    count = 3000
    with Registry(db=db_url, storage=storage) as reg:
        blobs = [reg.push("seed", f) for f in files[:2]]
        for mv in blobs:
            blob(storage, mv.sha256).unlink()
        with reg._session(write=True) as s:
            model_id = s.scalar(select(Model.id).where(Model.name == "seed"))
            now = datetime.now(UTC)
            s.execute(insert(Version), [
                {"model_id": model_id, "version": n, "format": blobs[n % 2].format, "sha256": blobs[n % 2].sha256,
                 "size": blobs[n % 2].size, "pickle_globals": [], "tags": {}, "created_at": now,
                 "created_by": "bulk"}
                for n in range(3, count + 1)
            ])

        monkeypatch.setattr(maintenance, "VERIFY_PAGE", 100)
        queries: list[str] = []
        event.listen(reg._engine, "before_cursor_execute", lambda *a: queries.append(a[2]))
        counted_checks.clear()
        stream = reg.iter_problems()
        first = next(stream)
        assert first.kind == "missing"
        selects = [q for q in queries if "FROM versions" in q]
        assert len(selects) == 1  # the first problem comes out of the first page, before the rest is read
        rest = list(stream)
        assert 1 + len(rest) == count
        assert sorted(p.version for p in [first, *rest]) == list(range(1, count + 1))
        # 30 full pages, one short one, then one page of example-input blobs (none here).
        assert len([q for q in queries if "FROM versions" in q]) == count // 100 + 1 + 1
        assert sorted(counted_checks) == sorted(b.sha256 for b in blobs)  # 3000 versions, 2 blobs, 2 hashes


def test_verify_checks_example_input_blobs_too(registry: Registry, home: Path) -> None:
    import torch

    from tests.helpers import tutorial_model

    mv = registry.push("mlp", tutorial_model(), example_inputs=torch.randn(2, 128))
    assert mv.example_sha256 is not None and registry.verify() == []
    example = home / "artifacts" / "blobs" / "sha256" / mv.example_sha256[:2] / mv.example_sha256
    example.unlink()
    problems = registry.verify()
    assert [(p.name, p.version, p.sha256, p.kind) for p in problems] == [("mlp", 1, mv.example_sha256, "missing")]
    assert problems[0].detail.startswith("example inputs: ")
