"""Blob storage in a local directory: atomic renames, write-behind, verified reads through one descriptor."""

from __future__ import annotations

import errno
import os
import re
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO

from registry import _testhooks, blobfile
from registry.errors import AlreadyExists, IntegrityError
from registry.localwrite import local_target
from registry.store import TMP_PREFIX, Blob, BlobInfo, BlobStore, Progress, copy_hashing

#: Local writes start writeback every this many bytes (see ``_WriteBehind``).
WRITEBACK_WINDOW = 64 * 1024 * 1024
#: Staging files are named ``<uuid4 hex>.part``.
STAGING_RE = re.compile(r"[0-9a-f]{32}\.part")


class LocalStore(BlobStore):
    """Blobs in a directory on this machine, written read-only and read through verified descriptors."""

    def tmp_dir(self) -> Path:
        """A directory on the storage's own filesystem for staging files."""
        path = Path(self.root) / TMP_PREFIX
        with self._errors("prepare"):
            path.mkdir(parents=True, exist_ok=True)
        return path

    # -- writing ------------------------------------------------------------------------------

    def put_file(self, source: Path, *, progress: Progress | None = None) -> Blob:
        """Store the bytes of ``source``: read once, hashed while copied into a staging file, fsynced,
        then renamed into place."""
        with self._errors("write"):
            tmp = self.tmp_dir() / f"{uuid.uuid4().hex}.part"
            try:
                with open(source, "rb") as src, open(tmp, "wb") as dst, \
                        self._bar(f"store {source.name}", os.fstat(src.fileno()).st_size, progress) as tick:
                    digest, size = copy_hashing(src, _WriteBehind(dst), tick)
                    dst.flush()
                    blobfile.make_read_only(dst.fileno())
                    os.fsync(dst.fileno())
                return self._commit(tmp, digest, size)
            finally:
                tmp.unlink(missing_ok=True)

    @contextmanager
    def staging(self) -> Iterator[Path]:
        """A staging path in :meth:`tmp_dir`, on the blobs' own filesystem, so :meth:`adopt` is a rename."""
        path = self.tmp_dir() / f"{uuid.uuid4().hex}.part"
        try:
            yield path
        finally:
            path.unlink(missing_ok=True)

    def adopt(self, staged: Path, *, progress: Progress | None = None) -> Blob:
        """Store a file this process wrote into :meth:`tmp_dir`: hashed in place and renamed, one read, no copy."""
        with self._errors("write"):
            with open(staged, "rb+") as f:
                digest, size = copy_hashing(f, None, progress)
                blobfile.make_read_only(f.fileno())
                os.fsync(f.fileno())
            return self._commit(staged, digest, size)

    def confirm(self, blob: Blob, check: Callable[[Path], None]) -> None:
        """Run ``check`` on the stored blob's file: a source rewritten between its check and its copy is caught."""
        check(Path(self.key(blob.sha256)))

    def _commit(self, tmp: Path, digest: str, size: int) -> Blob:
        final = Path(self.key(digest))
        existed = final.exists()
        final.parent.mkdir(parents=True, exist_ok=True)
        # Replace even an existing blob: these bytes were just hashed, the old file may have rotted,
        # and pushing a good copy again is how a corrupt blob is repaired. Atomic for readers.
        os.replace(tmp, final)
        _fsync_dir(final.parent)
        return Blob(digest, size, written=not existed)

    # -- reading ------------------------------------------------------------------------------

    @contextmanager
    def open_verified(self, sha256: str, size: int, *, artifact: str, name: str | None = None) -> Iterator[Path]:
        """The verified bytes of ``sha256``, as a path bound to one open descriptor.

        The blob is opened once (a regular file, never through a final symlink, never blocking on a
        FIFO), its size and sha256 are checked through that descriptor, and the path yielded
        (``/proc/self/fd/N``) opens that same file: replacing the blob's path afterwards changes
        nothing that is read. The descriptor is closed when the block ends.

        Raises:
            IntegrityError: the bytes are not the recorded ones (or not a regular file of that size).
            StorageError: the blob is missing or unreadable.
        """
        path = Path(self.key(sha256))
        with self._errors("read", missing=artifact):
            try:
                fd = blobfile.open_regular(path)
            except blobfile.NotRegular as e:
                raise IntegrityError(artifact, sha256, f"{e.strerror} at {path}", name=name) from e
        try:
            with self._errors("read", missing=artifact):
                actual_size = os.fstat(fd).st_size
                if actual_size != size:
                    raise IntegrityError(artifact, sha256, f"a file of {actual_size} bytes, not {size}", name=name)
                actual = blobfile.sha256_of(fd, path, self.verified)
            if actual != sha256:
                raise IntegrityError(artifact, sha256, actual, name=name)
            _testhooks.pause("verified")  # tests swap the blob's path here: what is read must not change
            yield blobfile.fd_path(fd)
        finally:
            os.close(fd)

    def copy_to(self, sha256: str, size: int, dest: Path, *, artifact: str, name: str | None = None,
                overwrite: bool = False, progress: Progress | None = None) -> Path:
        """Write the blob to ``dest`` through a temporary file, verifying it, then rename into place."""
        tmp = dest.with_name(f".{dest.name}.{uuid.uuid4().hex[:8]}.part")
        try:
            with self._errors("read", missing=artifact), local_target(dest):
                actual = self._copy(Path(self.key(sha256)), tmp, sha256, progress)
            if actual != sha256:
                raise IntegrityError(artifact, sha256, actual, name=name)
            if not overwrite and dest.exists():
                raise AlreadyExists(f"{dest} already exists; use --force to overwrite it")
            os.replace(tmp, dest)
        finally:
            tmp.unlink(missing_ok=True)
        return dest

    def _copy(self, blob: Path, tmp: Path, sha256: str, progress: Progress | None) -> str:
        """Copy a local blob into ``tmp`` (fsynced); returns the sha256 of what was copied.

        A blob this machine has verified and that has not changed since is copied by the kernel
        (``copy_file_range``: no pass through Python, a reflink where the filesystem can); any other is
        hashed on the way, which also records it as verified.
        """
        with open(blobfile.open_regular(blob), "rb") as src, open(tmp, "wb") as dst:
            before = os.fstat(src.fileno())
            known = None
            if self.verified is not None and blobfile.trusted_for_record(before):
                known = self.verified.lookup(blob, before)
            if known == sha256 and _kernel_copy(src, dst, before.st_size, progress) \
                    and os.fstat(src.fileno()).st_ctime_ns == before.st_ctime_ns:
                actual = sha256
            else:
                src.seek(0)
                dst.seek(0)
                dst.truncate()
                actual, _ = copy_hashing(src, _WriteBehind(dst), progress)
                if self.verified is not None and blobfile.trusted_for_record(before):
                    self.verified.remember(blob, actual, before)
            dst.flush()
            os.fsync(dst.fileno())
        return actual

    def _rehash(self, key: str) -> str:
        fd = blobfile.open_regular(key)  # a FIFO or device is reported, never read or waited on
        try:
            return blobfile.hash_fd(fd)
        finally:
            os.close(fd)

    # -- gc -----------------------------------------------------------------------------------

    def touch(self, sha256: str) -> bool:
        """Set the blob's mtime to now, so gc's grace period counts from this use; False if missing."""
        with self._errors("write"):
            try:
                os.utime(self.key(sha256))
            except FileNotFoundError:
                return False
        return True

    def _forget(self, sha256: str) -> None:
        if self.verified is not None:
            self.verified.forget(self.key(sha256))

    def iter_partials(self) -> Iterator[BlobInfo]:
        """Staging files left by pushes that never finished (keyed by file name)."""
        tmp = Path(self.root) / TMP_PREFIX
        with self._errors("list"):
            if not tmp.is_dir():
                return
            for entry in os.scandir(tmp):
                # Only our own staging names: never a file someone else put there.
                if STAGING_RE.fullmatch(entry.name) and entry.is_file(follow_symlinks=False):
                    try:
                        st = entry.stat(follow_symlinks=False)
                    except FileNotFoundError:
                        continue  # renamed into place by its push since the directory was read
                    yield BlobInfo(entry.name, st.st_size, st.st_mtime)

    def delete_partial(self, name: str) -> None:
        with self._errors("delete"):
            (Path(self.root) / TMP_PREFIX / Path(name).name).unlink(missing_ok=True)


class _WriteBehind:
    """A local file being written that starts writeback of each window as soon as it is complete.

    Without it every dirty page waits for the final fsync, which then stalls for the whole file;
    with it the disk writes while the next windows are read and hashed, and the fsync waits only
    for the last window. ``POSIX_FADV_DONTNEED`` on dirty pages starts their writeback (without
    dropping them from the page cache until they are clean).
    """

    def __init__(self, f: IO[bytes]) -> None:
        self.f, self.fd = f, f.fileno()
        self.started = self.written = f.tell()

    def write(self, chunk: bytes | memoryview) -> int:
        n = self.f.write(chunk)
        self.wrote(n)
        return n

    def wrote(self, n: int) -> None:
        self.written += n
        if self.written - self.started >= WRITEBACK_WINDOW and hasattr(os, "posix_fadvise"):
            self.f.flush()
            os.posix_fadvise(self.fd, self.started, self.written - self.started, os.POSIX_FADV_DONTNEED)
            self.started = self.written


def _kernel_copy(src: IO[bytes], dst: IO[bytes], size: int, progress: Progress | None) -> bool:
    """Copy ``size`` bytes with ``copy_file_range``; False if the kernel cannot (the caller copies itself)."""
    if not hasattr(os, "copy_file_range"):
        return False
    behind = _WriteBehind(dst)
    done = 0
    while done < size:
        try:
            n = os.copy_file_range(src.fileno(), dst.fileno(), min(WRITEBACK_WINDOW, size - done))
        except OSError as e:
            if done == 0 and e.errno in (errno.EXDEV, errno.ENOSYS, errno.EOPNOTSUPP, errno.EINVAL):
                return False  # across filesystems, or not supported here
            raise
        if n == 0:
            return False  # the file is shorter than it was: copy (and hash) it the slow way
        done += n
        behind.wrote(n)
        if progress is not None:
            progress(n)
    return True


def _fsync_dir(path: Path) -> None:
    # The rename is durable only once the directory entry is on disk.
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
