"""A local cache of remote blobs: fetched once, verified while streaming, renamed into place, re-verified on use.

The cache is itself a :class:`~registry.localstore.LocalStore` (same ``blobs/sha256/ab/<hex>``
layout, same verified reads and atomic renames) under ``$REGISTRY_CACHE`` (default
``$REGISTRY_HOME/cache``). A blob enters it only after the bytes that arrived hashed to the
expected sha256, so a corrupt remote object never poisons it; a cache file that fails
verification later is discarded and fetched again.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

from registry import blobfile
from registry.errors import IntegrityError, StorageError
from registry.localstore import LocalStore
from registry.records import CacheInfo
from registry.store import ProgressFactory

if TYPE_CHECKING:
    from registry.objectstore import ObjectStore
    from registry.verified import VerifiedFiles


class BlobCache:
    """Verified local copies of the blobs of an :class:`~registry.objectstore.ObjectStore`."""

    def __init__(self, root: Path, *, progress: ProgressFactory | None = None,
                 verified: VerifiedFiles | None = None) -> None:
        self.root = root
        self._blobs: LocalStore | None = None
        self._progress = progress
        self._verified = verified  # cached files this machine hashed and that did not change are not re-hashed

    @property
    def blobs(self) -> LocalStore:
        """The cached blobs, as a local store (its directory is created on first use)."""
        if self._blobs is None:
            try:  # private to its user, like the verification records that vouch for its files
                self.root.mkdir(parents=True, exist_ok=True, mode=0o700)
            except OSError as e:
                raise StorageError(f"cannot create the cache {self.root}: {e.strerror or e}", url=str(self.root)) from e
            self._blobs = LocalStore(str(self.root), progress=self._progress, verified=self._verified)
        return self._blobs

    @contextmanager
    def open_verified(self, remote: ObjectStore, sha256: str, size: int, *, artifact: str,
                      name: str | None = None) -> Iterator[Path]:
        """The verified bytes of ``sha256`` from the cache, downloading them first if absent or damaged.

        Yields a path bound to one open descriptor, as :meth:`LocalStore.open_verified` does.
        """
        held = ExitStack()
        try:
            path = held.enter_context(self.blobs.open_verified(sha256, size, artifact=artifact, name=name))
        except IntegrityError:
            self.blobs.delete(sha256)  # damaged since it was cached: discard and fetch again
        except StorageError as e:
            if not isinstance(e.__cause__, FileNotFoundError):
                raise
        else:
            with held:
                yield path
            return
        self._fetch(remote, sha256, size, artifact=artifact, name=name)
        with self.blobs.open_verified(sha256, size, artifact=artifact, name=name) as path:
            yield path

    def copy_to(self, remote: ObjectStore, sha256: str, size: int, dest: Path, *, artifact: str,
                name: str | None = None, overwrite: bool = False) -> Path:
        """Write the verified blob to ``dest`` atomically, through the cache (hashed once per copy)."""
        if not self.blobs.exists(sha256):
            self._fetch(remote, sha256, size, artifact=artifact, name=name)
        try:
            return self.blobs.copy_to(sha256, size, dest, artifact=artifact, name=name, overwrite=overwrite)
        except IntegrityError:
            self.blobs.delete(sha256)
        self._fetch(remote, sha256, size, artifact=artifact, name=name)
        return self.blobs.copy_to(sha256, size, dest, artifact=artifact, name=name, overwrite=overwrite)

    def info(self) -> CacheInfo:
        """Where the cache is, how many blobs it holds and their total size."""
        blobs = list(self.blobs.iter_blobs()) if self.root.is_dir() else []
        return CacheInfo(str(self.root), len(blobs), sum(b.size for b in blobs))

    def clear(self) -> CacheInfo:
        """Remove every cached blob (and download leftovers); returns what was removed."""
        before = self.info()
        if self.root.is_dir():  # only what the cache itself wrote: sha256-named blobs, staging files
            for blob in list(self.blobs.iter_blobs()):
                self.blobs.delete(blob.sha256)
            for part in list(self.blobs.iter_partials()):
                self.blobs.delete_partial(part.sha256)
        return before

    def _fetch(self, remote: ObjectStore, sha256: str, size: int, *, artifact: str, name: str | None) -> Path:
        local = self.blobs
        final = Path(local.key(sha256))
        tmp = local.tmp_dir() / f"{uuid.uuid4().hex}.part"
        try:
            actual = remote.download(sha256, size, tmp, artifact=artifact)
            if actual != sha256:
                raise IntegrityError(artifact, sha256, actual, name=name)
            try:
                os.chmod(tmp, blobfile.BLOB_MODE)
                final.parent.mkdir(parents=True, exist_ok=True)
                os.replace(tmp, final)  # atomic: a concurrent reader sees no file or the verified one
            except OSError as e:
                raise StorageError(f"cannot write the cache {self.root}: {e.strerror or e}",
                                   url=str(self.root)) from e
        finally:
            tmp.unlink(missing_ok=True)
        return final
