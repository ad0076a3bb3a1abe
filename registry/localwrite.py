"""Failures of writing local files, told as what they are: this path is full or read-only."""

from __future__ import annotations

import errno
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from registry.errors import StorageError

#: Errors of writing a local file that say where the trouble is: there, not in the storage read from.
LOCAL_WRITE_ERRORS = {errno.ENOSPC: ("no space left on", "free space there or choose another path"),
                      errno.EDQUOT: ("disk quota exceeded on", "free space there or choose another path"),
                      errno.EROFS: ("read-only file system at", "choose another path")}


@contextmanager
def local_target(path: Path) -> Iterator[None]:
    """Name ``path`` (the local file being written) when its filesystem is full or read-only.

    Only writes fail this way, and the block around it writes only ``path`` (or a temporary file
    beside it): without this, a full disk under a pull was blamed on the storage being read.
    """
    try:
        yield
    except OSError as e:
        known = LOCAL_WRITE_ERRORS.get(e.errno or 0)
        if known is None or isinstance(e, StorageError):
            raise
        raise StorageError(f"{known[0]} {path} ({e.strerror}); {known[1]}", url=str(path)) from e
