from __future__ import annotations

from pathlib import Path

from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import inspect

from registry import db
from registry.models import Base


def test_schema_head_constant_matches_alembic() -> None:
    assert ScriptDirectory.from_config(db.alembic_config()).get_current_head() == db.SCHEMA_HEAD


def test_upgrade_empty_sqlite_then_down_and_up(tmp_path: Path) -> None:
    engine = db.make_engine(f"sqlite:///{tmp_path / 'm.db'}")
    assert db.current(engine) is None
    db.upgrade(engine)
    assert db.current(engine) == db.SCHEMA_HEAD
    with engine.connect() as conn:
        assert compare_metadata(MigrationContext.configure(conn), Base.metadata) == []
        assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
        assert conn.exec_driver_sql("PRAGMA foreign_keys").scalar() == 1
        assert conn.exec_driver_sql("PRAGMA busy_timeout").scalar() == db.SQLITE_BUSY_TIMEOUT_MS
    assert {"models", "versions", "aliases", "alias_events"} <= set(inspect(engine).get_table_names())
    db.downgrade(engine, "base")
    assert db.current(engine) is None
    assert set(inspect(engine).get_table_names()) <= {"alembic_version"}
    db.ensure_schema(engine)
    assert db.current(engine) == db.SCHEMA_HEAD
    engine.dispose()
