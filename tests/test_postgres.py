"""The whole registry on PostgreSQL as on SQLite (same models, same migrations), and the CI skip rule."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from datetime import timedelta
from pathlib import Path

import pytest
from alembic.script import ScriptDirectory

from registry import Registry
from registry import db as database
from registry.errors import AliasConflict, AliasInUse, NotFound
from tests.conftest import ROOT, Cli
from tests.processes import model_files, sha256


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    return model_files(tmp_path_factory.mktemp("models"), 2)


def revisions() -> list[str]:
    """Every migration, oldest first."""
    script = ScriptDirectory.from_config(database.alembic_config())
    return [r.revision for r in reversed(list(script.walk_revisions()))]


def test_every_api_method_on_both_databases(db_url: str, tmp_path: Path, files: list[Path]) -> None:
    import torch

    with Registry(db=db_url, storage=tmp_path / "artifacts", user="ana") as reg:
        first = reg.push("net", files[0], description="première", tags={"team": "vision ü"}, alias="staging")
        second = reg.push("net", files[1])
        live = reg.push("lin", torch.nn.Linear(3, 2))  # state_dict with its captured spec (JSON)
        assert (first.version, second.version, live.version) == (1, 2, 1)
        for mv in (first, second, live):
            assert mv.created_at.utcoffset() == timedelta(0)  # timezone-aware on both databases

        got = reg.get("net:1")
        assert (got.description, got.tags, got.aliases, got.created_by) == ("première", {"team": "vision ü"},
                                                                            ("staging",), "ana")
        assert got.pickle_globals == first.pickle_globals and "torch.nn.modules.linear.Linear" in got.pickle_globals
        assert reg.get("lin").spec == live.spec and live.spec is not None
        assert reg.get("net").version == reg.get("net:latest").version == 2
        assert reg.get("net@staging").version == 1
        assert [(m.name, m.latest_version, m.version_count, m.aliases) for m in reg.models()] == [
            ("lin", 1, 1, {}), ("net", 2, 2, {"staging": 1})]
        assert [v.version for v in reg.versions("net", limit=1)] == [2]
        assert [v.version for v in reg.versions("net", before=2)] == [1]

        reg.promote("net", 2)
        reg.promote("net", 1, expect=2, reason="roll back")
        with pytest.raises(AliasConflict):
            reg.promote("net", 2, expect=None)
        reg.demote("net", "staging")
        history = reg.history("net")
        assert [(e.alias, e.version, e.previous, e.user) for e in history] == [
            ("staging", 1, None, "ana"), ("production", 2, None, "ana"), ("production", 1, 2, "ana"),
            ("staging", None, 1, "ana")]
        assert [e.at for e in history] == sorted(e.at for e in history)
        assert all(e.at.utcoffset() == timedelta(0) for e in history)

        pulled = reg.pull("net:2", dest=tmp_path)
        assert hashlib.sha256(pulled.read_bytes()).hexdigest() == sha256(files[1])
        model = reg.load("net:2")
        assert isinstance(model, torch.nn.Linear) and not model.training
        assert isinstance(reg.load("lin"), torch.nn.Linear)

        with pytest.raises(AliasInUse):
            reg.delete("net:1")
        reg.delete("net:1", force=True)
        with pytest.raises(NotFound):
            reg.get("net:1")
        assert reg.history("net")[-1].reason == "version 1 deleted"
        assert reg.push("net", files[0]).version == 3  # numbers are never reused
        assert reg.verify() == []
        assert reg.gc(grace=timedelta(0)) == []


def test_db_commands_on_both_databases(db_url: str, cli: Cli) -> None:
    revs = revisions()
    db = ("--db", db_url)

    def current() -> object:
        return json.loads(cli.ok(*db, "--json", "db", "current").stdout)

    assert current() == {"revision": None, "head": database.SCHEMA_HEAD}
    assert cli.ok(*db, "db", "upgrade", revs[0]).stdout.strip() == f"schema at {revs[0]}"
    assert current() == {"revision": revs[0], "head": database.SCHEMA_HEAD}
    assert json.loads(cli.ok(*db, "--json", "db", "upgrade").stdout) == {"revision": database.SCHEMA_HEAD}
    assert cli.ok(*db, "db", "current").stdout.strip() == f"{database.SCHEMA_HEAD} (head)"
    assert cli.ok(*db, "db", "downgrade", revs[0]).stdout.strip() == f"schema at {revs[0]}"
    assert cli.ok(*db, "db", "downgrade", "base").stdout.strip() == "schema at base"
    assert current() == {"revision": None, "head": database.SCHEMA_HEAD}
    cli.fails(*db, "db", "upgrade", "nonsense", match="cannot migrate to revision 'nonsense'")
    cli.fails(*db, "db", "downgrade", "nonsense", match="cannot migrate to revision 'nonsense'")
    cli.ok(*db, "db", "upgrade", "head")
    assert current() == {"revision": database.SCHEMA_HEAD, "head": database.SCHEMA_HEAD}


@pytest.mark.postgres
def test_unreachable_postgres_is_one_clear_error(cli: Cli, postgres_url: str) -> None:
    wrong = postgres_url.rsplit("/", 1)[0] + "/registry_no_such_database"
    result = cli.fails("--db", wrong, "list", match="registry_no_such_database")
    assert "error: database postgresql+psycopg://" in result.stderr


# -- the CI rule: with REGISTRY_TEST_REQUIRE_ALL=1 a skipped PostgreSQL/S3 test fails the run --------


def _pytest(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("REGISTRY_TEST_")}
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *args],
                          cwd=ROOT, env={**clean, **env}, capture_output=True, text=True, timeout=300)


TARGET = "tests/test_gc.py::test_bad_grace_is_a_usage_error"
PG_TARGET = "tests/test_postgres.py::test_unreachable_postgres_is_one_clear_error"


def test_without_a_server_postgres_tests_skip_with_the_reason() -> None:
    proc = _pytest("-rs", PG_TARGET)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "1 skipped" in proc.stdout
    assert "REGISTRY_TEST_POSTGRES_URL is not set" in proc.stdout


def test_require_all_fails_the_run_when_a_postgres_test_is_skipped() -> None:
    proc = _pytest(PG_TARGET, TARGET, REGISTRY_TEST_REQUIRE_ALL="1")
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "REGISTRY_TEST_REQUIRE_ALL=1 but 1 PostgreSQL/S3 tests were skipped" in proc.stdout
    assert PG_TARGET in proc.stdout
    passing = _pytest(TARGET, REGISTRY_TEST_REQUIRE_ALL="1")
    assert passing.returncode == 0, passing.stdout + passing.stderr
