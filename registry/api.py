"""The Registry facade: push, pull, load, look up and promote model versions."""

from __future__ import annotations

import os
import platform
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import ExitStack, contextmanager
from datetime import UTC, datetime, timedelta
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sqlalchemy import and_, delete, func, or_, select
from sqlalchemy import exc as sa_exc
from sqlalchemy.orm import Session

from registry import _testhooks, queries
from registry import db as database
from registry.config import Settings
from registry.errors import (
    AliasConflict,
    AliasInUse,
    AlreadyExists,
    DatabaseError,
    FormatError,
    InvalidText,
    NotFound,
    SpecError,
    StorageError,
)
from registry.models import Alias, AliasEvent, Model, Version
from registry.records import AliasEvent as AliasEventRecord
from registry.records import Format, Garbage, GcResult, GcWarning, ModelSummary, ModelVersion, Problem, SchemaInfo
from registry.refs import parse_ref, validate_name, validate_text
from registry.uploads import LIFECYCLE_HINT

if TYPE_CHECKING:
    import torch

    from registry.cache import BlobCache
    from registry.diff import DiffReport
    from registry.diff import Side as DiffSide
    from registry.records import CacheInfo
    from registry.signature import CheckReport
    from registry.store import Blob, BlobStore, ProgressFactory

#: ``expect=`` default: promote unconditionally.
ANY = object()
PUSH_ATTEMPTS = 3
#: Versions ``verify`` reads per query.
VERIFY_PAGE = 500
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
        progress: ``progress(description, total_bytes)`` returns a bar (``update(n)``, ``close()``)
            for one upload or download; the CLI passes tqdm bars. None (the default): no bars, since
            the library never writes to the terminal.

    Remote storage (``s3://bucket/prefix``) keeps verified copies of what ``load`` and ``pull``
    download in a local cache (``REGISTRY_CACHE``, default ``$REGISTRY_HOME/cache``).

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
        progress: ProgressFactory | None = None,
    ) -> None:
        self.settings = Settings.resolve(
            db=db, storage=storage, storage_options=storage_options,
            trusted_modules=trusted_modules, user=user,
        )
        self._progress = progress
        self._cache: BlobCache | None = None
        self._engine = database.make_engine(self.settings.db_url, timeout=self.settings.timeout)
        self._reader = database.sessions(self._engine)
        self._writer = database.sessions(database.writer(self._engine))
        self._store: BlobStore | None = None
        self._schema_ready = False

    @property
    def store(self) -> BlobStore:
        """The artifact store, built on first use: metadata commands never import fsspec or touch storage."""
        if self._store is None:
            from registry.store import BlobStore
            from registry.verified import VerifiedFiles

            self._store = BlobStore(self.settings.storage_url, self.settings.storage_options,
                                    progress=self._progress, verified=VerifiedFiles(self.settings.home / "verified"),
                                    timeout=self.settings.timeout)
        return self._store

    @property
    def cache(self) -> BlobCache:
        """The local cache of remote artifacts (unused when storage is a local directory)."""
        if self._cache is None:
            from registry.cache import BlobCache
            from registry.verified import VerifiedFiles

            self._cache = BlobCache(self.settings.cache_dir, progress=self._progress,
                                    verified=VerifiedFiles(self.settings.home / "verified"))
        return self._cache

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
        example_inputs: Any = None,
        dynamic_shapes: Any = None,
        trust_code: bool = False,
    ) -> ModelVersion:
        """Store a model or a model file as the next version of ``name``.

        Args:
            name: model name (letters, digits, ``.``, ``_``, ``-``; at most 128).
            source: a live ``nn.Module`` (default format ``state_dict`` with its spec captured),
                or the path of a saved file (format detected from its bytes).
            format: ``state_dict``, ``full``, ``torchscript``, ``export`` or ``safetensors``; must agree
                with a file's bytes. A live ``ExportedProgram`` is pushed as ``export``.
            spec: architecture spec; required for a state_dict or safetensors file, captured for live modules.
            description: free text shown by ``show``.
            tags: string key/value pairs.
            alias: promote the new version to this alias in the same transaction.
            example_inputs: a tensor or a tuple of tensors. The version is loaded back and run on
                them, and its signature is recorded: the inputs (a small blob beside the model) and
                the outputs (see :meth:`check`). For ``format="export"`` also what the module is
                traced with (required there).
            dynamic_shapes: passed to ``torch.export.export`` (``export`` only).
            trust_code: accept a whole-model pickle that references classes or functions outside the
                trusted modules (never plainly dangerous ones such as ``os.system``), and let
                ``example_inputs`` run a TorchScript program that is not data-only.

        Returns:
            The new version's record.

        Raises:
            InvalidName, InvalidText, FormatError, SpecError, UntrustedTarget, UntrustedPickle, StorageError.
        """
        return self._push(name, source, format=format, spec=spec, description=description, tags=tags,
                          alias=alias, example_inputs=example_inputs, dynamic_shapes=dynamic_shapes,
                          trust_code=trust_code)

    def _push(
        self,
        name: str,
        source: Any,
        *,
        format: Format | str | None,
        spec: Mapping[str, Any] | None,
        description: str | None,
        tags: Mapping[str, str] | None,
        alias: str | None,
        example_inputs: Any,
        dynamic_shapes: Any,
        trace_inputs: Any = None,
        lineage: str | None = None,
        expected: ModelVersion | None = None,
        rtol: float = 0.0,
        atol: float = 0.0,
        trust_code: bool = False,
    ) -> ModelVersion:
        """:meth:`push`, plus what :meth:`convert` needs: the version it came from, whose signature
        the new artifact must reproduce (``expected``), and separate inputs to trace an export with."""
        name = validate_name(name)
        if alias is not None:
            validate_name(alias, kind="alias")
        tag_map = _check_tags(tags)
        fmt = _format(format)
        if description is not None:
            validate_text(description, "description", multiline=True)
        from registry.sources import FileSource, ModuleSource, recheck

        inputs = None
        if example_inputs is not None:
            from registry import signature

            inputs = signature.as_inputs(example_inputs)
        if isinstance(source, (str, os.PathLike)):
            stager: FileSource | ModuleSource = FileSource(Path(source), self.store)
        else:
            trace = trace_inputs if trace_inputs is not None else inputs
            stager = ModuleSource(source, self.store, example_inputs=trace, dynamic_shapes=dynamic_shapes)
        live_outputs: Any = None
        if inputs is not None and expected is None and not isinstance(stager, FileSource):
            from registry import signature

            # The signature is the live model's behaviour, taken before anything is written: a
            # reload that differs must fail check(), not define what check() expects.
            live_outputs = signature.run_live(source, inputs, what=f"the model pushed as {name}")
        with stager:
            fmt, spec_dict, detected, program = stager.prepare(fmt, spec, self.settings.trusted_modules,
                                                               trust_code=trust_code)
            recorded: tuple[dict[str, Any], bytes] | None = None
            if inputs is not None:
                recorded = self._record_signature(name, stager.artifact_path, fmt, spec_dict, inputs,
                                                  expected=expected, rtol=rtol, atol=atol, trust_code=trust_code,
                                                  outputs=live_outputs)
            with self._session():  # the input is valid: reach the database before anything is stored
                pass
            for _ in range(PUSH_ATTEMPTS):
                blob = stager.store()
                if self.store.local:
                    # What was checked must be what was stored: a file rewritten between the
                    # check and the copy is refused (its blob is left for gc).
                    try:
                        recheck(Path(self.store.key(blob.sha256)), detected, source)
                    except FileNotFoundError:
                        continue  # a concurrent gc or delete took the blob before our lock: store it again
                _testhooks.pause("uploaded")
                record = self._commit_version(
                    name, blob, fmt, spec_dict, detected.globals_, description, tag_map, alias,
                    signature=recorded, source=lineage, program=program,
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
        *,
        signature: tuple[dict[str, Any], bytes] | None = None,
        source: str | None = None,
        program: dict[str, list[str]] | None = None,
    ) -> ModelVersion | None:
        """Insert the version row; None if the blob vanished meanwhile (a racing delete)."""
        now = _now()
        example: tuple[str, bytes] | None = None
        if signature is not None:
            example = (signature[0]["example"]["sha256"], signature[1])
        example_sha = example[0] if example is not None else None
        # Bytes that were already stored may be an orphan older than gc's grace: make them young
        # (local storage) before taking the lock, so a gc that listed them re-checks their age under
        # the lock and keeps them. Remote storage cannot touch; there the check below stores again.
        for sha in filter(None, (example_sha, None if blob.written else blob.sha256)):
            self.store.touch(sha)
        with self._session(write=True) as s:
            # Each blob is checked (and stored again if gone) holding the lock gc takes to remove it,
            # so once seen here it stays until this transaction ends: gc then finds our row.
            if example is not None:
                queries.lock_blob(s, example[0])
                if not self.store.exists(example[0]):
                    self._put_bytes(example[1])
            queries.lock_blob(s, blob.sha256)
            # Checked even for a blob this push just wrote: a `gc --grace 0` may have removed it as an
            # orphan before we took the lock.
            if not self.store.exists(blob.sha256):
                s.rollback()
                return None
            _testhooks.pause("checked")
            model_id, number = queries.next_version(s, name, now)
            row = Version(
                model_id=model_id, version=number, format=fmt, sha256=blob.sha256, size=blob.size,
                spec=spec, pickle_globals=list(globals_), description=description, tags=tags,
                created_at=now, created_by=self.settings.user, torch_version=_torch_version(),
                python_version=platform.python_version(), source=source,
                signature=signature[0] if signature else None, example_sha256=example_sha, program=program,
            )
            s.add(row)
            s.flush()
            if alias is not None:
                self._move_alias(s, model_id, name, alias, row, reason="pushed with --alias", expect=ANY)
            record = queries.record(s, row, name)
            _testhooks.pause("before_commit")
            return record

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
            # Per model, through the (model_id, version) index: max() is one seek and count() reads only
            # that model's index entries. Columns, not ORM entities: 10,000 Model objects cost more than the SQL.
            mine = Version.model_id == Model.id
            latest = select(func.max(Version.version)).where(mine).scalar_subquery()
            count = select(func.count()).select_from(Version).where(mine).scalar_subquery()
            rows = s.execute(
                select(Model.id, Model.name, Model.created_at, latest, count).order_by(Model.name)
            ).all()
            aliases: dict[int, dict[str, int]] = {}
            for model_id, alias_name, number in s.execute(
                select(Alias.model_id, Alias.name, Version.version).join(Version, Alias.version_id == Version.id)
            ):
                aliases.setdefault(model_id, {})[alias_name] = number
            return [
                ModelSummary(name, latest, count or 0, aliases.get(model_id, {}), queries.aware(created))
                for model_id, name, created, latest, count in rows
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
        if os.path.lexists(target) and not force:  # a dangling symlink is in the way too
            raise AlreadyExists(f"{target} already exists; use --force to overwrite it")
        if not target.parent.is_dir():
            raise StorageError(f"cannot write {target}: {target.parent} is not a directory", url=str(target.parent))
        if not self.store.local:
            return self.cache.copy_to(self.store, mv.sha256, mv.size, target, artifact=mv.ref, name=mv.name,
                                      overwrite=force)
        return self.store.copy_to(mv.sha256, target, artifact=mv.ref, name=mv.name, overwrite=force)

    def load(
        self,
        ref: str,
        *,
        version: int | None = None,
        alias: str | None = None,
        map_location: str | torch.device | None = None,
        trust_code: bool = False,
        trust_pickle: bool = False,
    ) -> torch.nn.Module:
        """Load a version as an ``nn.Module`` in eval() mode, after verifying its bytes.

        An ``export`` version loads as ``ExportedProgram.module()``, which refuses ``.eval()`` and
        ``.train()``: it keeps the mode it was exported in (the registry exports in eval mode).

        Args:
            map_location: device for the weights (default CPU).
            trust_code: let the artifact run code its author wrote: a whole-model pickle referencing
                classes outside the trusted modules, or a TorchScript program that is not data-only
                (custom ``__setstate__``, operators with file, process or library effects). Only
                for artifacts whose author you trust.
            trust_pickle: the older name of ``trust_code``; either one is enough.

        Raises:
            NotFound, IntegrityError, UntrustedPickle, UntrustedTarget, SpecError, FormatError.
        """
        from registry import formats

        mv = self.get(ref, version=version, alias=alias)
        with self._open_blob(mv.sha256, mv.size, artifact=mv.ref, name=mv.name) as path:
            return formats.load(
                path, mv.format, spec=mv.spec, trusted=self.settings.trusted_modules,
                map_location=map_location, trust_code=trust_code or trust_pickle, artifact=mv.ref,
            )

    def describe(
        self,
        ref: str,
        *,
        version: int | None = None,
        alias: str | None = None,
        map_location: str | None = None,
        trust_code: bool = False,
        trust_pickle: bool = False,
    ) -> dict[str, Any]:
        """Load a version and summarise the module: class, parameter count and bytes, dtypes, device."""
        mv = self.get(ref, version=version, alias=alias)
        module = self.load(mv.ref, map_location=map_location, trust_code=trust_code or trust_pickle)
        params = list(module.parameters())
        return {
            "ref": mv.ref, "format": mv.format.value, "class": type(module).__qualname__,
            "parameters": sum(p.numel() for p in params),
            "parameter_bytes": sum(p.numel() * p.element_size() for p in params),
            "dtypes": ", ".join(sorted({str(p.dtype).removeprefix("torch.") for p in params})) or "-",
            "device": ", ".join(sorted({str(p.device) for p in params})) or "-",
        }

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
            NotFound, InvalidName, InvalidText (a reason that is not printable text), AliasConflict.
        """
        name = validate_name(name)
        validate_name(to, kind="alias")
        if reason is not None:
            validate_text(reason, "reason")
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
        if reason is not None:
            validate_text(reason, "reason")
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
        # The version is gone once committed; removing its blobs is best effort. If storage fails
        # now, they are orphans that `registry gc` removes later: not a reason to report failure.
        for sha in filter(None, (record.sha256, record.example_sha256)):
            try:
                self._remove_blob_if_unused(sha)
            except StorageError:
                pass
        return record

    def _remove_blob_if_unused(self, sha256: str, *, cutoff: float | None = None) -> bool:
        """Delete a blob no version references, holding the lock a push takes to check and reference it.

        With ``cutoff`` (gc), only a blob still last modified at or before it: a push touches the bytes
        it reuses before taking the lock. False if the blob stays (or was already gone).
        """
        _testhooks.pause("removing")
        with self._session(write=True) as s:
            queries.lock_blob(s, sha256)
            users = select(Version.id).where(or_(Version.sha256 == sha256, Version.example_sha256 == sha256))
            if s.scalar(users.limit(1)) is not None:
                return False
            if cutoff is not None:
                info = self.store.stat(sha256)
                if info is None or info.mtime > cutoff:
                    return False
            self.store.delete(sha256)
            return True

    def gc(self, *, grace: timedelta = DEFAULT_GRACE, dry_run: bool = False) -> GcResult:
        """Remove blobs no version uses, and what killed pushes left behind, older than ``grace``.

        What killed pushes leave: staging files (local storage) and incomplete multipart uploads
        under the registry's prefix (S3), which S3 keeps and bills until they are aborted. An upload
        is dated by the marker the registry wrote when it started it, so a running push's upload is
        never aborted while it is younger than ``grace``, whatever date the server reports.
        The grace period protects pushes in progress: their blob is written before their version
        row. A blob is removed only after re-checking, under the lock a committing push takes,
        that no version references it and that it is still older than ``grace`` (a push touches
        the local bytes it reuses before taking that lock).

        Everything is listed before anything is removed, so a failed listing changes nothing. After
        that, what cannot be done (an operation the server lacks, an upload it will not abort, a
        removal that fails) becomes a warning, and gc goes on with the rest.

        Returns:
            What was removed (with ``dry_run``: what would be), and ``warnings``: what was not.
        """
        cutoff = (_now() - grace).timestamp()
        now = _now().timestamp()
        with self._session() as s:
            used = set(s.scalars(select(Version.sha256).distinct()))
            used |= set(s.scalars(select(Version.example_sha256).where(Version.example_sha256.is_not(None)).distinct()))
        blobs = [b for b in self.store.iter_blobs() if b.sha256 not in used and b.mtime <= cutoff]
        partials = [p for p in self.store.iter_partials() if p.mtime <= cutoff]
        scan = self.store.scan_uploads(cutoff)
        result = GcResult(warnings=[GcWarning("uploads", w) for w in scan.warnings])

        def attempt(key: str, action: Callable[[], object]) -> bool:
            """Whether ``action()`` removed ``key``; a failure (others may be gone already) becomes a warning."""
            try:
                return action() is not False
            except (StorageError, DatabaseError) as e:
                result.warnings.append(GcWarning(key, f"could not remove {key}: {e}"))
                return False

        for blob in blobs:
            # The listing is stale once the lock is held: use and age are re-checked there.
            if dry_run or attempt(blob.sha256, partial(self._remove_blob_if_unused, blob.sha256, cutoff=cutoff)):
                result.append(Garbage("blob", blob.sha256, blob.size, now - blob.mtime))
        for part in partials:
            if dry_run or attempt(part.sha256, partial(self.store.delete_partial, part.sha256)):
                result.append(Garbage("partial", part.sha256, part.size, now - part.mtime))
        # A dry run asks the server whether it aborts uploads at all, so it can say what gc would do.
        cannot_abort = self.store.can_abort_uploads() if dry_run and scan.old else None
        for upload in scan.old:
            key = f"{self.store.relative(upload.key)}?uploadId={upload.upload_id}"
            failure = cannot_abort if dry_run else self.store.abort_upload(upload)
            if failure is None:
                result.append(Garbage("upload", key, upload.size, now - upload.started))
            else:
                result.warnings.append(GcWarning(key, (
                    f"upload {key} could not be aborted: {failure}; up to {upload.size} bytes of parts remain "
                    f"on the server; {LIFECYCLE_HINT}")))
        if not dry_run:
            for marker in scan.stale_markers:  # bookkeeping of uploads already gone: not reported
                attempt(self.store.relative(marker), partial(self.store.forget_marker, marker))
        return result

    def verify(self, name: str | None = None) -> list[Problem]:
        """Re-hash every stored artifact (of ``name``, or all); returns what is missing or corrupt."""
        return list(self.iter_problems(name))

    def iter_problems(self, name: str | None = None) -> Iterator[Problem]:
        """:meth:`verify`, streamed: yields each problem as it is found, in bounded memory.

        Versions are read in pages of :data:`VERIFY_PAGE` ordered by blob, each page in its own short
        read transaction (no cursor or snapshot held open while blobs are hashed, which would pin
        SQLite's WAL or PostgreSQL's vacuum horizon for the whole run). Versions sharing a blob are
        adjacent, so each blob is hashed once while only the last result is remembered.

        Raises:
            NotFound: ``name`` is given and no such model exists.
        """
        query = select(Version.id, Model.name, Version.version, Version.sha256, Version.size).join(Model)
        if name is not None:
            with self._session() as s:
                query = query.where(Version.model_id == queries.get_model(s, validate_name(name)).id)
        last: tuple[str, int] | None = None
        found: tuple[str, str] | None = None
        after: tuple[str, int] | None = None
        while True:
            page = query.order_by(Version.sha256, Version.id).limit(VERIFY_PAGE)
            if after is not None:
                page = page.where(or_(Version.sha256 > after[0],
                                      and_(Version.sha256 == after[0], Version.id > after[1])))
            with self._session() as s:
                rows = s.execute(page).all()
            for row_id, model_name, number, sha, size in rows:
                if (sha, size) != last:
                    last, found = (sha, size), self._check_blob(sha, size)
                if found is not None:
                    yield Problem(model_name, number, sha, found[0], found[1])
                after = (sha, row_id)
            if len(rows) < VERIFY_PAGE:
                break
        yield from self._example_problems(query.whereclause)

    def _example_problems(self, where: Any) -> Iterator[Problem]:
        """The example-input blobs signatures point at, checked like artifacts (paged by version id)."""
        query = (select(Version.id, Model.name, Version.version, Version.example_sha256, Version.signature)
                 .join(Model).where(Version.example_sha256.is_not(None)).order_by(Version.id).limit(VERIFY_PAGE))
        if where is not None:
            query = query.where(where)
        after = 0
        while True:
            with self._session() as s:
                rows = s.execute(query.where(Version.id > after)).all()
            for row_id, model_name, number, sha, signature in rows:
                size = int(((signature or {}).get("example") or {}).get("size", -1))
                found = self._check_blob(sha, size)
                if found is not None:
                    yield Problem(model_name, number, sha, found[0], f"example inputs: {found[1]}")
                after = row_id
            if len(rows) < VERIFY_PAGE:
                return

    def _check_blob(self, sha256: str, size: int) -> tuple[str, str] | None:
        try:
            return self.store.check(sha256, size)
        except StorageError as e:  # one unreadable blob is a problem to report, not the end of verify
            return "unreadable", str(e)

    # -- the local cache of remote artifacts ---------------------------------------------------

    def cache_info(self) -> CacheInfo:
        """Where the local cache of remote artifacts is, how many blobs it holds and their bytes."""
        return self.cache.info()

    def clear_cache(self) -> CacheInfo:
        """Empty the local cache; later loads download again. Returns what was removed."""
        return self.cache.clear()

    # -- behaviour: signatures, conversion, diff ----------------------------------------------

    def example_inputs(
        self, ref: str, *, version: int | None = None, alias: str | None = None
    ) -> tuple[torch.Tensor, ...]:
        """The example inputs recorded with a version (verified, loaded with ``weights_only=True``).

        Raises:
            NotFound, FormatError (no signature recorded), IntegrityError, StorageError.
        """
        from registry import signature

        mv = self.get(ref, version=version, alias=alias)
        if mv.example_sha256 is None or mv.signature is None:
            raise FormatError(f"{mv.ref} has no recorded signature; push it with --example FILE "
                              "(example_inputs=) to record one")
        size = int(mv.signature["example"]["size"])
        with self._open_blob(mv.example_sha256, size, artifact=f"the example inputs of {mv.ref}",
                             name=mv.name) as path:
            signature.vet_example(path, what=f"the example inputs of {mv.ref}")
            return signature.load_example(path.read_bytes(), what=mv.ref)

    def check(
        self,
        ref: str,
        *,
        version: int | None = None,
        alias: str | None = None,
        rtol: float | None = None,
        atol: float | None = None,
        trust_code: bool = False,
        trust_pickle: bool = False,
    ) -> CheckReport:
        """Load a version, run its recorded example inputs and compare with the recorded outputs.

        Args:
            rtol, atol: tolerance, elementwise ``|now - recorded| <= atol + rtol * |recorded|``
                (defaults :data:`registry.signature.DEFAULT_RTOL` / ``DEFAULT_ATOL``).

        Returns:
            The report; ``report.ok`` is False and ``report.drifted`` names the outputs that changed.

        Raises:
            NotFound, FormatError (no signature, or the model fails on its example), and what
            :meth:`load` raises.
        """
        from registry import signature

        rtol = signature.DEFAULT_RTOL if rtol is None else rtol
        atol = signature.DEFAULT_ATOL if atol is None else atol
        mv = self.get(ref, version=version, alias=alias)
        inputs = self.example_inputs(mv.ref)
        assert mv.signature is not None  # example_inputs() raised otherwise
        module = self.load(mv.ref, trust_code=trust_code or trust_pickle)
        outputs = signature.run(module, inputs, what=mv.ref)
        return signature.compare(mv.ref, mv.signature, outputs, rtol=rtol, atol=atol)

    def convert(
        self,
        ref: str,
        to: Format | str,
        *,
        version: int | None = None,
        alias: str | None = None,
        example_inputs: Any = None,
        spec: Mapping[str, Any] | None = None,
        rtol: float | None = None,
        atol: float | None = None,
        trust_code: bool = False,
        trust_pickle: bool = False,
        description: str | None = None,
    ) -> ModelVersion:
        """Load a version, write it in another format and push that as the next version of the model.

        The new version's ``source`` is the version it came from. When that version has a signature,
        the converted artifact is loaded back and run on the recorded example inputs before anything
        is stored, and its outputs must match (within ``rtol``/``atol``); the new version records the
        same example inputs.

        Args:
            to: ``state_dict``, ``safetensors``, ``torchscript`` or ``export``.
            example_inputs: inputs to trace an ``export`` with (default: the recorded ones).
            spec: architecture spec for a ``state_dict``/``safetensors`` target when the source records
                none (``torchscript``, ``export``).

        Raises:
            FormatError: unknown or same target, no example inputs for ``export``, PyTorch cannot do
                the conversion (its reason), or the outputs changed. Nothing is pushed then.
            SpecError, UntrustedPickle, and what :meth:`load` raises.
        """
        from registry import convert as conversions
        from registry import signature

        rtol = signature.DEFAULT_RTOL if rtol is None else rtol
        atol = signature.DEFAULT_ATOL if atol is None else atol
        mv = self.get(ref, version=version, alias=alias)
        target = conversions.check_target(mv, _format(to))
        given = signature.as_inputs(example_inputs) if example_inputs is not None else None
        recorded = self.example_inputs(mv.ref) if mv.example_sha256 is not None else None
        trace = given if given is not None else recorded
        if target is Format.EXPORT and trace is None:
            raise conversions.missing_example(mv)
        new_spec = conversions.spec_for(mv, target, spec)
        module = self.load(mv.ref, trust_code=trust_code or trust_pickle)
        return self._push(
            mv.name, module, format=target, spec=new_spec, description=description, tags=None, alias=None,
            example_inputs=recorded if recorded is not None else given, dynamic_shapes=None,
            trace_inputs=trace, lineage=mv.ref, expected=mv if recorded is not None else None,
            rtol=rtol, atol=atol, trust_code=trust_code or trust_pickle,
        )

    def diff(self, ref_a: str, ref_b: str, *, trust_code: bool = False, trust_pickle: bool = False) -> DiffReport:
        """Compare the parameters of two versions (any formats) through memory maps, one tensor pair at a time.

        Returns:
            Spec differences, tensors added/removed/changed in shape or dtype, and the largest absolute
            difference of each tensor whose values differ.

        Raises:
            NotFound, and what :meth:`load` raises for formats without a mappable tensor file.
        """
        import tempfile

        from registry import diff as differ

        a, b = self.get(ref_a), self.get(ref_b)
        trust = trust_code or trust_pickle
        with tempfile.TemporaryDirectory(prefix="registry-diff-") as tmp, ExitStack() as held:
            side_a = self._diff_side(a, Path(tmp) / "a.safetensors", trust, held)
            side_b = self._diff_side(b, Path(tmp) / "b.safetensors", trust, held)
            return differ.compare(side_a, side_b, trusted=self.settings.trusted_modules)

    def _diff_side(self, mv: ModelVersion, scratch: Path, trust_code: bool, held: ExitStack) -> DiffSide:
        from registry import diff as differ
        from registry import formats

        if mv.format in (Format.STATE_DICT, Format.SAFETENSORS):
            path = held.enter_context(self._open_blob(mv.sha256, mv.size, artifact=mv.ref, name=mv.name))
            formats.vet(path, mv.format, artifact=mv.ref, trust_code=trust_code)
            return differ.Side(mv.ref, path, mv.format, mv.spec)
        # No mappable tensor file: load this one model alone, write its tensors out, let it go.
        module = self.load(mv.ref, trust_code=trust_code)
        spec = mv.spec
        if mv.format is Format.FULL:
            from registry import spec as spec_mod

            try:
                spec = spec_mod.capture(module)
            except SpecError:
                spec = None
        differ.materialize(module, scratch)
        del module
        return differ.Side(mv.ref, scratch, Format.SAFETENSORS, spec)

    def _record_signature(
        self, name: str, path: Path, fmt: Format, spec: Mapping[str, Any] | None, inputs: tuple[torch.Tensor, ...],
        *, expected: ModelVersion | None, rtol: float, atol: float, trust_code: bool = False, outputs: Any = None,
    ) -> tuple[dict[str, Any], bytes]:
        """Describe the example and the outputs (plus the example's bytes): the live model's ``outputs`` when
        given, else those of the artifact about to be pushed, loaded (a file push, or a conversion)."""
        import hashlib

        from registry import formats, signature

        what = f"the new version of {name}"
        if outputs is None or fmt in (Format.TORCHSCRIPT, Format.EXPORT):
            # A program is code torch generated from the model: run it too, and refuse one that breaks.
            module = formats.load(path, fmt, spec=spec, trusted=self.settings.trusted_modules, artifact=what,
                                  trust_code=trust_code)
            ran = signature.run(module, inputs, what=what)
            if outputs is not None:
                live = signature.record(inputs, outputs)
                report = signature.compare(what, live, ran)
                if not report.ok:
                    bad = "; ".join(f"{o.path}: {o.detail}" for o in report.outputs if not o.ok)
                    raise FormatError(f"the {fmt.value} program of {name} does not reproduce the live model's "
                                      f"outputs: {bad}; nothing was pushed (push as state_dict or full)")
            outputs = ran if outputs is None else outputs
        if expected is not None and expected.signature is not None:
            report = signature.compare(expected.ref, expected.signature, outputs, rtol=rtol, atol=atol)
            if not report.ok:
                bad = "; ".join(f"{o.path}: {o.detail}" for o in report.outputs if not o.ok)
                raise FormatError(f"the {fmt.value} conversion of {expected.ref} does not reproduce its "
                                  f"signature (rtol {rtol:g}, atol {atol:g}): {bad}; nothing was pushed")
        recorded = signature.record(inputs, outputs)
        data = signature.example_bytes(inputs)
        recorded["example"] = {"sha256": hashlib.sha256(data).hexdigest(), "size": len(data)}
        return recorded, data

    def _put_bytes(self, data: bytes) -> Blob:
        """Store a small blob held in memory (example inputs)."""
        import tempfile
        import uuid

        if self.store.local:
            staged = self.store.tmp_dir() / f"{uuid.uuid4().hex}.part"
            try:
                staged.write_bytes(data)
                return self.store.adopt(staged)
            finally:
                staged.unlink(missing_ok=True)
        with tempfile.TemporaryDirectory(prefix="registry-") as tmp:
            path = Path(tmp) / "blob"
            path.write_bytes(data)
            return self.store.put_file(path)

    @contextmanager
    def _open_blob(self, sha256: str, size: int, *, artifact: str, name: str | None) -> Iterator[Path]:
        """The verified bytes of a blob, as a path bound to one open descriptor (see :mod:`registry.blobfile`).

        Remote blobs are read from the local cache. Whatever is deserialised must be read through this
        path while the block is open: it is the file that was verified, whatever happens to the blob's name.
        """
        if self.store.local:
            with self.store.open_verified(sha256, size, artifact=artifact, name=name) as path:
                yield path
        else:
            with self.cache.open_verified(self.store, sha256, size, artifact=artifact, name=name) as path:
                yield path

    # -- the schema ---------------------------------------------------------------------------

    def schema(self) -> SchemaInfo:
        """The database's schema revision, read without migrating it (one query)."""
        return SchemaInfo(database.current(self._engine), database.SCHEMA_HEAD)

    def migrate(self, revision: str = "head", *, down: bool = False) -> SchemaInfo:
        """Move the schema up (or, with ``down``, down) to ``revision`` with Alembic; ``base`` empties it.

        Not safe while other processes use the registry (see the README). Returns the revision reached.

        Raises:
            ConfigError: unknown revision. DatabaseError: the database failed.
        """
        if down:
            database.downgrade(self._engine, revision)
        else:
            database.upgrade(self._engine, revision)
        self._schema_ready = False  # a later call must not assume the schema it found before
        return self.schema()

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
            raise database.database_error(self._engine, e) from e


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
        if validate_text(key, "tag key", max_length=128) == "":
            raise InvalidText("tag key", key, "must not be empty")
        out[key] = validate_text(value, f"value of tag {key!r}")
    return out


