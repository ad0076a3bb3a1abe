"""A record of the local files this machine has hashed, so bytes that did not change are not re-hashed.

Loading a 1 GB state_dict would otherwise spend most of its time re-hashing a blob that was
verified a minute ago. A record maps a file, identified as the kernel sees it now — device, inode,
size, ``mtime_ns`` and ``ctime_ns`` — to the sha256 its bytes had when this machine hashed them.
Any write to a file, and any ``os.utime`` that sets its mtime back, moves its ctime to the current
time, and no user can set a ctime; so a record matches only a file that has not been written since
it was hashed. Whoever can rewrite a file *and* restore its ctime (root, with the clock or the raw
block device) can defeat the record; the README's performance section states this trade-off.

Rules that keep it safe:

- A digest is recorded only for bytes read from the file itself, with its identity taken before the
  read and checked unchanged after it; never for bytes that were merely written.
- Only files whose mtime and ctime are at least :data:`SETTLE_NS` old when hashing starts are
  recorded: timestamps have a coarse granularity, so a write racing the hash could otherwise leave
  the ctime unchanged (git's "racily clean" problem).
- Records carry this machine's id: a record directory on a shared home is not trusted elsewhere.
- A missing, unreadable or foreign record means "hash it again"; recording is best effort.

Records are one small JSON file per path under the record directory, written to a temporary file and
renamed into place, so concurrent processes never see a torn record (the last writer wins, and
every writer writes a true statement).
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import socket
import time
import uuid
from collections.abc import Callable
from dataclasses import astuple, dataclass
from pathlib import Path
from typing import IO

#: Bumped if the record's meaning changes; older records are then ignored.
RECORD_VERSION = 1
#: A file changed more recently than this before hashing starts is hashed but not recorded.
SETTLE_NS = 2_000_000_000
CHUNK = 4 * 1024 * 1024
MACHINE_ID_FILES = ("/etc/machine-id", "/var/lib/dbus/machine-id")


@dataclass(frozen=True, slots=True)
class FileKey:
    """What identifies a file's bytes without reading them."""

    device: int
    inode: int
    size: int
    mtime_ns: int
    ctime_ns: int

    @classmethod
    def of(cls, st: os.stat_result) -> FileKey:
        return cls(st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


class VerifiedFiles:
    """Records of ``file identity -> sha256`` for local files hashed on this machine.

    Args:
        directory: where the records live (``$REGISTRY_HOME/verified`` for a Registry); created
            on first write.
    """

    def __init__(self, directory: str | os.PathLike[str]) -> None:
        self.directory = Path(directory)

    def lookup(self, path: str | os.PathLike[str], st: os.stat_result | None = None) -> str | None:
        """The sha256 recorded for ``path`` if the file is provably unchanged since it was hashed here.

        Args:
            st: ``os.fstat`` of a descriptor the caller opened on ``path``, so that the answer is about
                that very file even if the path is replaced meanwhile (default: ``os.stat(path)``).
        """
        where = os.path.abspath(path)
        try:
            key = FileKey.of(st if st is not None else os.stat(where))
            if not _private(os.stat(self.directory)):
                return None  # a record someone else could have written vouches for nothing
            with open(self._record(where), "rb") as f:
                if not _private(os.fstat(f.fileno())):
                    return None
                data = json.loads(f.read())
        except (OSError, ValueError, RecursionError):
            return None
        if (
            not isinstance(data, dict)
            or data.get("v") != RECORD_VERSION
            or data.get("host") != machine_id()
            or data.get("path") != where
            or data.get("key") != list(astuple(key))
        ):
            return None
        digest = data.get("sha256")
        return digest if isinstance(digest, str) and len(digest) == 64 else None

    def sha256(self, path: str | os.PathLike[str], progress: Callable[[int], None] | None = None) -> str:
        """The sha256 of ``path``: the recorded one if it still applies, else hashed now (and recorded)."""
        found = self.lookup(path)
        if found is not None:
            return found
        with open(path, "rb") as f:
            before = os.fstat(f.fileno())
            digest = hash_stream(f, progress)
        self.remember(path, digest, before)
        return digest

    def remember(self, path: str | os.PathLike[str], sha256: str, before: os.stat_result) -> bool:
        """Record ``sha256`` for ``path``, hashed from its bytes after ``before = os.fstat(fd)`` was taken.

        The caller must have read every byte of the file through that descriptor. Nothing is recorded
        if the file changed meanwhile (its identity differs from ``before``), if it changed too
        recently before, or if the record cannot be written.

        Returns:
            Whether a record was written.
        """
        where = os.path.abspath(path)
        try:
            after = os.stat(where)
        except OSError:
            return False
        key = FileKey.of(before)
        settled = time.time_ns() - SETTLE_NS
        if FileKey.of(after) != key or max(key.mtime_ns, key.ctime_ns) > settled:
            return False
        record = {"v": RECORD_VERSION, "host": machine_id(), "path": where, "key": list(astuple(key)),
                  "sha256": sha256}
        final = self._record(where)
        tmp = final.with_name(f".{final.stem}.{uuid.uuid4().hex[:12]}.tmp")
        try:
            self.directory.mkdir(parents=True, exist_ok=True, mode=0o700)
            final.parent.mkdir(exist_ok=True, mode=0o700)
            tmp.write_text(json.dumps(record, sort_keys=True), encoding="utf-8")
            os.replace(tmp, final)  # readers see the old record or the new one, never half of one
        except OSError:
            tmp.unlink(missing_ok=True)
            return False
        return True

    def forget(self, path: str | os.PathLike[str]) -> None:
        """Drop the record of ``path`` (its file is being deleted)."""
        try:
            self._record(os.path.abspath(path)).unlink(missing_ok=True)
        except OSError:
            pass

    def _record(self, where: str) -> Path:
        name = hashlib.sha256(where.encode("utf-8", "surrogateescape")).hexdigest()[:40]
        return self.directory / name[:2] / f"{name}.json"


def _private(st: os.stat_result) -> bool:
    """Owned by this user and writable by nobody else."""
    return st.st_uid == os.geteuid() and not st.st_mode & 0o022


@functools.cache
def machine_id() -> str:
    """This machine's id (systemd's machine-id), else its host name."""
    for candidate in MACHINE_ID_FILES:
        try:
            value = Path(candidate).read_text(encoding="ascii").strip()
        except (OSError, UnicodeDecodeError):
            continue
        if value:
            return value
    return f"host:{socket.gethostname()}"


def hash_stream(f: IO[bytes], progress: Callable[[int], None] | None = None) -> str:
    """sha256 of everything left in ``f``, read in chunks into one reused buffer."""
    digest = hashlib.sha256()
    buf = bytearray(CHUNK)
    view = memoryview(buf)
    while n := f.readinto(buf):  # type: ignore[attr-defined]
        digest.update(view[:n])
        if progress is not None:
            progress(n)
    return digest.hexdigest()
