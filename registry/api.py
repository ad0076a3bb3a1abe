"""The Registry facade: push, pull, load, look up and promote model versions."""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sqlalchemy import exc as sa_exc
from sqlalchemy.orm import Session

from registry import db as database
from registry import queries
from registry.config import Settings
from registry.errors import AlreadyExists, StorageError
from registry.maintenance import DEFAULT_GRACE
from registry.records import AliasEvent as AliasEventRecord
from registry.records import Format, GcResult, ModelSummary, ModelVersion, Problem, SchemaInfo
from registry.refs import parse_ref, validate_name, validate_text

if TYPE_CHECKING:
    import torch

    from registry.cache import BlobCache
    from registry.diff import DiffReport
    from registry.records import CacheInfo
    from registry.signature import CheckReport
    from registry.store import Blob, BlobStore, ProgressFactory

#: ``expect=`` default: promote unconditionally.
ANY = queries.ANY


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
            from registry.store import open_store
            from registry.verified import VerifiedFiles

            self._store = open_store(self.settings.storage_url, self.settings.storage_options,
                                     progress=self._progress, verified=VerifiedFiles(self.settings.home / "verified"),
                                     timeout=self.settings.timeout, cache=self.cache)
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
        from registry import intake

        return intake.push(self._session, self.store, self.settings, name, source, format=format, spec=spec,
                           description=description, tags=tags, alias=alias, example_inputs=example_inputs,
                           dynamic_shapes=dynamic_shapes, trust_code=trust_code)

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
        **options: Any,
    ) -> ModelVersion | None:
        """Insert the version row of a stored blob; None if the blob vanished meanwhile (tests use it)."""
        from registry import intake

        return intake.commit(self._session, self.store, self.settings, name, blob, fmt, spec, globals_,
                             description, tags, alias, **options)

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
            return queries.models(s)

    def versions(self, name: str, *, limit: int | None = None, before: int | None = None) -> list[ModelVersion]:
        """Versions of ``name``, newest first; ``limit``/``before`` page through many.

        Raises:
            NotFound: no model of that name.
        """
        name = validate_name(name)
        with self._session() as s:
            return queries.versions(s, name, limit=limit, before=before)

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
        return self.store.copy_to(mv.sha256, mv.size, target, artifact=mv.ref, name=mv.name, overwrite=force)

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
        from registry import behaviour

        mv = self.get(ref, version=version, alias=alias)
        return behaviour.load(self.store, self.settings, mv, map_location=map_location,
                              trust_code=trust_code or trust_pickle)

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
        from registry import behaviour

        mv = self.get(ref, version=version, alias=alias)
        return behaviour.describe(self.store, self.settings, mv, map_location=map_location,
                                  trust_code=trust_code or trust_pickle)

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
            return queries.move_alias(s, model.id, name, to, row, user=self.settings.user, reason=reason,
                                      expect=expect, now=_now())

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
            return queries.remove_alias(s, name, alias, user=self.settings.user, reason=reason, now=_now())

    def history(self, name: str) -> list[AliasEventRecord]:
        """Every promotion and demotion of ``name``'s aliases, oldest first."""
        name = validate_name(name)
        with self._session() as s:
            return queries.history(s, name)

    # -- deleting and checking ----------------------------------------------------------------

    def delete(self, ref: str, *, version: int | None = None, force: bool = False) -> ModelVersion:
        """Delete one version; its blob goes too when no other version uses it.

        Args:
            force: also remove the aliases that point at it (recorded as demotions).

        Raises:
            NotFound, AliasInUse.
        """
        from registry import maintenance

        return maintenance.delete(self._session, self.store, self.settings, parse_ref(ref, version=version),
                                  force=force)

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
        from registry import maintenance

        return maintenance.gc(self._session, self.store, grace=grace, dry_run=dry_run)

    def verify(self, name: str | None = None) -> list[Problem]:
        """Re-hash every stored artifact (of ``name``, or all); returns what is missing or corrupt."""
        return list(self.iter_problems(name))

    def iter_problems(self, name: str | None = None) -> Iterator[Problem]:
        """:meth:`verify`, streamed: yields each problem as it is found, in bounded memory.

        Versions are read in pages of :data:`registry.maintenance.VERIFY_PAGE` ordered by blob, each
        page in its own short read transaction (no cursor or snapshot held open while blobs are hashed, which would pin
        SQLite's WAL or PostgreSQL's vacuum horizon for the whole run). Versions sharing a blob are
        adjacent, so each blob is hashed once while only the last result is remembered.

        Raises:
            NotFound: ``name`` is given and no such model exists.
        """
        from registry import maintenance

        return maintenance.iter_problems(self._session, self.store, name)

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
        from registry import behaviour

        return behaviour.read_example(self.store, self.get(ref, version=version, alias=alias))

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
        from registry import behaviour

        mv = self.get(ref, version=version, alias=alias)
        return behaviour.check(self.store, self.settings, mv, rtol=rtol, atol=atol,
                               trust_code=trust_code or trust_pickle)

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
        from registry import behaviour

        mv = self.get(ref, version=version, alias=alias)
        return behaviour.convert(self._session, self.store, self.settings, mv, to, example_inputs=example_inputs,
                                 spec=spec, rtol=rtol, atol=atol, trust_code=trust_code or trust_pickle,
                                 description=description)

    def diff(self, ref_a: str, ref_b: str, *, trust_code: bool = False, trust_pickle: bool = False) -> DiffReport:
        """Compare the parameters of two versions (any formats) through memory maps, one tensor pair at a time.

        Returns:
            Spec differences, tensors added/removed/changed in shape or dtype, and the largest absolute
            difference of each tensor whose values differ.

        Raises:
            NotFound, and what :meth:`load` raises for formats without a mappable tensor file.
        """
        from registry import behaviour

        a, b = self.get(ref_a), self.get(ref_b)
        return behaviour.diff(self.store, self.settings, a, b, trust_code=trust_code or trust_pickle)

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
