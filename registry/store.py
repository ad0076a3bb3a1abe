"""Content-addressed blob storage over fsspec: sha256 keys, atomic writes, verified reads, dedup."""

from __future__ import annotations

import hashlib
import os
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import fsspec
from fsspec.implementations.local import LocalFileSystem

from registry.config import redact
from registry.errors import ConfigError, IntegrityError, StorageError

BLOB_PREFIX = "blobs/sha256"
TMP_PREFIX = "tmp"
CHUNK = 4 * 1024 * 1024
SHA256_HEX = frozenset("0123456789abcdef")

#: Called with the number of bytes just transferred (progress bars).
Progress = Callable[[int], None]


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


class BlobStore:
    """Blobs keyed by sha256 under ``<root>/blobs/sha256/ab/abcdef…``, over any fsspec filesystem."""

    def __init__(self, url: str, options: dict[str, Any] | None = None) -> None:
        self.url = url
        self.display_url = redact(url)
        try:
            self.fs, self.root = fsspec.core.url_to_fs(url, **(options or {}))
        except (ValueError, ImportError, TypeError) as e:
            raise ConfigError(f"cannot use storage {self.display_url!r}: {e}") from e
        self.root = self.root.rstrip("/")
        self.local = isinstance(self.fs, LocalFileSystem)

    # -- keys ---------------------------------------------------------------------------------

    def key(self, sha256: str) -> str:
        if len(sha256) != 64 or not SHA256_HEX.issuperset(sha256):
            raise ValueError(f"not a sha256 hex digest: {sha256!r}")
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
        """Store the bytes of ``source``, reading it once; returns where they are.

        Local storage hashes while copying into a temporary file, fsyncs it and renames it into
        place. Remote storage hashes first, then uploads straight to the final key (a PUT is atomic),
        skipping the upload when an object of that key and size already exists.
        """
        if self.local:
            with self._errors("write"):
                tmp = self.tmp_dir() / f"{uuid.uuid4().hex}.part"
                try:
                    with open(source, "rb") as src, open(tmp, "wb") as dst:
                        digest, size = _copy_hashing(src, dst, progress)
                        dst.flush()
                        os.fsync(dst.fileno())
                    return self._commit_local(tmp, digest, size)
                finally:
                    tmp.unlink(missing_ok=True)
        digest, size = hash_file(source)
        with self._errors("upload"):
            key = self.key(digest)
            if self._size(key) == size:
                return Blob(digest, size, written=False)
            self.fs.put_file(os.fspath(source), key)
        return Blob(digest, size, written=True)

    def adopt(self, staged: Path, *, progress: Progress | None = None) -> Blob:
        """Store a file this process wrote into :meth:`tmp_dir` (or anywhere, for remote storage).

        On local storage the file is hashed in place and renamed: one read, no copy.
        """
        if not self.local:
            return self.put_file(staged, progress=progress)
        with self._errors("write"):
            with open(staged, "rb+") as f:
                digest, size = _copy_hashing(f, None, progress)
                os.fsync(f.fileno())
            return self._commit_local(staged, digest, size)

    def _commit_local(self, tmp: Path, digest: str, size: int) -> Blob:
        final = Path(self.key(digest))
        if final.exists() and final.stat().st_size == size:
            return Blob(digest, size, written=False)
        final.parent.mkdir(parents=True, exist_ok=True)
        os.replace(tmp, final)  # atomic: readers see no blob or the whole blob
        _fsync_dir(final.parent)
        return Blob(digest, size, written=True)

    # -- reading ------------------------------------------------------------------------------

    def local_path(self, sha256: str, size: int, *, artifact: str, name: str | None = None) -> Path:
        """A local path holding the verified bytes of ``sha256``, ready to deserialise."""
        if not self.local:
            raise NotImplementedError("remote storage needs the cache")  # pragma: no cover
        path = Path(self.key(sha256))
        with self._errors("read", missing=artifact):
            with open(path, "rb") as f:
                actual, _ = _copy_hashing(f, None, None)
        if actual != sha256:
            raise IntegrityError(artifact, sha256, actual, name=name)
        return path

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
            with self._errors("read", missing=artifact), self.fs.open(self.key(sha256), "rb") as src:
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

    def check(self, sha256: str, size: int) -> tuple[str, str] | None:
        """Re-hash one blob: None if intact, else ``(kind, detail)`` with kind missing/size/corrupt."""
        key = self.key(sha256)
        with self._errors("read"):
            actual_size = self._size(key)
            if actual_size is None:
                return "missing", f"blob {sha256} is missing from {self.display_url}"
            if actual_size != size:
                return "size", f"blob {sha256} has {actual_size} bytes, expected {size}"
            with self.fs.open(key, "rb") as f:
                actual, _ = _copy_hashing(f, None, None)
        if actual != sha256:
            return "corrupt", f"blob has sha256 {actual}, expected {sha256}"
        return None

    def exists(self, sha256: str) -> bool:
        with self._errors("read"):
            return self._size(self.key(sha256)) is not None

    def delete(self, sha256: str) -> None:
        with self._errors("delete"):
            try:
                self.fs.rm_file(self.key(sha256))
            except FileNotFoundError:
                pass

    def iter_blobs(self) -> Iterator[BlobInfo]:
        """Every blob in storage (streamed directory by directory)."""
        base = f"{self.root}/{BLOB_PREFIX}"
        with self._errors("list"):
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
                if entry.is_file(follow_symlinks=False):
                    st = entry.stat(follow_symlinks=False)
                    yield BlobInfo(entry.name, st.st_size, st.st_mtime)

    def delete_partial(self, name: str) -> None:
        with self._errors("delete"):
            (Path(self.root) / TMP_PREFIX / Path(name).name).unlink(missing_ok=True)

    def _size(self, key: str) -> int | None:
        try:
            return int(self.fs.size(key))
        except FileNotFoundError:
            return None

    @contextmanager
    def _errors(self, action: str, *, missing: str | None = None) -> Iterator[None]:
        """Translate storage failures (s3fs already maps boto errors to builtins) once, here."""
        try:
            yield
        except FileNotFoundError as e:
            if missing is not None:
                raise StorageError(
                    f"artifact {missing} is missing from storage {self.display_url}; "
                    f"run 'registry verify' to list damaged versions",
                    url=self.display_url,
                ) from e
            raise StorageError(f"cannot {action} storage {self.display_url}: {_reason(e)}",
                               url=self.display_url) from e
        except OSError as e:
            raise StorageError(f"cannot {action} storage {self.display_url}: {_reason(e)}",
                               url=self.display_url) from e


def hash_file(path: Path, progress: Progress | None = None) -> tuple[str, int]:
    """sha256 hex digest and size of a file, read in chunks."""
    with open(path, "rb") as f:
        return _copy_hashing(f, None, progress)


def _copy_hashing(src: IO[bytes], dst: IO[bytes] | None, progress: Progress | None) -> tuple[str, int]:
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
    return digest.hexdigest(), size


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


def _reason(e: OSError) -> str:
    return e.strerror or str(e) or type(e).__name__
