"""A SQLite registry on a full filesystem: reading commands work, writing ones say "no space left on DIR".

Needs a small tmpfs (``mount -t tmpfs``, root); skipped where mounting is not permitted.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from registry import Registry
from tests.conftest import Cli
from tests.processes import model_files


@pytest.fixture
def small_fs(tmp_path: Path) -> Iterator[Path]:
    """A 2 MiB tmpfs, unmounted afterwards."""
    mount = tmp_path / "small"
    mount.mkdir()
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    try:
        proc = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mount)],
                              capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as e:
        pytest.skip(f"cannot mount a tmpfs: {e}")
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs: {proc.stderr.strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], capture_output=True, timeout=30)


def _fill(folder: Path) -> None:
    with open(folder / "filler", "wb") as f:
        try:
            while True:
                f.write(b"\0" * 65536)
                f.flush()
        except OSError:
            pass


def test_full_filesystem_reads_work_and_writes_name_the_folder(small_fs: Path, tmp_path: Path, cli: Cli) -> None:
    db_url = f"sqlite:///{small_fs / 'registry.db'}"
    storage = tmp_path / "artifacts"  # only the database is on the full filesystem
    first, second = model_files(tmp_path / "models", 2)
    with Registry(db=db_url, storage=storage) as reg:
        reg.push("net", first)
    _fill(small_fs)

    args = ["--db", db_url, "--storage", str(storage)]
    assert "net" in cli.ok(*args, "list").stdout
    assert "net:1" in cli.ok(*args, "show", "net:1").stdout
    cli.ok(*args, "verify")
    cli.fails(*args, "push", "net", str(second), match=f"no space left on {small_fs}")

    (small_fs / "filler").unlink()  # space is back: the registry writes again, on a new connection
    assert "net:2" in cli.ok(*args, "push", "net", str(second)).stdout
