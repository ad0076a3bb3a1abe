"""The Registry facade: push, pull, load, look up and promote model versions."""

from __future__ import annotations

import os
import platform
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sqlalchemy import delete, func, select
from sqlalchemy import exc as sa_exc
from sqlalchemy.orm import Session

from registry import db as database
from registry import queries
from registry.config import Settings
from registry.errors import (
    AliasConflict,
    AliasInUse,
    AlreadyExists,
    DatabaseError,
    FormatError,
    NotFound,
    SpecError,
    StorageError,
)
from registry.models import Alias, AliasEvent, Model, Version
from registry.records import AliasEvent as AliasEventRecord
from registry.records import Format, Garbage, ModelSummary, ModelVersion, Problem
from registry.refs import parse_ref, validate_name
from registry.store import Blob, BlobStore

if TYPE_CHECKING:
    import torch

#: ``expect=`` default: promote unconditionally.
ANY = object()
PUSH_ATTEMPTS = 3
#: Orphans younger than this may belong to a push that has not committed yet.
DEFAULT_GRACE = timedelta(hours=1)


class Registry:
    """A model registry: metadata in a SQL database, artifacts in fsspec storage.

    Args:
        db: SQLAlchemy URL of the metadata database (default ``REGISTRY_DB``, else
            ``sqlite:///$REGISTRY_HOME/registry.db``).
        storage: fsspec URL or path of the artifact store (default ``REGISTRY_STORAGE``, else
            ``$REGISTRY_HOME/artifacts``).
        storage_options: passed to fsspec (endpoint, credentials); default ``REGISTRY_STORAGE_OPTIONS``.
        trusted_modules: module prefixes besides ``torch.nn`` whose classes specs and pickles may
            name (default ``REGISTRY_TRUSTED_MODULES``, comma separated).
        user: recorded with pushes and promotions (default ``REGISTRY_USER``, else the login name).

    Example:
        >>> reg = Registry()
        >>> mv = reg.push("mlp", model)            # state_dict + captured spec
        >>> reg.promote("mlp", mv.version)         # -> production
        >>> model = reg.load("mlp@production")
    """

    def __init__(
        self,
        db: str | None = None,
        storage: str | os.PathLike[str] | None = None,
        *,
        storage_options: Mapping[str, Any] | None = None,
        trusted_modules: Sequence[str] | None = None,
        user: str | None = None,
    ) -> None:
        self.settings = Settings.resolve(
            db=db, storage=storage, storage_options=storage_options,
            trusted_modules=trusted_modules, user=user,
        )
        self._engine = database.make_engine(self.settings.db_url)
        self._reader = database.sessions(self._engine)
        self._writer = database.sessions(database.writer(self._engine))
        self.store = BlobStore(self.settings.storage_url, self.settings.storage_options)
        self._schema_ready = False

    def close(self) -> None:
        """Release database connections."""
        self._engine.dispose()

    def __enter__(self) -> Registry:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- pushing ------------------------------------------------------------------------------

    def push(
        self,
        name: str,
        source: torch.nn.Module | str | os.PathLike[str],
        *,
        format: Format | str | None = None,
        spec: Mapping[str, Any] | None = None,
        description: str | None = None,
        tags: Mapping[str, str] | None = None,
        alias: str | None = None,
    ) -> ModelVersion:
        """Store a model or a model file as the next version of ``name``.

        Args:
            name: model name (letters, digits, ``.``, ``_``, ``-``; at most 128).
            source: a live ``nn.Module`` (default format ``state_dict`` with its spec captured),
                or the path of a saved file (format detected from its bytes).
            format: ``state_dict``, ``full`` or ``torchscript``; must agree with a file's bytes.
            spec: architecture spec; required for a state_dict file, captured for live modules.
            description: free text shown by ``show``.
            tags: string key/value pairs.
            alias: promote the new version to this alias in the same transaction.

        Returns:
            The new version's record.

        Raises:
            InvalidName, FormatError, SpecError, UntrustedTarget, UntrustedPickle, StorageError.
        """
        name = validate_name(name)
        if alias is not None:
            validate_name(alias, kind="alias")
        tag_map = _check_tags(tags)
        fmt = _format(format)
        if description is not None and not isinstance(description, str):
            raise SpecError("description must be a string")
        from registry.sources import FileSource, ModuleSource

        if isinstance(source, (str, os.PathLike)):
            stager: FileSource | ModuleSource = FileSource(Path(source), self.store)
        else:
            stager = ModuleSource(source, self.store)
        with stager:
            fmt, spec_dict, detected = stager.prepare(fmt, spec, self.settings.trusted_modules)
            for _ in range(PUSH_ATTEMPTS):
                blob = stager.store()
                record = self._commit_version(
                    name, blob, fmt, spec_dict, detected.globals_, description, tag_map, alias
                )
                if record is not None:
                    return record
        raise StorageError(  # pragma: no cover - needs a delete racing every attempt
            f"blob for {name} kept disappearing from {self.store.display_url}; push again",
            url=self.store.display_url,
        )


    def _commit_version(
        self,
        name: str,
        blob: Blob,
        fmt: Format,
        spec: dict[str, Any] | None,
        globals_: Sequence[str],
        description: str | None,
        tags: dict[str, str],
        alias: str | None,
    ) -> ModelVersion | None:
        """Insert the version row; None if the blob vanished meanwhile (a racing delete)."""
        now = _now()
        with self._session(write=True) as s:
            queries.lock_blob(s, blob.sha256)
            if not blob.written and not self.store.exists(blob.sha256):
                s.rollback()
                return None
            model_id, number = queries.next_version(s, name, now)
            row = Version(
                model_id=model_id, version=number, format=fmt, sha256=blob.sha256, size=blob.size,
                spec=spec, pickle_globals=list(globals_), description=description, tags=tags,
                created_at=now, created_by=self.settings.user, torch_version=_torch_version(),
                python_version=platform.python_version(), source=None,
            )
            s.add(row)
            s.flush()
            if alias is not None:
                self._move_alias(s, model_id, name, alias, row, reason="pushed with --alias", expect=ANY)
            return queries.record(s, row, name)

    # -- reading ------------------------------------------------------------------------------

    def get(self, ref: str, *, version: int | None = None, alias: str | None = None) -> ModelVersion:
        """Metadata of one version (no download). ``ref`` is NAME, NAME:N, NAME:latest or NAME@ALIAS.

        Raises:
            InvalidReference, InvalidName, NotFound.
        """
        parsed = parse_ref(ref, version=version, alias=alias)
        with self._session() as s:
            return queries.record(s, queries.resolve(s, parsed), parsed.name)

    def models(self) -> list[ModelSummary]:
        """Every model with its latest version and aliases, by name."""
        with self._session() as s:
            stats = (
                select(Version.model_id, func.max(Version.version), func.count())
                .group_by(Version.model_id).subquery()
            )
            rows = s.execute(
                select(Model, stats.c[1], stats.c[2])
                .outerjoin(stats, stats.c.model_id == Model.id).order_by(Model.name)
            ).all()
            aliases: dict[int, dict[str, int]] = {}
            for model_id, alias_name, number in s.execute(
                select(Alias.model_id, Alias.name, Version.version).join(Version, Alias.version_id == Version.id)
            ):
                aliases.setdefault(model_id, {})[alias_name] = number
            return [
                ModelSummary(m.name, latest, count or 0, aliases.get(m.id, {}), queries.aware(m.created_at))
                for m, latest, count in rows
            ]

    def versions(self, name: str, *, limit: int | None = None, before: int | None = None) -> list[ModelVersion]:
        """Versions of ``name``, newest first; ``limit``/``before`` page through many.

        Raises:
            NotFound: no model of that name.
        """
        name = validate_name(name)
        with self._session() as s:
            model = queries.get_model(s, name)
            query = select(Version).where(Version.model_id == model.id).order_by(Version.version.desc())
            if before is not None:
                query = query.where(Version.version < before)
            if limit is not None:
                query = query.limit(limit)
            rows = s.scalars(query).all()
            by_version: dict[int, list[str]] = {}
            for alias_name, version_id in s.execute(
                select(Alias.name, Alias.version_id).where(Alias.model_id == model.id)
            ):
                by_version.setdefault(version_id, []).append(alias_name)
            return [queries.to_record(r, name, by_version.get(r.id, [])) for r in rows]

    def pull(
        self,
        ref: str,
        *,
        version: int | None = None,
        alias: str | None = None,
        dest: str | os.PathLike[str] | None = None,
        force: bool = False,
    ) -> Path:
        """Write a version's verified artifact file; nothing is deserialised.

        Args:
            dest: file or existing directory (default: ``NAME-vN.pt`` in the current directory).
            force: overwrite an existing file.

        Returns:
            The path written.

        Raises:
            NotFound, AlreadyExists, IntegrityError, StorageError.
        """
        from registry.formats import SUFFIX

        mv = self.get(ref, version=version, alias=alias)
        default_name = f"{mv.name}-v{mv.version}{SUFFIX[mv.format]}"
        target = Path(dest) if dest is not None else Path.cwd() / default_name
        if target.is_dir():
            target = target / default_name
        if target.exists() and not force:
            raise AlreadyExists(f"{target} already exists; use --force to overwrite it")
        return self.store.copy_to(mv.sha256, target, artifact=mv.ref, name=mv.name, overwrite=force)

    def load(
        self,
        ref: str,
        *,
        version: int | None = None,
        alias: str | None = None,
        map_location: str | torch.device | None = None,
        trust_pickle: bool = False,
    ) -> torch.nn.Module:
        """Load a version as an ``nn.Module`` in eval() mode, after verifying its bytes.

        Args:
            map_location: device for the weights (default CPU).
            trust_pickle: allow a whole-model pickle that references untrusted classes to run
                their code. Only for artifacts whose author you trust.

        Raises:
            NotFound, IntegrityError, UntrustedPickle, UntrustedTarget, SpecError, FormatError.
        """
        from registry import formats

        mv = self.get(ref, version=version, alias=alias)
        path = self.store.local_path(mv.sha256, mv.size, artifact=mv.ref, name=mv.name)
        return formats.load(
            path, mv.format, spec=mv.spec, trusted=self.settings.trusted_modules,
            map_location=map_location, trust_pickle=trust_pickle, artifact=mv.ref,
        )

    # -- aliases ------------------------------------------------------------------------------

    def promote(
        self,
        name: str,
        version: int,
        to: str = "production",
        *,
        reason: str | None = None,
        expect: int | None | object = ANY,
    ) -> AliasEventRecord:
        """Point alias ``to`` at ``name:version`` in one transaction, and record the move.

        Args:
            expect: move only if the alias now points at this version (None: at nothing).

        Raises:
            NotFound, InvalidName, AliasConflict.
        """
        name = validate_name(name)
        validate_name(to, kind="alias")
        parsed = parse_ref(name, version=version)
        with self._session(write=True) as s:
            model = queries.get_model(s, name, lock=True)
            row = queries.resolve(s, parsed, model=model)
            return self._move_alias(s, model.id, name, to, row, reason=reason, expect=expect)

    def demote(self, name: str, alias: str, *, reason: str | None = None) -> AliasEventRecord:
        """Remove alias ``alias`` from model ``name``, and record it.

        Raises:
            NotFound: no such model or alias.
        """
        name = validate_name(name)
        validate_name(alias, kind="alias")
        with self._session(write=True) as s:
            model = queries.get_model(s, name, lock=True)
            current = s.get(Alias, (model.id, alias))
            if current is None:
                raise NotFound(name, alias=alias)
            previous = s.get_one(Version, current.version_id).version
            s.delete(current)
            return self._event(s, model.id, name, alias, None, previous, reason)

    def history(self, name: str) -> list[AliasEventRecord]:
        """Every promotion and demotion of ``name``'s aliases, oldest first."""
        name = validate_name(name)
        with self._session() as s:
            model = queries.get_model(s, name)
            rows = s.scalars(
                select(AliasEvent).where(AliasEvent.model_id == model.id).order_by(AliasEvent.id)
            )
            return [queries.event_record(e, name) for e in rows]

    def _move_alias(
        self, s: Session, model_id: int, name: str, alias: str, row: Version,
        *, reason: str | None, expect: int | None | object,
    ) -> AliasEventRecord:
        current = s.get(Alias, (model_id, alias))
        previous = s.get_one(Version, current.version_id).version if current else None
        if expect is not ANY and expect != previous:
            raise AliasConflict(name, alias, expect if isinstance(expect, int) else None, previous)
        if current is None:
            s.add(Alias(model_id=model_id, name=alias, version_id=row.id))
        else:
            current.version_id = row.id
        return self._event(s, model_id, name, alias, row.version, previous, reason)

    def _event(
        self, s: Session, model_id: int, name: str, alias: str,
        version: int | None, previous: int | None, reason: str | None,
    ) -> AliasEventRecord:
        event = AliasEvent(model_id=model_id, alias=alias, version=version, previous=previous,
                           at=_now(), user=self.settings.user, reason=reason)
        s.add(event)
        s.flush()
        return queries.event_record(event, name)

    # -- deleting and checking ----------------------------------------------------------------

    def delete(self, ref: str, *, version: int | None = None, force: bool = False) -> ModelVersion:
        """Delete one version; its blob goes too when no other version uses it.

        Args:
            force: also remove the aliases that point at it (recorded as demotions).

        Raises:
            NotFound, AliasInUse.
        """
        parsed = parse_ref(ref, version=version)
        with self._session(write=True) as s:
            model = queries.get_model(s, parsed.name, lock=True)
            row = queries.resolve(s, parsed, model=model)
            record = queries.record(s, row, parsed.name)
            if record.aliases and not force:
                raise AliasInUse(parsed.name, row.version, record.aliases)
            for alias_name in record.aliases:
                s.execute(delete(Alias).where(Alias.model_id == model.id, Alias.name == alias_name))
                self._event(s, model.id, parsed.name, alias_name, None, row.version,
                            f"version {row.version} deleted")
            s.delete(row)
        self._remove_blob_if_unused(record.sha256)
        return record

    def _remove_blob_if_unused(self, sha256: str) -> bool:
        """Delete a blob no version references, holding the lock a push takes before committing."""
        with self._session(write=True) as s:
            queries.lock_blob(s, sha256)
            if s.scalar(select(Version.id).where(Version.sha256 == sha256).limit(1)) is not None:
                return False
            self.store.delete(sha256)
            return True

    def gc(self, *, grace: timedelta = DEFAULT_GRACE, dry_run: bool = False) -> list[Garbage]:
        """Remove blobs no version uses, and what killed pushes left behind, older than ``grace``.

        The grace period protects pushes in progress: their blob is written before their version
        row. A blob is removed only after re-checking, under the lock a committing push takes,
        that no version references it.

        Returns:
            What was removed (with ``dry_run``: what would be).
        """
        cutoff = (_now() - grace).timestamp()
        now = _now().timestamp()
        with self._session() as s:
            used = set(s.scalars(select(Version.sha256).distinct()))
        found: list[Garbage] = []
        for blob in self.store.iter_blobs():
            if blob.sha256 not in used and blob.mtime <= cutoff:
                if dry_run or self._remove_blob_if_unused(blob.sha256):
                    found.append(Garbage("blob", blob.sha256, blob.size, now - blob.mtime))
        for part in self.store.iter_partials():
            if part.mtime <= cutoff:
                if not dry_run:
                    self.store.delete_partial(part.sha256)
                found.append(Garbage("partial", part.sha256, part.size, now - part.mtime))
        return found

    def verify(self, name: str | None = None) -> list[Problem]:
        """Re-hash every stored artifact (of ``name``, or all); returns what is missing or corrupt."""
        query = select(Model.name, Version.version, Version.sha256, Version.size).join(Model)
        if name is not None:
            with self._session() as s:
                query = query.where(Version.model_id == queries.get_model(s, validate_name(name)).id)
        problems: list[Problem] = []
        checked: dict[tuple[str, int], tuple[str, str] | None] = {}
        with self._session() as s:
            for model_name, number, sha, size in s.execute(query.order_by(Model.name, Version.version)):
                key = (sha, size)
                if key not in checked:
                    checked[key] = self.store.check(sha, size)
                found = checked[key]
                if found is not None:
                    problems.append(Problem(model_name, number, sha, found[0], found[1]))
        return problems

    # -- plumbing -----------------------------------------------------------------------------

    @contextmanager
    def _session(self, *, write: bool = False) -> Iterator[Session]:
        if not self._schema_ready:
            database.ensure_schema(self._engine)
            self._schema_ready = True
        try:
            with (self._writer if write else self._reader).begin() as s:
                yield s
        except sa_exc.DBAPIError as e:
            url = self._engine.url.render_as_string(hide_password=True)
            reason = str(e.orig).strip().splitlines()[0] if e.orig is not None else str(e)
            raise DatabaseError(f"database {url} failed: {reason}", url=url) from e


# -- helpers ----------------------------------------------------------------------------------


def _now() -> datetime:
    return datetime.now(UTC)


def _torch_version() -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("torch")  # package metadata: no need to import torch for a file push
    except PackageNotFoundError:
        return None


def _format(value: Format | str | None) -> Format | None:
    if value is None or value == "auto":
        return None
    try:
        return Format(value)
    except ValueError:
        choices = ", ".join(f.value for f in Format)
        raise FormatError(f"unknown format {value!r}; choose one of: {choices}") from None


def _check_tags(tags: Mapping[str, str] | None) -> dict[str, str]:
    out: dict[str, str] = {}
    for key, value in (tags or {}).items():
        if not isinstance(key, str) or not key or len(key) > 128 or not isinstance(value, str):
            raise SpecError(f"invalid tag {key!r}={value!r}: keys and values are strings, keys 1-128 characters")
        out[key] = value
    return out


