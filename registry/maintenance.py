"""Keeping storage and metadata in step: delete a version's blobs, collect garbage, verify every blob."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from functools import partial

from registry import _testhooks, queries
from registry.config import Settings
from registry.errors import DatabaseError, StorageError
from registry.records import Garbage, GcResult, GcWarning, ModelVersion, Problem
from registry.refs import Ref, validate_name
from registry.store import BlobStore
from registry.uploads import LIFECYCLE_HINT

#: Versions ``verify`` reads per query.
VERIFY_PAGE = 500
#: Orphans younger than this may belong to a push that has not committed yet.
DEFAULT_GRACE = timedelta(hours=1)


def delete(sessions: queries.Sessions, store: BlobStore, settings: Settings, ref: Ref, *,
           force: bool) -> ModelVersion:
    """Delete one version (see :meth:`Registry.delete`); its blobs go too when no other version uses them."""
    with sessions(write=True) as s:
        record = queries.delete_version(s, ref, force=force, user=settings.user, now=_now())
    # The version is gone once committed; removing its blobs is best effort. If storage fails
    # now, they are orphans that `registry gc` removes later: not a reason to report failure.
    for sha in filter(None, (record.sha256, record.example_sha256)):
        try:
            remove_blob_if_unused(sessions, store, sha)
        except StorageError:
            pass
    return record


def remove_blob_if_unused(sessions: queries.Sessions, store: BlobStore, sha256: str, *,
                          cutoff: float | None = None) -> bool:
    """Delete a blob no version references, holding the lock a push takes to check and reference it.

    With ``cutoff`` (gc), only a blob still last modified at or before it: a push touches the bytes
    it reuses before taking the lock. False if the blob stays (or was already gone).
    """
    _testhooks.pause("removing")
    with sessions(write=True) as s:
        queries.lock_blob(s, sha256)
        if queries.blob_in_use(s, sha256):
            return False
        if cutoff is not None:
            info = store.stat(sha256)
            if info is None or info.mtime > cutoff:
                return False
        store.delete(sha256)
        return True


def gc(sessions: queries.Sessions, store: BlobStore, *, grace: timedelta, dry_run: bool) -> GcResult:
    """:meth:`Registry.gc`: list everything first, then remove, turning each failure into a warning."""
    cutoff = (_now() - grace).timestamp()
    now = _now().timestamp()
    with sessions() as s:
        used = queries.used_blobs(s)
    blobs = [b for b in store.iter_blobs() if b.sha256 not in used and b.mtime <= cutoff]
    partials = [p for p in store.iter_partials() if p.mtime <= cutoff]
    scan = store.scan_uploads(cutoff)
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
        if dry_run or attempt(blob.sha256, partial(remove_blob_if_unused, sessions, store, blob.sha256,
                                                   cutoff=cutoff)):
            result.append(Garbage("blob", blob.sha256, blob.size, now - blob.mtime))
    for part in partials:
        if dry_run or attempt(part.sha256, partial(store.delete_partial, part.sha256)):
            result.append(Garbage("partial", part.sha256, part.size, now - part.mtime))
    # A dry run asks the server whether it aborts uploads at all, so it can say what gc would do.
    cannot_abort = store.can_abort_uploads() if dry_run and scan.old else None
    for upload in scan.old:
        key = f"{store.relative(upload.key)}?uploadId={upload.upload_id}"
        failure = cannot_abort if dry_run else store.abort_upload(upload)
        if failure is None:
            result.append(Garbage("upload", key, upload.size, now - upload.started))
        else:
            result.warnings.append(GcWarning(key, (
                f"upload {key} could not be aborted: {failure}; up to {upload.size} bytes of parts remain "
                f"on the server; {LIFECYCLE_HINT}")))
    if not dry_run:
        for marker in scan.stale_markers:  # bookkeeping of uploads already gone: not reported
            attempt(store.relative(marker), partial(store.forget_marker, marker))
    return result


def iter_problems(sessions: queries.Sessions, store: BlobStore, name: str | None) -> Iterator[Problem]:
    """:meth:`Registry.iter_problems`: every blob re-hashed, page by page, each page its own short read."""
    model_id: int | None = None
    if name is not None:
        with sessions() as s:
            model_id = queries.get_model(s, validate_name(name)).id
    last: tuple[str, int] | None = None
    found: tuple[str, str] | None = None
    after: tuple[str, int] | None = None
    while True:
        with sessions() as s:
            rows = queries.artifact_page(s, model_id, after, VERIFY_PAGE)
        for row_id, model_name, number, sha, size in rows:
            if (sha, size) != last:
                last, found = (sha, size), _check_blob(store, sha, size)
            if found is not None:
                yield Problem(model_name, number, sha, found[0], found[1])
            after = (sha, row_id)
        if len(rows) < VERIFY_PAGE:
            break
    yield from _example_problems(sessions, store, model_id)


def _example_problems(sessions: queries.Sessions, store: BlobStore, model_id: int | None) -> Iterator[Problem]:
    """The example-input blobs signatures point at, checked like artifacts (paged by version id)."""
    after = 0
    while True:
        with sessions() as s:
            rows = queries.example_page(s, model_id, after, VERIFY_PAGE)
        for row_id, model_name, number, sha, signature in rows:
            size = int(((signature or {}).get("example") or {}).get("size", -1))
            found = _check_blob(store, sha, size)
            if found is not None:
                yield Problem(model_name, number, sha, found[0], f"example inputs: {found[1]}")
            after = row_id
        if len(rows) < VERIFY_PAGE:
            return


def _check_blob(store: BlobStore, sha256: str, size: int) -> tuple[str, str] | None:
    try:
        return store.check(sha256, size)
    except StorageError as e:  # one unreadable blob is a problem to report, not the end of verify
        return "unreadable", str(e)


def _now() -> datetime:
    return datetime.now(UTC)
