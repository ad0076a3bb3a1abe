"""Database engines (SQLite pragmas, PostgreSQL), sessions, and Alembic upgrades on first use."""

from __future__ import annotations

import importlib.util
import math
import os
import random
import sqlite3
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
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
MIGRATIONS_DIR = next(p / "migrations" for p in Path(__file__).resolve().parents[:2] if (p / "migrations").is_dir())
#: SQLite's busy timeout for readers (and the rest of a write transaction once it holds the lock).
SQLITE_BUSY_TIMEOUT_MS = 60_000
#: Seconds a writer keeps retrying ``BEGIN IMMEDIATE`` before "database is locked" (the total budget).
SQLITE_WRITE_BUDGET = 60.0
#: SQLite's busy handler gets this long per attempt; then the writer sleeps a jittered backoff.
SQLITE_LOCK_ATTEMPT_MS = 5
#: Backoff before attempt n: uniform in [0, min(CAP, BASE * 2**n)] seconds (full jitter). The cap is
#: a few write-lock hold times (a push holds it ~20-30 ms), so a waiter's polling rate stays high.
SQLITE_LOCK_BACKOFF_BASE = 0.001
SQLITE_LOCK_BACKOFF_CAP = 0.05
#: Seconds PostgreSQL may take to accept a connection (libpq's connect_timeout) unless the URL sets
#: one; without it a server that never answers holds a command for minutes (TCP's own timeouts).
CONNECT_TIMEOUT = 10


def make_engine(url: str, *, timeout: float | None = None) -> Engine:
    """An engine for ``url``; SQLite gets WAL, a busy timeout, foreign keys and explicit BEGINs.

    On SQLite a :func:`writer` transaction retries ``BEGIN IMMEDIATE`` with jittered backoff for
    up to :data:`SQLITE_WRITE_BUDGET` seconds (see :func:`_begin_immediate`).

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
                          "for PostgreSQL install the extra: pip install 'torch-model-registry[postgres]'") from e


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
    if url.database and "creator" not in extra and url.database != ":memory:" and not url.database.startswith("file:"):
        _read_on_full_disk(engine, Path(url.database).expanduser(),
                           redact(url.render_as_string(hide_password=True)))

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
        # Writers take the write lock up front (BEGIN IMMEDIATE), so two pushes queue for it instead
        # of failing when a read lock cannot be upgraded.
        if conn.get_execution_options().get("sqlite_begin") == "IMMEDIATE":
            _begin_immediate(conn)
        else:
            conn.exec_driver_sql("BEGIN DEFERRED")

    @event.listens_for(engine, "checkin")
    def _on_checkin(_dbapi_connection: Any, record: Any) -> None:
        # The pool takes the connection back after COMMIT or ROLLBACK: the write lock is released.
        acquired = record.info.pop(_LOCK_INFO, None)
        if acquired is not None and _watchers:
            timing = LockTiming(waited=acquired[1], held=time.monotonic() - acquired[0], attempts=acquired[2])
            for watcher in _watchers:
                watcher.append(timing)

    return engine


def _begin_immediate(conn: Connection) -> None:
    """``BEGIN IMMEDIATE``, retried with jittered exponential backoff for :data:`SQLITE_WRITE_BUDGET` s.

    SQLite's own busy handler is unfair: a writer that has waited long polls every 100 ms, while a
    newcomer polls after 1, 2 and 5 ms and usually wins, so under sustained load a few pushes were
    starved past the 60 s timeout while the lock was held for milliseconds at a time. Each attempt
    here gives SQLite's handler only :data:`SQLITE_LOCK_ATTEMPT_MS`, then sleeps a random time up
    to a cap of :data:`SQLITE_LOCK_BACKOFF_CAP` s: every waiter polls at the same rate whatever its
    age, so each release goes to a waiter picked about at random, and none waits for ever.
    """
    dbapi = conn.connection.dbapi_connection
    assert dbapi is not None  # a connection inside its begin event is checked out
    started = time.monotonic()
    deadline = started + SQLITE_WRITE_BUDGET
    attempts = 0
    dbapi.execute(f"PRAGMA busy_timeout={SQLITE_LOCK_ATTEMPT_MS}")
    try:
        while True:
            attempts += 1
            try:
                dbapi.execute("BEGIN IMMEDIATE")
                break
            except sqlite3.OperationalError as e:
                busy = (getattr(e, "sqlite_errorcode", 0) & 0xFF) == sqlite3.SQLITE_BUSY
                now = time.monotonic()
                if not busy or now >= deadline:
                    orig = e if not busy else sqlite3.OperationalError(
                        f"database is locked: no write lock after {attempts} attempts in {now - started:.0f} s")
                    raise sa_exc.OperationalError("BEGIN IMMEDIATE", None, orig) from e
                cap = min(SQLITE_LOCK_BACKOFF_CAP, SQLITE_LOCK_BACKOFF_BASE * 2 ** min(attempts, 16))
                time.sleep(min(random.uniform(0, cap), max(0.0, deadline - now)))
    finally:
        # Readers sharing this pooled connection keep the full timeout (WAL checkpoints, recovery).
        dbapi.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
    acquired = time.monotonic()
    conn.info[_LOCK_INFO] = (acquired, acquired - started, attempts)


@dataclass(frozen=True, slots=True)
class LockTiming:
    """One SQLite write transaction: seconds waited for the write lock, seconds held, BEGIN attempts."""

    waited: float
    held: float
    attempts: int


_LOCK_INFO = "registry_write_lock"
_watchers: list[list[LockTiming]] = []


@contextmanager
def watch_write_lock() -> Iterator[list[LockTiming]]:
    """Collect a :class:`LockTiming` for every SQLite write transaction this process ends in the block.

    ``held`` runs from the moment ``BEGIN IMMEDIATE`` succeeds to the moment the pool takes the
    connection back after COMMIT (or ROLLBACK), so it includes the commit's fsync. Used by
    ``bench/soak.py`` and the tests; costs nothing outside the block.
    """
    timings: list[LockTiming] = []
    _watchers.append(timings)
    try:
        yield timings
    finally:
        _watchers.remove(timings)


#: Free bytes below which a failing open is blamed on the disk: WAL's index (-shm) grows by 32 KiB.
_SHM_ROOM = 64 * 1024
_NO_SPACE = "registry_no_space"


def _read_on_full_disk(engine: Engine, path: Path, shown: str) -> None:
    """On a full filesystem, open ``path`` immutable (reads work) or fail with "no space left on DIR".

    Reading a WAL database needs its ``-shm`` index to grow, so with no free space even ``list``
    failed with "disk I/O error". When the WAL is empty (every commit is in the main file, as after
    the last connection closed) an immutable open reads the same data without ``-shm``. Such a
    connection is used for one checkout only, then replaced, so it never serves stale reads for long;
    a write on it fails with the same "no space left" error.
    """

    @event.listens_for(engine, "do_connect")
    def _connect(dialect: Any, record: Any, cargs: Any, cparams: Any) -> Any:
        conn = dialect.loaded_dbapi.connect(*cargs, **cparams)
        try:
            conn.execute("SELECT count(*) FROM sqlite_master").fetchall()
            return conn
        except sqlite3.OperationalError as e:
            conn.close()
            if (getattr(e, "sqlite_errorcode", 0) & 0xFF) != sqlite3.SQLITE_IOERR or not _disk_full(path.parent):
                raise
            wal = path.with_name(path.name + "-wal")
            if wal.exists() and wal.stat().st_size > 0:  # commits not yet in the main file: no safe read
                raise _no_space(shown, path) from e
        record.info[_NO_SPACE] = 0
        uri = f"file:{quote(path.absolute().as_posix())}?mode=ro&immutable=1"
        return sqlite3.connect(uri, uri=True, timeout=SQLITE_BUSY_TIMEOUT_MS / 1000, check_same_thread=False)

    @event.listens_for(engine, "checkout")
    def _checkout(_dbapi_connection: Any, record: Any, _proxy: Any) -> None:
        if _NO_SPACE in record.info:
            record.info[_NO_SPACE] += 1
            if record.info[_NO_SPACE] > 1:  # the pool reconnects: space may be back, others may have written
                raise sa_exc.DisconnectionError("immutable fallback connection used once")

    @event.listens_for(engine, "begin")
    def _begin(conn: Connection) -> None:
        if _NO_SPACE in conn.info and conn.get_execution_options().get("sqlite_begin") == "IMMEDIATE":
            raise _no_space(shown, path)


def _disk_full(folder: Path) -> bool:
    try:
        st = os.statvfs(folder)
    except OSError:
        return False
    return st.f_bavail * st.f_frsize < _SHM_ROOM


def _no_space(shown: str, path: Path) -> DatabaseError:
    return DatabaseError(f"database {shown} failed: no space left on {path.parent} (SQLite needs room for its "
                         "WAL files there); free space there", url=shown)


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
    if "database is locked" in reason:
        return DatabaseError(f"database {url} failed: {reason}; other processes kept its write lock busy: "
                             "push again, and for many concurrent writers use PostgreSQL", url=url)
    return DatabaseError(f"database {url} failed: {reason}", url=url)
