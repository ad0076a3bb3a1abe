"""A local cache of remote blobs: fetched once, verified while streaming, renamed into place, re-verified on use.

The cache is itself a local :class:`~registry.store.BlobStore` (same ``blobs/sha256/ab/<hex>``
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
from registry.records import CacheInfo
from registry.store import BlobStore, ProgressFactory

if TYPE_CHECKING:
    from registry.verified import VerifiedFiles


class BlobCache:
    """Verified local copies of the blobs of a remote :class:`BlobStore`."""

    def __init__(self, root: Path, *, progress: ProgressFactory | None = None,
                 verified: VerifiedFiles | None = None) -> None:
        self.root = root
        self._local: BlobStore | None = None
        self._progress = progress
        self._verified = verified  # cached files this machine hashed and that did not change are not re-hashed

    @property
    def local(self) -> BlobStore:
        if self._local is None:
            try:  # private to its user, like the verification records that vouch for its files
                self.root.mkdir(parents=True, exist_ok=True, mode=0o700)
            except OSError as e:
                raise StorageError(f"cannot create the cache {self.root}: {e.strerror or e}", url=str(self.root)) from e
            self._local = BlobStore(str(self.root), progress=self._progress, verified=self._verified)
        return self._local

    @contextmanager
    def open_verified(self, remote: BlobStore, sha256: str, size: int, *, artifact: str,
                      name: str | None = None) -> Iterator[Path]:
        """The verified bytes of ``sha256`` from the cache, downloading them first if absent or damaged.

        Yields a path bound to one open descriptor, as :meth:`BlobStore.open_verified` does.
        """
        held = ExitStack()
        try:
            path = held.enter_context(self.local.open_verified(sha256, size, artifact=artifact, name=name))
        except IntegrityError:
            self.local.delete(sha256)  # damaged since it was cached: discard and fetch again
        except StorageError as e:
            if not isinstance(e.__cause__, FileNotFoundError):
                raise
        else:
            with held:
                yield path
            return
        self._fetch(remote, sha256, size, artifact=artifact, name=name)
        with self.local.open_verified(sha256, size, artifact=artifact, name=name) as path:
            yield path

    def copy_to(self, remote: BlobStore, sha256: str, size: int, dest: Path, *, artifact: str,
                name: str | None = None, overwrite: bool = False) -> Path:
        """Write the verified blob to ``dest`` atomically, through the cache (hashed once per copy)."""
        if not self.local.exists(sha256):
            self._fetch(remote, sha256, size, artifact=artifact, name=name)
        try:
            return self.local.copy_to(sha256, dest, artifact=artifact, name=name, overwrite=overwrite)
        except IntegrityError:
            self.local.delete(sha256)
        self._fetch(remote, sha256, size, artifact=artifact, name=name)
        return self.local.copy_to(sha256, dest, artifact=artifact, name=name, overwrite=overwrite)

    def info(self) -> CacheInfo:
        """Where the cache is, how many blobs it holds and their total size."""
        blobs = list(self.local.iter_blobs()) if self.root.is_dir() else []
        return CacheInfo(str(self.root), len(blobs), sum(b.size for b in blobs))

    def clear(self) -> CacheInfo:
        """Remove every cached blob (and download leftovers); returns what was removed."""
        before = self.info()
        if self.root.is_dir():  # only what the cache itself wrote: sha256-named blobs, staging files
            for blob in list(self.local.iter_blobs()):
                self.local.delete(blob.sha256)
            for part in list(self.local.iter_partials()):
                self.local.delete_partial(part.sha256)
        return before

    def _fetch(self, remote: BlobStore, sha256: str, size: int, *, artifact: str, name: str | None) -> Path:
        local = self.local
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
