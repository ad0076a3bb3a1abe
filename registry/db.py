"""Database engines (SQLite pragmas, PostgreSQL), sessions, and Alembic upgrades on first use."""

from __future__ import annotations

import importlib.util
import math
import os
import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

from sqlalchemy import Connection, Engine, create_engine, event, inspect, text
from sqlalchemy import exc as sa_exc
from sqlalchemy.engine import make_url
from sqlalchemy.orm import Session, sessionmaker

from registry.config import redact
from registry.errors import ConfigError, DatabaseError

if TYPE_CHECKING:
    from alembic.config import Config

#: The newest migration in ``migrations/versions``; a test checks it against Alembic's head.
SCHEMA_HEAD = "0003"
MIGRATIONS_DIR = Path(__file__).resolve().parent.parent / "migrations"
SQLITE_BUSY_TIMEOUT_MS = 60_000
#: Seconds PostgreSQL may take to accept a connection (libpq's connect_timeout) unless the URL sets
#: one; without it a server that never answers holds a command for minutes (TCP's own timeouts).
CONNECT_TIMEOUT = 10


def make_engine(url: str, *, timeout: float | None = None) -> Engine:
    """An engine for ``url``; SQLite gets WAL, a busy timeout, foreign keys and explicit BEGINs.

    ``timeout`` (``REGISTRY_TIMEOUT``) replaces the default PostgreSQL connect timeout of
    :data:`CONNECT_TIMEOUT` seconds; a ``connect_timeout`` in the URL wins over both. A SQLite file
    this process cannot write is opened read-only, so reading commands still work.

    Raises:
        ConfigError: the URL is not a usable SQLAlchemy URL.
    """
    try:
        parsed = make_url(url)
    except sa_exc.ArgumentError as e:
        raise ConfigError(f"invalid database URL {redact(url)!r}: expected a SQLAlchemy URL "
                          "such as sqlite:///path/registry.db or postgresql+psycopg://host/db") from e
    if parsed.drivername == "postgresql" and importlib.util.find_spec("psycopg2") is None:
        parsed = parsed.set(drivername="postgresql+psycopg")  # psycopg 3 is the driver we ship
    if parsed.get_backend_name() == "sqlite":
        return _sqlite_engine(parsed)
    connect_args: dict[str, Any] = {}
    if parsed.get_backend_name() == "postgresql" and "connect_timeout" not in parsed.query:
        # libpq counts whole seconds (psycopg waits at least 2).
        connect_args["connect_timeout"] = max(1, math.ceil(CONNECT_TIMEOUT if timeout is None else timeout))
    try:
        return create_engine(parsed, pool_pre_ping=True, connect_args=connect_args)
    except (sa_exc.ArgumentError, ImportError) as e:
        raise ConfigError(f"cannot use database URL {redact(url)!r}: {e}; "
                          "for PostgreSQL install the extra: pip install 'model-registry[postgres]'") from e


def _sqlite_engine(url: Any) -> Engine:
    extra: dict[str, Any] = {}
    if url.database and url.database != ":memory:" and not url.database.startswith("file:"):
        path = Path(url.database).expanduser()
        if path.is_file() and not os.access(path, os.W_OK):
            # Opened read-write, a file we may not write fails even to read ("unable to open database file").
            extra["creator"] = lambda: _read_only(path)
        else:
            try:
                path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)  # the registry's home: private to its user
            except OSError as e:
                shown = redact(url.render_as_string(hide_password=True))
                raise DatabaseError(f"database {shown} failed: cannot create the folder {path.parent}: "
                                    f"{e.strerror or e}", url=shown) from e
    engine = create_engine(url, connect_args={"timeout": SQLITE_BUSY_TIMEOUT_MS / 1000}, **extra)

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        # Take transaction control away from pysqlite so BEGIN is ours to emit (SQLAlchemy's
        # "Serializable isolation / Savepoints / Transactional DDL" recipe for pysqlite).
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        try:
            cursor.execute("PRAGMA journal_mode=WAL")
        except sqlite3.OperationalError:
            pass  # a read-only database (mode=ro) keeps the journal mode it has; reads work either way
        cursor.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.execute("PRAGMA synchronous=FULL")  # a committed push survives power loss
        cursor.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn: Any) -> None:
        # Writers take the write lock up front (BEGIN IMMEDIATE), so two pushes queue on the busy
        # timeout instead of failing when a read lock cannot be upgraded.
        mode = conn.get_execution_options().get("sqlite_begin", "DEFERRED")
        conn.exec_driver_sql(f"BEGIN {mode}")

    return engine


def _read_only(path: Path) -> sqlite3.Connection:
    """A read-only connection; ``immutable`` when not even WAL's shared-memory file can be created."""
    uri = f"file:{quote(path.absolute().as_posix())}?mode=ro"
    timeout = SQLITE_BUSY_TIMEOUT_MS / 1000
    try:
        conn = sqlite3.connect(uri, uri=True, timeout=timeout, check_same_thread=False)
        conn.execute("SELECT count(*) FROM sqlite_master").fetchall()
        return conn
    except sqlite3.OperationalError:
        # WAL needs -shm beside the file; in a folder we cannot write, only an immutable open reads it.
        return sqlite3.connect(uri + "&immutable=1", uri=True, timeout=timeout, check_same_thread=False)


def writer(engine: Engine) -> Engine:
    """The same engine, but its transactions take the write lock at BEGIN (SQLite)."""
    return engine.execution_options(sqlite_begin="IMMEDIATE")


def sessions(engine: Engine) -> sessionmaker[Session]:
    return sessionmaker(engine, expire_on_commit=False)


def current(engine: Engine) -> str | None:
    """The schema revision the database is at, or None for an empty database. Costs one query."""
    try:
        with engine.connect() as conn:
            try:
                row = conn.execute(text("SELECT version_num FROM alembic_version")).first()
            except (sa_exc.OperationalError, sa_exc.ProgrammingError):
                return None  # no alembic_version table: a new database
    except sa_exc.DBAPIError as e:
        raise database_error(engine, e) from e
    return None if row is None else str(row[0])


def ensure_schema(engine: Engine) -> None:
    """Bring the database to :data:`SCHEMA_HEAD` if (and only if) it is behind."""
    if current(engine) == SCHEMA_HEAD:
        return
    from alembic import command

    with _migration_connection(engine) as cfg, _revision_errors("head"):
        # Processes starting together on a new database queue for the migration lock; all but the
        # first find the work done, and skip loading the migration scripts while holding the lock.
        if _revision_in(cfg.attributes["connection"]) != SCHEMA_HEAD:
            command.upgrade(cfg, "head")


def _revision_in(conn: Connection) -> str | None:
    if not inspect(conn).has_table("alembic_version"):
        return None
    value = conn.execute(text("SELECT version_num FROM alembic_version")).scalar()
    return None if value is None else str(value)


def upgrade(engine: Engine, revision: str = "head") -> None:
    """Run Alembic migrations up to ``revision``, serialised against other processes doing the same."""
    from alembic import command

    with _migration_connection(engine) as cfg, _revision_errors(revision):
        command.upgrade(cfg, revision)


def downgrade(engine: Engine, revision: str) -> None:
    """Run Alembic migrations down to ``revision`` (``base`` empties the schema)."""
    from alembic import command

    with _migration_connection(engine) as cfg, _revision_errors(revision):
        command.downgrade(cfg, revision)


def alembic_config() -> Config:
    """Alembic configuration built in code: works from any directory an installed registry runs in."""
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
    return cfg


@contextmanager
def _migration_connection(engine: Engine) -> Iterator[Config]:
    cfg = alembic_config()
    try:
        with writer(engine).connect() as conn:
            sqlite = conn.dialect.name == "sqlite"
            if sqlite:
                # Batch mode rebuilds a table by copy, DROP and rename; with foreign keys on, that DROP
                # would cascade-delete every referencing row (Alembic batch docs). The pragma is a
                # no-op inside a transaction, so it goes before BEGIN; the check below replaces it.
                _sqlite_pragma(conn, "foreign_keys=OFF")
            try:
                with conn.begin():
                    if conn.dialect.name == "postgresql":
                        # Two processes starting on a new database must not both create the tables.
                        conn.execute(text("SELECT pg_advisory_xact_lock(7305001)"))
                    cfg.attributes["connection"] = conn
                    yield cfg
                    if sqlite:
                        broken = conn.exec_driver_sql("PRAGMA foreign_key_check").fetchall()
                        if broken:
                            raise DatabaseError(
                                f"migration left {len(broken)} rows with dangling foreign keys "
                                f"(first: {tuple(broken[0])}); rolled back",
                                url=redact(engine.url.render_as_string(hide_password=True)))
            finally:
                if sqlite:
                    _sqlite_pragma(conn, "foreign_keys=ON")
    except sa_exc.DBAPIError as e:
        raise database_error(engine, e) from e


def _sqlite_pragma(conn: Connection, pragma: str) -> None:
    cursor = conn.connection.dbapi_connection.cursor()  # type: ignore[union-attr]
    try:
        cursor.execute(f"PRAGMA {pragma}")
    finally:
        cursor.close()


@contextmanager
def _revision_errors(revision: str) -> Iterator[None]:
    from alembic.util import CommandError

    try:
        yield
    except CommandError as e:
        raise ConfigError(f"cannot migrate to revision {revision!r}: {e}; "
                          f"revisions are base, head, or 0001..{SCHEMA_HEAD}") from e


def database_error(engine: Engine, e: sa_exc.DBAPIError) -> DatabaseError:
    """The one-line error for a failed database call: URL without its password, the driver's first line."""
    url = redact(engine.url.render_as_string(hide_password=True))
    reason = str(e.orig).strip().splitlines()[0] if e.orig is not None else type(e).__name__
    if "readonly database" in reason or "read-only" in reason:
        return DatabaseError(f"database {url} is read-only: {reason}; reading commands work, for this one "
                             "use a database you can write", url=url)
    if "disk is full" in reason or "No space left" in reason:
        return DatabaseError(f"database {url} failed: no space left on the device holding it ({reason}); "
                             "free space there", url=url)
    return DatabaseError(f"database {url} failed: {reason}", url=url)
