"""Blob storage in an object store (S3, or any other fsspec filesystem), read through a verified local cache."""

from __future__ import annotations

import os
import shutil
import tempfile
import uuid
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, ClassVar

from registry import remote, uploads
from registry.errors import StorageError
from registry.localwrite import local_target
from registry.store import BLOB_PREFIX, Blob, BlobStore, Progress, ProgressFactory, copy_hashing, hash_file

if TYPE_CHECKING:
    from registry.cache import BlobCache
    from registry.verified import VerifiedFiles


class ObjectStore(BlobStore):
    """Blobs uploaded straight to their final key (no rename on S3), downloaded into a local cache to be read.

    Args:
        cache: where verified downloads are kept (default: a private temporary directory per store).
    """

    permission_hint: ClassVar[str] = ("; check the credentials (AWS_* variables, AWS_PROFILE or "
                                      "REGISTRY_STORAGE_OPTIONS)")
    config_errors: ClassVar[tuple[type[BaseException], ...]] = (TypeError, ValueError, NotImplementedError)

    def __init__(self, url: str, options: dict[str, Any] | None = None, *, progress: ProgressFactory | None = None,
                 verified: VerifiedFiles | None = None, timeout: float | None = None,
                 cache: BlobCache | None = None) -> None:
        super().__init__(url, options, progress=progress, verified=verified, timeout=timeout)
        #: Upload parts are at least this large (tests lower it to S3's 5 MiB minimum).
        self.part_size = remote.PART_SIZE
        self._cache = cache
        if remote.is_s3(self.fs.protocol):
            self.fs.retries = remote.S3FS_RETRIES  # botocore's attempts are the whole retry budget

    @property
    def cache(self) -> BlobCache:
        """The local cache downloads go into."""
        if self._cache is None:
            from registry.cache import BlobCache

            self._cache = BlobCache(Path(tempfile.mkdtemp(prefix="registry-cache-")), progress=self.progress,
                                    verified=self.verified)
        return self._cache

    # -- writing ------------------------------------------------------------------------------

    def put_file(self, source: Path, *, progress: Progress | None = None) -> Blob:
        """Store the bytes of ``source``: hashed first, then uploaded straight to the final key (an
        object appears only once its upload completes); skipped when an object of that key and size exists."""
        with self._bar(f"hash {source.name}", source.stat().st_size) as tick:
            digest, size = hash_file(source, tick)
        with self._errors("upload to"):
            key = self.key(digest)
            if self._size(key) == size:
                return Blob(digest, size, written=False)
            with open(source, "rb") as src, self._bar(f"upload sha256:{digest[:12]}", size, progress) as tick:
                self._upload(src, key, digest, size, tick)
        return Blob(digest, size, written=True)

    def _upload(self, src: IO[bytes], key: str, digest: str, size: int, progress: Progress | None) -> None:
        """Stream ``src`` to its final key: one PUT, or a multipart upload in parts of bounded size.

        On any failure, Ctrl-C and SIGTERM included, the multipart upload is aborted, so S3 keeps (and
        bills) nothing. If the abort fails too, the error says so (parts remain), and the upload's
        marker stays for ``registry gc``; so do the uploads a SIGKILL leaves behind.
        """
        dst = uploads.MultipartWriter(self.fs, self.root, key, size, remote.part_size(size, self.part_size))
        try:
            actual, _ = copy_hashing(src, dst, progress)
            if actual != digest:  # the file changed after it was hashed: never complete the upload
                raise StorageError(f"the file changed while it was being uploaded to {self.display_url}; "
                                   "push it again", url=self.display_url)
            dst.close()  # sends the last part and completes the upload (or PUTs a small file): atomic
        except BaseException as e:
            failure = dst.abort()
            if failure is not None:
                e.add_note(remote.scrub(failure, self._secrets))
            raise

    @contextmanager
    def staging(self) -> Iterator[Path]:
        """A staging path in a private temporary directory (the upload reads it from there)."""
        directory = Path(tempfile.mkdtemp(prefix="registry-"))
        try:
            yield directory / f"{uuid.uuid4().hex}.part"
        finally:
            shutil.rmtree(directory, ignore_errors=True)

    def adopt(self, staged: Path, *, progress: Progress | None = None) -> Blob:
        return self.put_file(staged, progress=progress)

    def confirm(self, blob: Blob, check: Callable[[Path], None]) -> None:
        """Nothing to re-read: the upload refuses bytes that changed after they were hashed."""

    # -- reading ------------------------------------------------------------------------------

    def open_verified(self, sha256: str, size: int, *, artifact: str,
                      name: str | None = None) -> AbstractContextManager[Path]:
        """The verified bytes of ``sha256`` from the cache, downloading them first if absent or damaged."""
        return self.cache.open_verified(self, sha256, size, artifact=artifact, name=name)

    def copy_to(self, sha256: str, size: int, dest: Path, *, artifact: str, name: str | None = None,
                overwrite: bool = False) -> Path:
        """Write the verified blob to ``dest`` atomically, through the cache."""
        return self.cache.copy_to(self, sha256, size, dest, artifact=artifact, name=name, overwrite=overwrite)

    def download(self, sha256: str, size: int, dest: Path, *, artifact: str) -> str:
        """Stream a blob into the new local file ``dest``, hashing it; returns the sha256 that arrived.

        The caller compares it and renames ``dest`` into place (or removes it): see :mod:`registry.cache`.
        """
        with self._errors("read", missing=artifact), local_target(dest), \
                self.fs.open(self.key(sha256), "rb", block_size=self.part_size) as src, \
                open(dest, "xb") as dst, self._bar(f"download {artifact}", size) as tick:
            actual, _ = copy_hashing(src, dst, tick)
            dst.flush()
            os.fsync(dst.fileno())
        return actual

    def _rehash(self, key: str) -> str:
        with self.fs.open(key, "rb") as f:  # streamed from the server, never from the cache
            return copy_hashing(f, None, None)[0]

    # -- gc -----------------------------------------------------------------------------------

    def touch(self, sha256: str) -> bool:
        """No cheap touch here (S3 would copy the object onto itself): always False."""
        return False

    def _refresh(self, key: str | None) -> None:
        if key is None:
            self.fs.invalidate_cache()
        else:
            self.fs.invalidate_cache(key)

    def scan_uploads(self, cutoff: float) -> uploads.Scan:
        """Incomplete multipart uploads under this store started at or before ``cutoff`` (S3 only)."""
        if not remote.is_s3(self.fs.protocol):
            return uploads.Scan()
        with self._errors("list uploads in"):
            return uploads.scan(self.fs, self.root, f"{self.root}/{BLOB_PREFIX}/", cutoff)

    def can_abort_uploads(self) -> str | None:
        with self._errors("abort an upload in"):
            return uploads.can_abort(self.fs, self.root)

    def abort_upload(self, upload: uploads.Upload) -> str | None:
        try:
            with self._errors("abort an upload in"):
                uploads.abort(self.fs, upload.key, upload.upload_id)
        except StorageError as e:
            return self._reason(e.__cause__ if e.__cause__ is not None and remote.unsupported(e.__cause__) else e)
        if upload.marker is not None:
            self.forget_marker(upload.marker)
        return None

    def forget_marker(self, marker: str) -> None:
        with self._errors("delete"):
            try:
                uploads.forget(self.fs, marker)
            except FileNotFoundError:
                pass
