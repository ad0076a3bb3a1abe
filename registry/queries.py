"""Every SQL statement the registry runs: a repository of named queries over a caller's session.

Each function takes an open :class:`Session` (the caller owns the transaction) and returns records or
plain values; ORM rows never leave the metadata layer except to the functions here that take them.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import AbstractContextManager
from datetime import UTC, datetime
from typing import Any, Protocol

from sqlalchemy import and_, delete, func, or_, select, text, update
from sqlalchemy.orm import Session

from registry.errors import AliasConflict, AliasInUse, NotFound
from registry.models import Alias, AliasEvent, Model, Version
from registry.records import AliasEvent as AliasEventRecord
from registry.records import Format, ModelSummary, ModelVersion
from registry.refs import Ref

#: ``expect=`` default of :func:`move_alias`: move unconditionally.
ANY = object()


class Sessions(Protocol):
    """Opens one transaction (``Registry._session``): a reader, or with ``write=True`` the writer."""

    def __call__(self, *, write: bool = False) -> AbstractContextManager[Session]: ...


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


# -- listing ----------------------------------------------------------------------------------


def models(s: Session) -> list[ModelSummary]:
    """Every model with its latest version and aliases, by name."""
    # Per model, through the (model_id, version) index: max() is one seek and count() reads only
    # that model's index entries. Columns, not ORM entities: 10,000 Model objects cost more than the SQL.
    mine = Version.model_id == Model.id
    latest = select(func.max(Version.version)).where(mine).scalar_subquery()
    count = select(func.count()).select_from(Version).where(mine).scalar_subquery()
    rows = s.execute(select(Model.id, Model.name, Model.created_at, latest, count).order_by(Model.name)).all()
    aliases: dict[int, dict[str, int]] = {}
    for model_id, alias_name, number in s.execute(
        select(Alias.model_id, Alias.name, Version.version).join(Version, Alias.version_id == Version.id)
    ):
        aliases.setdefault(model_id, {})[alias_name] = number
    return [
        ModelSummary(name, latest, count or 0, aliases.get(model_id, {}), aware(created))
        for model_id, name, created, latest, count in rows
    ]


def versions(s: Session, name: str, *, limit: int | None = None, before: int | None = None) -> list[ModelVersion]:
    """Versions of ``name``, newest first."""
    model = get_model(s, name)
    query = select(Version).where(Version.model_id == model.id).order_by(Version.version.desc())
    if before is not None:
        query = query.where(Version.version < before)
    if limit is not None:
        query = query.limit(limit)
    rows = s.scalars(query).all()
    by_version: dict[int, list[str]] = {}
    for alias_name, version_id in s.execute(select(Alias.name, Alias.version_id).where(Alias.model_id == model.id)):
        by_version.setdefault(version_id, []).append(alias_name)
    return [to_record(r, name, by_version.get(r.id, [])) for r in rows]


# -- committing a push ------------------------------------------------------------------------


def add_version(s: Session, name: str, now: datetime, **fields: Any) -> Version:
    """Insert the next version of ``name`` (created if new) with the given columns; returns its row."""
    model_id, number = next_version(s, name, now)
    row = Version(model_id=model_id, version=number, created_at=now, **fields)
    s.add(row)
    s.flush()
    return row


# -- aliases ----------------------------------------------------------------------------------


def move_alias(
    s: Session, model_id: int, name: str, alias: str, row: Version,
    *, user: str, reason: str | None, expect: int | None | object, now: datetime,
) -> AliasEventRecord:
    """Point ``alias`` at ``row`` (if it now points at ``expect``, unless that is :data:`ANY`), and record it."""
    current = s.get(Alias, (model_id, alias))
    previous = s.get_one(Version, current.version_id).version if current else None
    if expect is not ANY and expect != previous:
        raise AliasConflict(name, alias, expect if isinstance(expect, int) else None, previous)
    if current is None:
        s.add(Alias(model_id=model_id, name=alias, version_id=row.id))
    else:
        current.version_id = row.id
    return add_event(s, model_id, name, alias, row.version, previous, user=user, reason=reason, now=now)


def remove_alias(s: Session, name: str, alias: str, *, user: str, reason: str | None,
                 now: datetime) -> AliasEventRecord:
    """Remove ``alias`` from model ``name`` (locked), and record it."""
    model = get_model(s, name, lock=True)
    current = s.get(Alias, (model.id, alias))
    if current is None:
        raise NotFound(name, alias=alias)
    previous = s.get_one(Version, current.version_id).version
    s.delete(current)
    return add_event(s, model.id, name, alias, None, previous, user=user, reason=reason, now=now)


def add_event(
    s: Session, model_id: int, name: str, alias: str, version: int | None, previous: int | None,
    *, user: str, reason: str | None, now: datetime,
) -> AliasEventRecord:
    event = AliasEvent(model_id=model_id, alias=alias, version=version, previous=previous,
                       at=now, user=user, reason=reason)
    s.add(event)
    s.flush()
    return event_record(event, name)


def history(s: Session, name: str) -> list[AliasEventRecord]:
    """Every alias event of ``name``, oldest first."""
    model = get_model(s, name)
    rows = s.scalars(select(AliasEvent).where(AliasEvent.model_id == model.id).order_by(AliasEvent.id))
    return [event_record(e, name) for e in rows]


# -- deleting ---------------------------------------------------------------------------------


def delete_version(s: Session, ref: Ref, *, force: bool, user: str, now: datetime) -> ModelVersion:
    """Delete one version row (and, with ``force``, the aliases on it, recorded as demotions)."""
    model = get_model(s, ref.name, lock=True)
    row = resolve(s, ref, model=model)
    deleted = record(s, row, ref.name)
    if deleted.aliases and not force:
        raise AliasInUse(ref.name, row.version, deleted.aliases)
    for alias_name in deleted.aliases:
        s.execute(delete(Alias).where(Alias.model_id == model.id, Alias.name == alias_name))
        add_event(s, model.id, ref.name, alias_name, None, row.version, user=user,
                  reason=f"version {row.version} deleted", now=now)
    s.delete(row)
    return deleted


def blob_in_use(s: Session, sha256: str) -> bool:
    """Whether any version references ``sha256``, as its artifact or its example inputs."""
    users = select(Version.id).where(or_(Version.sha256 == sha256, Version.example_sha256 == sha256))
    return s.scalar(users.limit(1)) is not None


def used_blobs(s: Session) -> set[str]:
    """Every sha256 a version references."""
    used = set(s.scalars(select(Version.sha256).distinct()))
    used |= set(s.scalars(select(Version.example_sha256).where(Version.example_sha256.is_not(None)).distinct()))
    return used


# -- verifying --------------------------------------------------------------------------------


def artifact_page(s: Session, model_id: int | None, after: tuple[str, int] | None,
                  limit: int) -> Sequence[Any]:
    """Up to ``limit`` ``(id, name, version, sha256, size)`` rows ordered by blob, after ``(sha256, id)``."""
    query = select(Version.id, Model.name, Version.version, Version.sha256, Version.size).join(Model)
    if model_id is not None:
        query = query.where(Version.model_id == model_id)
    page = query.order_by(Version.sha256, Version.id).limit(limit)
    if after is not None:
        page = page.where(or_(Version.sha256 > after[0], and_(Version.sha256 == after[0], Version.id > after[1])))
    return s.execute(page).all()


def example_page(s: Session, model_id: int | None, after: int, limit: int) -> Sequence[Any]:
    """Up to ``limit`` ``(id, name, version, example_sha256, signature)`` rows with example inputs, after ``id``."""
    query = (select(Version.id, Model.name, Version.version, Version.example_sha256, Version.signature)
             .join(Model).where(Version.example_sha256.is_not(None)).order_by(Version.id).limit(limit))
    if model_id is not None:
        query = query.where(Version.model_id == model_id)
    return s.execute(query.where(Version.id > after)).all()
