"""Opening a local blob safely: a regular file, bound to one descriptor, verified before anything reads it.

A path that is hashed and then opened again by the deserialiser can be swapped in between (the
blob renamed over, a symlink planted); so a blob is opened once, its descriptor is hashed (or its
``fstat`` matched against the verification record), and the deserialiser reads that same descriptor
through ``/proc/self/fd/N``, which opens the very inode the descriptor holds, not the path.

Blob files are written read-only (0444) by the registry's user. The verification record is trusted
only for such a file: a file anyone may write, or that another user owns, is hashed on every read,
since a write through a shared memory mapping to an already-dirty page changes neither its mtime nor
its ctime (Linux), so a record cannot prove such a file unchanged.
"""

from __future__ import annotations

import errno
import hashlib
import os
import stat
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from registry.verified import VerifiedFiles

#: Blobs are immutable: nobody, their owner included, writes to them without changing the mode first.
BLOB_MODE = 0o444
CHUNK = 4 * 1024 * 1024


class NotRegular(OSError):
    """A FIFO, device, socket, directory or symlink sits where a blob file should be."""


def open_regular(path: str | os.PathLike[str]) -> int:
    """Open ``path`` read-only without following a final symlink or blocking on a FIFO; a regular file only.

    Raises:
        FileNotFoundError: nothing is there.
        NotRegular: something other than a regular file is there.
        OSError: it cannot be opened.
    """
    flags = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0)
    try:
        fd = os.open(path, flags)
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise NotRegular(errno.ELOOP, "a symbolic link, not a regular file", os.fspath(path)) from e
        raise
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        os.close(fd)
        raise NotRegular(errno.EINVAL, f"a {_kind(st.st_mode)}, not a regular file", os.fspath(path))
    return fd


def fd_path(fd: int) -> Path:
    """A path that opens the file ``fd`` holds (the inode, whatever its name is now)."""
    proc = Path(f"/proc/self/fd/{fd}")
    return proc if proc.exists() else Path(f"/dev/fd/{fd}")


def trusted_for_record(st: os.stat_result) -> bool:
    """Whether the verification record may vouch for this file: ours, and writable by nobody."""
    return st.st_uid == os.geteuid() and not st.st_mode & 0o222


def sha256_of(fd: int, path: str | os.PathLike[str], verified: VerifiedFiles | None) -> str:
    """The sha256 of the bytes ``fd`` holds: recorded (see :func:`trusted_for_record`) or hashed now.

    The hash reads the descriptor itself (``pread``), never the path again.
    """
    before = os.fstat(fd)
    if verified is not None and trusted_for_record(before):
        known = verified.lookup(path, before)
        if known is not None:
            return known
    digest = hash_fd(fd)
    if verified is not None and trusted_for_record(before):
        verified.remember(path, digest, before)
    return digest


def hash_fd(fd: int) -> str:
    """sha256 of a file's whole content read through ``fd`` with ``pread`` (its offset is not moved)."""
    digest = hashlib.sha256()
    buf = bytearray(CHUNK)
    view = memoryview(buf)
    offset = 0
    while n := os.preadv(fd, [buf], offset):
        digest.update(view[:n])
        offset += n
    return digest.hexdigest()


def make_read_only(fd: int) -> None:
    """Set a blob file this process wrote to :data:`BLOB_MODE` (before it is renamed into place)."""
    os.fchmod(fd, BLOB_MODE)


def _kind(mode: int) -> str:
    if stat.S_ISFIFO(mode):
        return "FIFO"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "device"
    if stat.S_ISDIR(mode):
        return "directory"
    if stat.S_ISSOCK(mode):
        return "socket"
    return "special file"
