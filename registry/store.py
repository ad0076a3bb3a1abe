"""Content-addressed blob storage over fsspec: sha256 keys, atomic writes, verified reads, dedup."""

from __future__ import annotations

import errno
import hashlib
import os
import re
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, Protocol

import fsspec
from fsspec.implementations.local import LocalFileSystem

from registry import _testhooks, blobfile, remote, uploads
from registry.config import redact
from registry.errors import ConfigError, FormatError, IntegrityError, StorageError
from registry.localwrite import local_target

if TYPE_CHECKING:
    from registry.verified import VerifiedFiles

BLOB_PREFIX = "blobs/sha256"
TMP_PREFIX = "tmp"
CHUNK = 4 * 1024 * 1024
#: Local writes start writeback every this many bytes (see ``_WriteBehind``).
WRITEBACK_WINDOW = 64 * 1024 * 1024
SHA256_HEX = frozenset("0123456789abcdef")
#: Staging files are named ``<uuid4 hex>.part``.
STAGING_RE = re.compile(r"[0-9a-f]{32}\.part")

#: Called with the number of bytes just transferred (progress bars).
Progress = Callable[[int], None]


class ProgressBar(Protocol):
    """What a progress factory returns (a ``tqdm`` bar is one)."""

    def update(self, n: int) -> object: ...

    def close(self) -> object: ...


#: ``factory(description, total_bytes)``: a bar for one transfer. The library never draws one itself.
ProgressFactory = Callable[[str, int], ProgressBar]


@dataclass(frozen=True, slots=True)
class Blob:
    """Where a stored artifact is, and whether this call wrote it or found it already there."""

    sha256: str
    size: int
    written: bool


@dataclass(frozen=True, slots=True)
class BlobInfo:
    sha256: str  # for partials: the staging file's name
    size: int
    mtime: float  # seconds since the epoch, for gc's grace period


def is_sha256(text: object) -> bool:
    """Whether ``text`` is a sha256 hex digest as the registry writes them (64 lowercase hex digits)."""
    return isinstance(text, str) and len(text) == 64 and SHA256_HEX.issuperset(text)


class BlobStore:
    """Blobs keyed by sha256 under ``<root>/blobs/sha256/ab/abcdef…``, over any fsspec filesystem."""

    def __init__(self, url: str, options: dict[str, Any] | None = None, *, progress: ProgressFactory | None = None,
                 verified: VerifiedFiles | None = None, timeout: float | None = None) -> None:
        self.url = url
        self.display_url = redact(url)
        self.progress = progress
        #: Hashes of local blob files already verified on this machine (None: re-hash on every read).
        self.verified = verified
        #: Upload parts are at least this large (tests lower it to S3's 5 MiB minimum).
        self.part_size = remote.PART_SIZE
        self._secrets = remote.secrets(options or {})
        try:
            self.fs, self.root = fsspec.core.url_to_fs(
                url, **remote.storage_options(url, options or {}, timeout=timeout))
        except (ValueError, ImportError, TypeError) as e:
            hint = "; install it with pip install 'model-registry[s3]'" if isinstance(e, ImportError) else ""
            raise ConfigError(f"cannot use storage {self.display_url!r}: "
                              f"{remote.scrub(str(e), self._secrets)}{hint}") from e
        self.root = self.root.rstrip("/")
        self.local = isinstance(self.fs, LocalFileSystem)
        self._foreign_errors = remote.transport_errors(self.fs.protocol)
        if remote.is_s3(self.fs.protocol):
            self.fs.retries = remote.S3FS_RETRIES  # botocore's attempts are the whole retry budget

    # -- keys ---------------------------------------------------------------------------------

    def key(self, sha256: str) -> str:
        if not is_sha256(sha256):  # from a database row: the only thing between it and a path
            raise FormatError(f"recorded sha256 {str(sha256)[:80]!r} is not 64 lowercase hex digits: "
                              "the version's database row is damaged; delete the version or restore the database")
        return f"{self.root}/{BLOB_PREFIX}/{sha256[:2]}/{sha256}"

    def tmp_dir(self) -> Path:
        """A directory on the storage's own filesystem for staging files (local storage only)."""
        assert self.local
        path = Path(self.root) / TMP_PREFIX
        with self._errors("prepare"):
            path.mkdir(parents=True, exist_ok=True)
        return path

    # -- writing ------------------------------------------------------------------------------

    def put_file(self, source: Path, *, progress: Progress | None = None) -> Blob:
        """Store the bytes of ``source``; returns where they are.

        Local storage reads it once, hashing while copying into a temporary file, fsyncs it and
        renames it into place. Remote storage hashes first, then uploads straight to the final key
        (S3 has no rename; an object appears only once its upload completes), skipping the upload
        when an object of that key and size already exists.
        """
        if self.local:
            with self._errors("write"):
                tmp = self.tmp_dir() / f"{uuid.uuid4().hex}.part"
                try:
                    with open(source, "rb") as src, open(tmp, "wb") as dst, \
                            self._bar(f"store {source.name}", os.fstat(src.fileno()).st_size, progress) as tick:
                        digest, size = _copy_hashing(src, _WriteBehind(dst), tick)
                        dst.flush()
                        blobfile.make_read_only(dst.fileno())
                        os.fsync(dst.fileno())
                    return self._commit_local(tmp, digest, size)
                finally:
                    tmp.unlink(missing_ok=True)
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
            actual, _ = _copy_hashing(src, dst, progress)
            if actual != digest:  # the file changed after it was hashed: never complete the upload
                raise StorageError(f"the file changed while it was being uploaded to {self.display_url}; "
                                   "push it again", url=self.display_url)
            dst.close()  # sends the last part and completes the upload (or PUTs a small file): atomic
        except BaseException as e:
            failure = dst.abort()
            if failure is not None:
                e.add_note(remote.scrub(failure, self._secrets))
            raise

    def adopt(self, staged: Path, *, progress: Progress | None = None) -> Blob:
        """Store a file this process wrote into :meth:`tmp_dir` (or anywhere, for remote storage).

        On local storage the file is hashed in place and renamed: one read, no copy.
        """
        if not self.local:
            return self.put_file(staged, progress=progress)
        with self._errors("write"):
            with open(staged, "rb+") as f:
                digest, size = _copy_hashing(f, None, progress)
                blobfile.make_read_only(f.fileno())
                os.fsync(f.fileno())
            return self._commit_local(staged, digest, size)

    def _commit_local(self, tmp: Path, digest: str, size: int) -> Blob:
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
        """The verified bytes of ``sha256``, as a path bound to one open descriptor (local storage only).

        The blob is opened once (a regular file, never through a final symlink, never blocking on a
        FIFO), its size and sha256 are checked through that descriptor, and the path yielded
        (``/proc/self/fd/N``) opens that same file: replacing the blob's path afterwards changes
        nothing that is read. The descriptor is closed when the block ends.

        Raises:
            IntegrityError: the bytes are not the recorded ones (or not a regular file of that size).
            StorageError: the blob is missing or unreadable.
        """
        if not self.local:
            raise NotImplementedError("remote storage needs the cache")  # pragma: no cover
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

    def copy_to(
        self,
        sha256: str,
        dest: Path,
        *,
        artifact: str,
        name: str | None = None,
        overwrite: bool = False,
        progress: Progress | None = None,
    ) -> Path:
        """Write the blob to ``dest`` through a temporary file, verifying it, then rename into place."""
        tmp = dest.with_name(f".{dest.name}.{uuid.uuid4().hex[:8]}.part")
        try:
            if self.local:
                with self._errors("read", missing=artifact), local_target(dest):
                    actual = self._copy_local(Path(self.key(sha256)), tmp, sha256, progress)
            else:
                with self._errors("read", missing=artifact), local_target(dest), \
                        self.fs.open(self.key(sha256), "rb") as src:
                    with open(tmp, "wb") as dst:
                        actual, _ = _copy_hashing(src, dst, progress)
                        dst.flush()
                        os.fsync(dst.fileno())
            if actual != sha256:
                raise IntegrityError(artifact, sha256, actual, name=name)
            if not overwrite and dest.exists():
                from registry.errors import AlreadyExists

                raise AlreadyExists(f"{dest} already exists; use --force to overwrite it")
            os.replace(tmp, dest)
        finally:
            tmp.unlink(missing_ok=True)
        return dest

    def _copy_local(self, blob: Path, tmp: Path, sha256: str, progress: Progress | None) -> str:
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
                actual, _ = _copy_hashing(src, _WriteBehind(dst), progress)
                if self.verified is not None and blobfile.trusted_for_record(before):
                    self.verified.remember(blob, actual, before)
            dst.flush()
            os.fsync(dst.fileno())
        return actual

    def download(self, sha256: str, size: int, dest: Path, *, artifact: str) -> str:
        """Stream a blob into the new local file ``dest``, hashing it; returns the sha256 that arrived.

        The caller compares it and renames ``dest`` into place (or removes it): see :mod:`registry.cache`.
        """
        with self._errors("read", missing=artifact), local_target(dest), \
                self.fs.open(self.key(sha256), "rb", block_size=self.part_size) as src, \
                open(dest, "xb") as dst, self._bar(f"download {artifact}", size) as tick:
            actual, _ = _copy_hashing(src, dst, tick)
            dst.flush()
            os.fsync(dst.fileno())
        return actual

    def check(self, sha256: str, size: int) -> tuple[str, str] | None:
        """Re-hash one blob: None if intact, else ``(kind, detail)`` with kind missing/size/corrupt."""
        if not is_sha256(sha256):
            return "corrupt", f"recorded sha256 {str(sha256)[:80]!r} is not 64 lowercase hex digits"
        key = self.key(sha256)
        with self._errors("read"):
            actual_size = self._size(key)
            if actual_size is None:
                return "missing", f"blob {sha256} is missing from {self.display_url}"
            if actual_size != size:
                return "size", f"blob {sha256} has {actual_size} bytes, expected {size}"
            if self.local:
                try:
                    fd = blobfile.open_regular(key)
                except blobfile.NotRegular as e:
                    return "corrupt", f"{key} is {e.strerror}"
                try:
                    actual = blobfile.hash_fd(fd)
                finally:
                    os.close(fd)
            else:
                with self.fs.open(key, "rb") as f:
                    actual, _ = _copy_hashing(f, None, None)
        if actual != sha256:
            return "corrupt", f"blob has sha256 {actual}, expected {sha256}"
        return None

    def exists(self, sha256: str) -> bool:
        with self._errors("read"):
            return self._size(self.key(sha256)) is not None

    def stat(self, sha256: str) -> BlobInfo | None:
        """One blob's size and mtime as storage reports them now (None if missing): gc's re-check."""
        key = self.key(sha256)
        with self._errors("read"):
            if not self.local:
                self.fs.invalidate_cache(key)
            try:
                info = self.fs.info(key)
            except FileNotFoundError:
                return None
        return BlobInfo(sha256, int(info["size"]), _mtime(info))

    def touch(self, sha256: str) -> bool:
        """Set a local blob's mtime to now, so gc's grace period counts from this use; False if missing.

        Remote storage has no cheap touch (S3 would copy the object onto itself): returns False there.
        """
        if not self.local:
            return False
        with self._errors("write"):
            try:
                os.utime(self.key(sha256))
            except FileNotFoundError:
                return False
        return True

    def delete(self, sha256: str) -> None:
        if not is_sha256(sha256):
            return  # a damaged database row names no blob
        with self._errors("delete"):
            if self.local and self.verified is not None:
                self.verified.forget(self.key(sha256))
            try:
                self.fs.rm_file(self.key(sha256))
            except FileNotFoundError:
                pass

    def iter_blobs(self) -> Iterator[BlobInfo]:
        """Every blob in storage (streamed directory by directory)."""
        base = f"{self.root}/{BLOB_PREFIX}"
        with self._errors("list"):
            if not self.local:
                self.fs.invalidate_cache()  # listings cached earlier miss other processes' writes
            if not self.fs.exists(base):
                return
            for prefix in sorted(self.fs.ls(base, detail=False)):
                for info in self.fs.ls(prefix, detail=True):
                    sha = str(info["name"]).rstrip("/").rsplit("/", 1)[-1]
                    if len(sha) == 64 and SHA256_HEX.issuperset(sha):
                        yield BlobInfo(sha, int(info["size"]), _mtime(info))

    def iter_partials(self) -> Iterator[BlobInfo]:
        """Staging files left by pushes that never finished (local storage; keyed by file name)."""
        if not self.local:
            return
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

    def scan_uploads(self, cutoff: float) -> uploads.Scan:
        """Incomplete multipart uploads under this store started at or before ``cutoff`` (S3 only)."""
        if not remote.is_s3(self.fs.protocol):
            return uploads.Scan()
        with self._errors("list uploads in"):
            return uploads.scan(self.fs, self.root, f"{self.root}/{BLOB_PREFIX}/", cutoff)

    def can_abort_uploads(self) -> str | None:
        """None if the server aborts multipart uploads, else why not (``gc --dry-run`` asks)."""
        with self._errors("abort an upload in"):
            return uploads.can_abort(self.fs, self.root)

    def abort_upload(self, upload: uploads.Upload) -> str | None:
        """Abort one upload and forget its marker; None when done, else why it could not be aborted."""
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

    def relative(self, key: str) -> str:
        """``key`` relative to the store's root, for messages."""
        return key.removeprefix(f"{self.root}/")

    def _size(self, key: str) -> int | None:
        if not self.local:
            self.fs.invalidate_cache(key)  # a cached listing may predate another process's write or delete
        try:
            return int(self.fs.size(key))
        except FileNotFoundError:
            return None

    @contextmanager
    def _bar(self, description: str, total: int, given: Progress | None = None) -> Iterator[Progress | None]:
        """A progress callback for one transfer: the caller's, else one from the progress factory."""
        if given is not None or self.progress is None:
            yield given
            return
        bar = self.progress(description, total)

        def tick(n: int) -> None:
            bar.update(n)

        try:
            yield tick
        finally:
            bar.close()

    @contextmanager
    def _errors(self, action: str, *, missing: str | None = None) -> Iterator[None]:
        """Translate storage failures (s3fs already maps boto errors to builtins) once, here."""
        try:
            yield
        except StorageError as e:
            if getattr(e, "__notes__", None):  # this store's own error, plus what its upload left behind
                raise StorageError(self._reason(e), url=self.display_url) from e
            raise
        except FileNotFoundError as e:
            if missing is not None:
                raise StorageError(
                    f"artifact {missing} is missing from storage {self.display_url}; "
                    f"run 'registry verify' to list damaged versions",
                    url=self.display_url,
                ) from e
            raise StorageError(f"cannot {action} storage {self.display_url}: {self._reason(e)}",
                               url=self.display_url) from e
        except PermissionError as e:
            hint = "" if self.local else ("; check the credentials (AWS_* variables, AWS_PROFILE or "
                                          "REGISTRY_STORAGE_OPTIONS)")
            raise StorageError(f"cannot {action} storage {self.display_url}: {self._reason(e)}{hint}",
                               url=self.display_url) from e
        except OSError as e:
            raise StorageError(f"cannot {action} storage {self.display_url}: {self._reason(e)}",
                               url=self.display_url) from e
        except self._foreign_errors as e:  # botocore: no endpoint, no credentials, ...
            raise StorageError(f"cannot {action} storage {self.display_url}: {self._reason(e)}",
                               url=self.display_url) from e
        except (TypeError, ValueError, NotImplementedError) as e:
            if self.local:
                raise
            # Remote clients are built on first use: bad storage options or endpoints surface here.
            raise StorageError(f"cannot {action} storage {self.display_url}: {self._reason(e)}; check "
                               "REGISTRY_STORAGE_OPTIONS and the AWS_* variables", url=self.display_url) from e

    def _reason(self, e: BaseException) -> str:
        """One line, credentials scrubbed: server messages may echo what they were sent.

        Notes added on the way out (an upload that could not be aborted) end the line.
        """
        if remote.unsupported(e):
            text = uploads.why(e)
        else:
            text = (e.strerror if isinstance(e, OSError) else None) or str(e) or type(e).__name__
        text = "; ".join([text, *getattr(e, "__notes__", ())])
        return remote.scrub(text, self._secrets)


def hash_file(path: Path, progress: Progress | None = None) -> tuple[str, int]:
    """sha256 hex digest and size of a file, read in chunks."""
    with open(path, "rb") as f:
        return _copy_hashing(f, None, progress)


def _copy_hashing(src: IO[bytes], dst: _Writable | None, progress: Progress | None) -> tuple[str, int]:
    digest = hashlib.sha256()
    size = 0
    buf = bytearray(CHUNK)
    view = memoryview(buf)
    readinto = getattr(src, "readinto", None)
    while True:
        if readinto is not None:
            n = readinto(buf)
            chunk = view[:n]
        else:  # some fsspec files only offer read()
            data = src.read(CHUNK)
            n, chunk = len(data), memoryview(data)
        if not n:
            break
        digest.update(chunk)
        if dst is not None:
            dst.write(chunk)
        size += n
        if progress is not None:
            progress(n)
        if size == n:
            _testhooks.pause("hashing")  # crash tests: mid-copy, with the staging file on disk
    return digest.hexdigest(), size


class _Writable(Protocol):
    def write(self, data: memoryview, /) -> int: ...


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


def _mtime(info: dict[str, Any]) -> float:
    value = info.get("mtime") or info.get("LastModified") or info.get("created") or 0
    return float(value.timestamp()) if hasattr(value, "timestamp") else float(value)

