"""SQL the API shares: resolving references, allocating versions, locking, and rows to records."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import select, text, update
from sqlalchemy.orm import Session

from registry.errors import NotFound
from registry.models import Alias, AliasEvent, Model, Version
from registry.records import AliasEvent as AliasEventRecord
from registry.records import Format, ModelVersion
from registry.refs import Ref


def aware(value: datetime) -> datetime:
    return value if value.tzinfo else value.replace(tzinfo=UTC)  # SQLite drops the zone


def lock_blob(s: Session, sha256: str) -> None:
    """Hold, until the transaction ends, the lock that orders pushes referencing a blob against its removal.

    Returns only once the lock is held, so the caller may then look at storage: a push checks that the
    blob exists, gc that nothing references it. ``s`` must be a writer session (``db.writer``).
    """
    if s.get_bind().dialect.name == "postgresql":
        s.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": int(sha256[:15], 16)})
        return
    # SQLite: the writer's BEGIN IMMEDIATE takes the database's write lock, but the session emits it
    # only with its first statement; until then storage would be checked with no lock held. Begin now.
    conn = s.connection()
    if conn.get_execution_options().get("sqlite_begin") != "IMMEDIATE":
        raise RuntimeError("lock_blob needs a writer session: a deferred SQLite transaction holds no lock")


def next_version(s: Session, name: str, now: datetime) -> tuple[int, int]:
    """Create the model if needed and allocate its next version number, in the caller's transaction."""
    # Only the dialect in use: importing sqlalchemy.dialects.postgresql costs a SQLite push ~50 ms.
    if s.get_bind().dialect.name == "postgresql":
        from sqlalchemy.dialects.postgresql import insert as pg_insert

        stmt: Any = pg_insert(Model)
    else:
        from sqlalchemy.dialects.sqlite import insert as sqlite_insert

        stmt = sqlite_insert(Model)
    s.execute(
        stmt.values(name=name, last_version=0, created_at=now)
        .on_conflict_do_nothing(index_elements=["name"])
    )
    # The UPDATE takes the model's row lock: concurrent pushes queue here and get gapless numbers.
    model_id, number = s.execute(
        update(Model).where(Model.name == name).values(last_version=Model.last_version + 1)
        .returning(Model.id, Model.last_version)
    ).one()
    return model_id, number


def get_model(s: Session, name: str, *, lock: bool = False) -> Model:
    query = select(Model).where(Model.name == name)
    if lock:
        query = query.with_for_update()
    model = s.scalar(query)
    if model is None:
        raise NotFound(name)
    return model


def resolve(s: Session, ref: Ref, *, model: Model | None = None) -> Version:
    model = model or get_model(s, ref.name)
    query = select(Version).where(Version.model_id == model.id)
    if ref.alias is not None:
        query = query.join(Alias, Alias.version_id == Version.id).where(
            Alias.model_id == model.id, Alias.name == ref.alias
        )
    elif ref.version is not None:
        query = query.where(Version.version == ref.version)
    else:
        query = query.order_by(Version.version.desc()).limit(1)
    row = s.scalar(query)
    if row is None:
        raise NotFound(ref.name, version=ref.version, alias=ref.alias)
    return row


def record(s: Session, row: Version, name: str) -> ModelVersion:
    aliases = s.scalars(select(Alias.name).where(Alias.version_id == row.id).order_by(Alias.name)).all()
    return to_record(row, name, list(aliases))


def to_record(row: Version, name: str, aliases: list[str]) -> ModelVersion:
    return ModelVersion(
        name=name, version=row.version, format=Format(row.format), sha256=row.sha256, size=row.size,
        created_at=aware(row.created_at), created_by=row.created_by, spec=row.spec,
        pickle_globals=tuple(row.pickle_globals or ()), description=row.description,
        tags=dict(row.tags or {}), aliases=tuple(sorted(aliases)), torch_version=row.torch_version,
        python_version=row.python_version, source=row.source, signature=row.signature,
        example_sha256=row.example_sha256,
        operators=tuple((row.program or {}).get("operators") or ()),
        code_problems=tuple((row.program or {}).get("problems") or ()),
    )


def event_record(e: AliasEvent, name: str) -> AliasEventRecord:
    return AliasEventRecord(name, e.alias, e.version, e.previous, aware(e.at), e.user, e.reason)
