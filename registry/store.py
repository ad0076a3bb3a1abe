"""Content-addressed blob storage: the interface both backends share, their common parts, and ``open_store``.

Blobs are keyed by sha256 under ``<root>/blobs/sha256/ab/abcdef…``. Two implementations:
:class:`registry.localstore.LocalStore` (a directory: atomic renames, verified reads through one
descriptor) and :class:`registry.objectstore.ObjectStore` (S3 or any other fsspec filesystem: direct
multipart uploads, reads through a verified local cache). Callers hold a :class:`BlobStore` and never
ask which one it is; :func:`open_store` picks it from the URL.
"""

from __future__ import annotations

import hashlib
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, ClassVar, Protocol

from registry import _testhooks, blobfile, remote, uploads
from registry.config import redact
from registry.errors import ConfigError, FormatError, StorageError

if TYPE_CHECKING:
    from registry.cache import BlobCache
    from registry.verified import VerifiedFiles

BLOB_PREFIX = "blobs/sha256"
TMP_PREFIX = "tmp"
CHUNK = 4 * 1024 * 1024
SHA256_HEX = frozenset("0123456789abcdef")

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


def open_store(url: str, options: dict[str, Any] | None = None, *, progress: ProgressFactory | None = None,
               verified: VerifiedFiles | None = None, timeout: float | None = None,
               cache: BlobCache | None = None) -> BlobStore:
    """The store for ``url``: a :class:`LocalStore` for a local path, else an :class:`ObjectStore`.

    Args:
        cache: where an object store keeps verified copies of what it downloads (ignored for a
            local directory, whose blobs are read in place).
    """
    if _is_local(url):
        from registry.localstore import LocalStore

        return LocalStore(url, options, progress=progress, verified=verified, timeout=timeout)
    from registry.objectstore import ObjectStore

    return ObjectStore(url, options, progress=progress, verified=verified, timeout=timeout, cache=cache)


def _is_local(url: str) -> bool:
    import fsspec
    from fsspec.implementations.local import LocalFileSystem

    protocol = fsspec.core.split_protocol(url)[0] or "file"
    try:
        return issubclass(fsspec.get_filesystem_class(protocol), LocalFileSystem)
    except (ValueError, ImportError):  # the store's constructor reports it, with the install hint
        return False


class BlobStore(ABC):
    """Blobs keyed by sha256 over an fsspec filesystem: what every backend offers, and what they share.

    Reads that feed a deserialiser go through :meth:`open_verified`; writes through :meth:`put_file`
    (a file anywhere) or :meth:`staging` + :meth:`adopt` (a file this process writes); gc uses
    :meth:`iter_blobs`, :meth:`stat`, :meth:`delete` and the hooks after them.
    """

    #: Added to a permission failure's message (where credentials are the likely cause).
    permission_hint: ClassVar[str] = ""
    #: Client errors that mean bad options or endpoints (remote clients are built on first use).
    config_errors: ClassVar[tuple[type[BaseException], ...]] = ()

    def __init__(self, url: str, options: dict[str, Any] | None = None, *, progress: ProgressFactory | None = None,
                 verified: VerifiedFiles | None = None, timeout: float | None = None) -> None:
        import fsspec

        self.url = url
        self.display_url = redact(url)
        self.progress = progress
        #: Hashes of local blob files already verified on this machine (None: re-hash on every read).
        self.verified = verified
        self._secrets = remote.secrets(options or {})
        try:
            self.fs, self.root = fsspec.core.url_to_fs(
                url, **remote.storage_options(url, options or {}, timeout=timeout))
        except (ValueError, ImportError, TypeError) as e:
            hint = "; install it with pip install 'torch-model-registry[s3]'" if isinstance(e, ImportError) else ""
            raise ConfigError(f"cannot use storage {self.display_url!r}: "
                              f"{remote.scrub(str(e), self._secrets)}{hint}") from e
        self.root = self.root.rstrip("/")
        self._foreign_errors = remote.transport_errors(self.fs.protocol)

    # -- the interface ------------------------------------------------------------------------

    @abstractmethod
    def put_file(self, source: Path, *, progress: Progress | None = None) -> Blob:
        """Store the bytes of ``source``; returns where they are."""

    @abstractmethod
    def staging(self) -> AbstractContextManager[Path]:
        """A fresh path to write a file to before :meth:`adopt` stores it; removed when the block ends."""

    @abstractmethod
    def adopt(self, staged: Path, *, progress: Progress | None = None) -> Blob:
        """Store a file this process wrote at a :meth:`staging` path."""

    @abstractmethod
    def confirm(self, blob: Blob, check: Callable[[Path], None]) -> None:
        """Run ``check`` on the stored bytes where they can be read in place (a push's re-check).

        Raises:
            FileNotFoundError: the blob is gone (a concurrent gc or delete); store it again.
        """

    @abstractmethod
    def open_verified(self, sha256: str, size: int, *, artifact: str,
                      name: str | None = None) -> AbstractContextManager[Path]:
        """The verified bytes of ``sha256``, as a local path bound to one open descriptor.

        Whatever is deserialised must be read through this path while the block is open: it is the
        file that was verified, whatever happens to the blob's name (see :mod:`registry.blobfile`).

        Raises:
            IntegrityError: the bytes are not the recorded ones.
            StorageError: the blob is missing or unreadable.
        """

    @abstractmethod
    def copy_to(self, sha256: str, size: int, dest: Path, *, artifact: str, name: str | None = None,
                overwrite: bool = False) -> Path:
        """Write the verified blob to ``dest`` through a temporary file, then rename it into place."""

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
            try:
                actual = self._rehash(key)
            except blobfile.NotRegular as e:
                return "corrupt", f"{key} is {e.strerror}"
        if actual != sha256:
            return "corrupt", f"blob has sha256 {actual}, expected {sha256}"
        return None

    @abstractmethod
    def _rehash(self, key: str) -> str:
        """The sha256 of the bytes stored under ``key``, read now (never from a record)."""

    @abstractmethod
    def touch(self, sha256: str) -> bool:
        """Restart a blob's gc grace period from now; False if missing or the backend cannot."""

    # -- keys and lookups ---------------------------------------------------------------------

    def key(self, sha256: str) -> str:
        if not is_sha256(sha256):  # from a database row: the only thing between it and a path
            raise FormatError(f"recorded sha256 {str(sha256)[:80]!r} is not 64 lowercase hex digits: "
                              "the version's database row is damaged; delete the version or restore the database")
        return f"{self.root}/{BLOB_PREFIX}/{sha256[:2]}/{sha256}"

    def relative(self, key: str) -> str:
        """``key`` relative to the store's root, for messages."""
        return key.removeprefix(f"{self.root}/")

    def exists(self, sha256: str) -> bool:
        with self._errors("read"):
            return self._size(self.key(sha256)) is not None

    def stat(self, sha256: str) -> BlobInfo | None:
        """One blob's size and mtime as storage reports them now (None if missing): gc's re-check."""
        key = self.key(sha256)
        with self._errors("read"):
            self._refresh(key)
            try:
                info = self.fs.info(key)
            except FileNotFoundError:
                return None
        return BlobInfo(sha256, int(info["size"]), mtime_of(info))

    def delete(self, sha256: str) -> None:
        if not is_sha256(sha256):
            return  # a damaged database row names no blob
        with self._errors("delete"):
            self._forget(sha256)
            try:
                self.fs.rm_file(self.key(sha256))
            except FileNotFoundError:
                pass

    def iter_blobs(self) -> Iterator[BlobInfo]:
        """Every blob in storage (streamed directory by directory)."""
        base = f"{self.root}/{BLOB_PREFIX}"
        with self._errors("list"):
            self._refresh(None)  # listings cached earlier miss other processes' writes
            if not self.fs.exists(base):
                return
            for prefix in sorted(self.fs.ls(base, detail=False)):
                for info in self.fs.ls(prefix, detail=True):
                    sha = str(info["name"]).rstrip("/").rsplit("/", 1)[-1]
                    if len(sha) == 64 and SHA256_HEX.issuperset(sha):
                        yield BlobInfo(sha, int(info["size"]), mtime_of(info))

    # -- gc hooks: what killed pushes leave behind (none by default) ---------------------------

    def iter_partials(self) -> Iterator[BlobInfo]:
        """Staging files left by pushes that never finished (keyed by file name)."""
        return iter(())

    def delete_partial(self, name: str) -> None:
        """Remove one staging file :meth:`iter_partials` listed."""
        return None  # nothing to do unless a backend says otherwise

    def scan_uploads(self, cutoff: float) -> uploads.Scan:
        """Incomplete multipart uploads under this store started at or before ``cutoff``."""
        return uploads.Scan()

    def can_abort_uploads(self) -> str | None:
        """None if the server aborts multipart uploads, else why not (``gc --dry-run`` asks)."""
        return None

    def abort_upload(self, upload: uploads.Upload) -> str | None:
        """Abort one upload and forget its marker; None when done, else why it could not be aborted."""
        return None

    def forget_marker(self, marker: str) -> None:
        """Remove the marker of an upload that is already gone."""
        return None  # nothing to do unless a backend says otherwise

    # -- shared plumbing ----------------------------------------------------------------------

    def _refresh(self, key: str | None) -> None:
        """Drop what the filesystem cached about ``key`` (None: everything) before looking again."""
        return None  # nothing to do unless a backend says otherwise

    def _forget(self, sha256: str) -> None:
        """Drop what this machine remembers about a blob being deleted."""
        return None  # nothing to do unless a backend says otherwise

    def _size(self, key: str) -> int | None:
        self._refresh(key)  # a cached listing may predate another process's write or delete
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
            raise StorageError(f"cannot {action} storage {self.display_url}: {self._reason(e)}"
                               f"{self.permission_hint}", url=self.display_url) from e
        except OSError as e:
            raise StorageError(f"cannot {action} storage {self.display_url}: {self._reason(e)}",
                               url=self.display_url) from e
        except self._foreign_errors as e:  # botocore: no endpoint, no credentials, ...
            raise StorageError(f"cannot {action} storage {self.display_url}: {self._reason(e)}",
                               url=self.display_url) from e
        except self.config_errors as e:
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
        return copy_hashing(f, None, progress)


def copy_hashing(src: IO[bytes], dst: _Writable | None, progress: Progress | None) -> tuple[str, int]:
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


def mtime_of(info: dict[str, Any]) -> float:
    value = info.get("mtime") or info.get("LastModified") or info.get("created") or 0
    return float(value.timestamp()) if hasattr(value, "timestamp") else float(value)

