"""Alembic environment: the generic template, batch mode for SQLite, and a shared-connection hook.

The registry runs migrations in-process with ``config.attributes["connection"]`` set (Alembic
cookbook, "Sharing a Connection across one or more programmatic migration commands"); the
``alembic`` command line falls back to ``sqlalchemy.url`` or the registry's own settings.
"""

from __future__ import annotations

from alembic import context
from sqlalchemy import Connection

from registry.config import Settings
from registry.db import make_engine
from registry.models import Base

config = context.config
target_metadata = Base.metadata


def _url() -> str:
    return config.get_main_option("sqlalchemy.url") or Settings.resolve().db_url


def _configure(connection: Connection) -> None:
    # render_as_batch is a no-op outside SQLite, where ALTER TABLE needs a table copy.
    context.configure(connection=connection, target_metadata=target_metadata, render_as_batch=True)


def run_migrations_offline() -> None:
    context.configure(
        url=_url(),
        target_metadata=target_metadata,
        literal_binds=True,
        dialect_opts={"paramstyle": "named"},
        render_as_batch=True,
    )
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    shared = config.attributes.get("connection")
    if shared is not None:
        _configure(shared)
        with context.begin_transaction():
            context.run_migrations()
        return
    engine = make_engine(_url())
    try:
        with engine.connect() as connection:
            _configure(connection)
            with context.begin_transaction():
                context.run_migrations()
    finally:
        engine.dispose()


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
