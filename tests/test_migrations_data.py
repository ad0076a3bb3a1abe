"""Migrations with data on both databases: every row survives each step up and down; head matches the models."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from alembic.operations import Operations
from alembic.script import ScriptDirectory

from registry import Registry
from registry import db as database
from registry.errors import DatabaseError
from registry.models import Base

pytestmark = pytest.mark.fast  # in-process: part of `python -m pytest -m fast`

T0 = datetime(2025, 1, 2, 3, 4, 5, 123456, tzinfo=UTC)
SPEC = {"target": "torch.nn.Sequential", "args": [{"target": "torch.nn.Linear",
                                                    "kwargs": {"in_features": 4, "out_features": 2, "bias": True}}]}

#: The tables and columns of the first revision (0001): what every later revision must keep.
TABLES_0001 = {
    "models": sa.table("models", sa.column("id", sa.Integer), sa.column("name", sa.String),
                       sa.column("last_version", sa.Integer), sa.column("created_at", sa.DateTime(timezone=True))),
    "versions": sa.table(
        "versions", sa.column("id", sa.Integer), sa.column("model_id", sa.Integer), sa.column("version", sa.Integer),
        sa.column("format", sa.String), sa.column("sha256", sa.String), sa.column("size", sa.BigInteger),
        sa.column("spec", sa.JSON), sa.column("pickle_globals", sa.JSON), sa.column("description", sa.Text),
        sa.column("tags", sa.JSON), sa.column("created_at", sa.DateTime(timezone=True)),
        sa.column("created_by", sa.String), sa.column("torch_version", sa.String),
        sa.column("python_version", sa.String), sa.column("source", sa.String)),
    "aliases": sa.table("aliases", sa.column("model_id", sa.Integer), sa.column("name", sa.String),
                        sa.column("version_id", sa.Integer)),
    "alias_events": sa.table(
        "alias_events", sa.column("id", sa.Integer), sa.column("model_id", sa.Integer), sa.column("alias", sa.String),
        sa.column("version", sa.Integer), sa.column("previous", sa.Integer),
        sa.column("at", sa.DateTime(timezone=True)), sa.column("user", sa.String), sa.column("reason", sa.Text)),
}
KEYS = {"models": ("id",), "versions": ("id",), "aliases": ("model_id", "name"), "alias_events": ("id",)}


def revisions() -> list[str]:
    script = ScriptDirectory.from_config(database.alembic_config())
    return [r.revision for r in reversed(list(script.walk_revisions()))]


def fill(engine: sa.Engine) -> None:
    """Rows in every table, with the values that trip databases up: JSON, unicode, NULLs, time zones."""
    t = TABLES_0001
    with engine.begin() as conn:
        for name, last in [("net", 3), ("other.model-2", 1)]:
            conn.execute(sa.insert(t["models"]).values(name=name, last_version=last, created_at=T0))
        versions = [
            (1, 1, "state_dict", "a", SPEC, [], "première version ✓", {"team": "vision", "ü": "ß"}, "hf/source"),
            (1, 2, "full", "b", None, ["torch.nn.modules.linear.Linear", "collections.OrderedDict"], None, {}, None),
            (1, 3, "torchscript", "c", None, [], "", {"k": ""}, None),
            (2, 1, "full", "b", None, ["torch.nn.modules.linear.Linear"], None, {}, None),
        ]
        for model_id, number, fmt, sha, spec, globals_, desc, tags, source in versions:
            conn.execute(sa.insert(t["versions"]).values(
                model_id=model_id, version=number, format=fmt, sha256=sha * 64, size=1000 + number, spec=spec,
                pickle_globals=globals_, description=desc, tags=tags, created_at=T0, created_by="ana",
                torch_version="2.13.0", python_version=None if number == 3 else "3.11.7", source=source))
        conn.execute(sa.insert(t["aliases"]), [
            {"model_id": 1, "name": "production", "version_id": 2},
            {"model_id": 1, "name": "staging", "version_id": 3},
            {"model_id": 2, "name": "production", "version_id": 4},
        ])
        for model_id, alias, version, previous, reason in [
            (1, "production", 1, None, None), (1, "production", 2, 1, "better"),
            (1, "canary", 3, None, None), (1, "canary", None, 3, "demoted"),
        ]:
            conn.execute(sa.insert(t["alias_events"]).values(
                model_id=model_id, alias=alias, version=version, previous=previous, at=T0, user="bob", reason=reason))
        conn.execute(sa.insert(t["aliases"]).values(model_id=1, name="staging-old", version_id=1))


def snapshot(engine: sa.Engine) -> dict[str, list[dict[str, Any]]]:
    """Every row of the 0001 columns, with times made comparable (SQLite gives naive UTC back)."""
    out = {}
    with engine.connect() as conn:
        for name, table in TABLES_0001.items():
            query = sa.select(table).order_by(*(table.c[k] for k in KEYS[name]))
            out[name] = [{k: _utc(v) for k, v in row._mapping.items()} for row in conn.execute(query)]
    return out


def _utc(value: Any) -> Any:
    if isinstance(value, datetime) and value.tzinfo is None:
        return value.replace(tzinfo=UTC)
    return value


def assert_head_matches_models(engine: sa.Engine) -> None:
    with engine.connect() as conn:
        assert compare_metadata(MigrationContext.configure(conn), Base.metadata) == []


def test_every_row_survives_each_migration_up_and_down(db_url: str, tmp_path: Path) -> None:
    revs = revisions()
    engine = database.make_engine(db_url)
    try:
        database.upgrade(engine, revs[0])
        fill(engine)
        original = snapshot(engine)
        assert len(original["versions"]) == 4 and len(original["alias_events"]) == 4
        assert original["versions"][0]["spec"] == SPEC and original["versions"][0]["created_at"] == T0
        assert original["versions"][0]["description"] == "première version ✓"
        assert original["alias_events"][3]["version"] is None

        for _round in range(2):
            for rev in revs[1:]:
                database.upgrade(engine, rev)
                assert database.current(engine) == rev
                assert snapshot(engine) == original, f"rows changed by the upgrade to {rev}"
            assert database.current(engine) == database.SCHEMA_HEAD
            assert_head_matches_models(engine)
            for rev in reversed(revs[:-1]):
                database.downgrade(engine, rev)
                assert database.current(engine) == rev
                assert snapshot(engine) == original, f"rows changed by the downgrade to {rev}"

        database.upgrade(engine, "head")
        with Registry(db=db_url, storage=tmp_path / "artifacts") as reg:  # the API reads what 0001 wrote
            assert reg.get("net@production").version == 2
            assert reg.get("net:1").spec == SPEC and reg.get("net:1").tags == {"team": "vision", "ü": "ß"}
            assert [(e.version, e.previous) for e in reg.history("net")] == [(1, None), (2, 1), (3, None), (None, 3)]
            assert [m.name for m in reg.models()] == ["net", "other.model-2"]

        database.downgrade(engine, "base")
        assert database.current(engine) is None
        assert set(sa.inspect(engine).get_table_names()) <= {"alembic_version"}
        database.upgrade(engine, "head")
        assert_head_matches_models(engine)
        with Registry(db=db_url, storage=tmp_path / "artifacts") as reg:
            assert reg.models() == []
    finally:
        engine.dispose()


def test_sqlite_table_rebuild_keeps_referencing_rows(tmp_path: Path) -> None:
    # A batch migration rebuilds a SQLite table by copy, DROP and rename. With foreign keys on, the
    # DROP of `models` would cascade-delete every version, alias and event (and dropping `versions`
    # would fail on `aliases`), so migrations run with them off and check them before committing.
    engine = database.make_engine(f"sqlite:///{tmp_path / 'r.db'}")
    try:
        database.upgrade(engine, revisions()[0])
        fill(engine)
        database.upgrade(engine, "head")
        before = snapshot(engine)
        for table in ("models", "versions"):
            with database._migration_connection(engine) as cfg:
                ops = Operations(MigrationContext.configure(cfg.attributes["connection"]))
                with ops.batch_alter_table(table, recreate="always") as batch:
                    batch.alter_column("created_at", existing_type=sa.DateTime(timezone=True), nullable=False)
        assert snapshot(engine) == before
        with engine.connect() as conn:
            assert conn.exec_driver_sql("PRAGMA foreign_keys").scalar() == 1  # back on for everyone else

        with pytest.raises(DatabaseError, match="dangling foreign keys"):
            with database._migration_connection(engine) as cfg:
                cfg.attributes["connection"].exec_driver_sql("DELETE FROM models WHERE name = 'net'")
        assert snapshot(engine) == before  # rolled back
    finally:
        engine.dispose()
