"""Test hook: hold a push at a named stage so a test can SIGKILL it there or race it. Inert in normal use.

The crash tests (``tests/test_crash.py``) run ``registry push`` with

- ``REGISTRY_TEST_PAUSE_AT=<stage>``: one of :data:`STAGES`;
- ``REGISTRY_TEST_PAUSE_FILE=<path>``: created when the push reaches the stage.

The push then waits, for as long as that file exists (at most :data:`MAX_PAUSE_SECONDS`), so the
test can kill it at exactly that point, or delete the file to let it go on. Each stage pauses at
most once per process. Without the variables :func:`pause` returns at once and does nothing.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

#: ``hashing``: the first chunk is hashed and the staging file exists; ``uploaded``: the blob is
#: complete in storage, no transaction yet; ``checked``: the blob lock is held and the blobs were
#: found in storage, no row written yet (where gc used to slip in); ``before_commit``: the version
#: row is written but not committed (the transaction holds its locks); ``uploading``: remote
#: storage only, a multipart upload is open and its first part sent. ``removing`` is gc's (and
#: delete's): about to take the lock of a blob it found unused.
STAGES = frozenset({"hashing", "uploading", "uploaded", "checked", "before_commit", "removing"})
ENV_STAGE = "REGISTRY_TEST_PAUSE_AT"
ENV_FILE = "REGISTRY_TEST_PAUSE_FILE"
MAX_PAUSE_SECONDS = 600.0

_done: set[str] = set()


def pause(stage: str) -> None:
    """Wait here while ``$REGISTRY_TEST_PAUSE_FILE`` exists, if ``$REGISTRY_TEST_PAUSE_AT`` is ``stage``."""
    if os.environ.get(ENV_STAGE) != stage or stage in _done:
        return
    _done.add(stage)
    marker = Path(os.environ[ENV_FILE])
    marker.touch()
    deadline = time.monotonic() + MAX_PAUSE_SECONDS
    while marker.exists() and time.monotonic() < deadline:
        time.sleep(0.01)
