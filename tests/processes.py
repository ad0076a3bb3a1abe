"""Helpers for the team tests: small distinct model files, and ``registry`` CLI processes started together."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

#: Runs the CLI in a fresh interpreter, but only once ``argv[1]`` (the start file) exists: the
#: imports are done first and ``argv[2]`` (a ready file) says so, so every process starts together.
BARRIER = """
import sys, time
from pathlib import Path
import cli, registry.api, registry.intake, registry.pickles, sqlalchemy.dialects.postgresql, psycopg
start, ready = Path(sys.argv[1]), Path(sys.argv[2])
ready.touch()
while not start.exists():
    time.sleep(0.002)
sys.argv = ["registry", *sys.argv[3:]]
cli.main()
"""


def model_files(directory: Path, count: int) -> list[Path]:
    """``count`` whole-model pickles of ``nn.Linear`` with different weights (pushing them needs no torch)."""
    import torch

    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(count):
        torch.manual_seed(i)
        path = directory / f"m{i}.pt"
        torch.save(torch.nn.Linear(4, 2), path)
        paths.append(path)
    assert len({sha256(p) for p in paths}) == count
    return paths


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def registry_env(db: str, storage: Path, **extra: str) -> dict[str, str]:
    """The (already isolated) environment plus the registry's database and storage."""
    return {**os.environ, "REGISTRY_DB": db, "REGISTRY_STORAGE": str(storage), **extra}


def run(args: Sequence[str], env: Mapping[str, str]) -> subprocess.CompletedProcess[str]:
    """``registry ARGS`` in a fresh interpreter."""
    return subprocess.run([sys.executable, "-m", "cli", *args], env=dict(env), capture_output=True,
                          text=True, timeout=120)


def ok_json(args: Sequence[str], env: Mapping[str, str]) -> Any:
    proc = run(["--json", *args], env)
    assert proc.returncode == 0, f"registry {' '.join(args)}: exit {proc.returncode}\n{proc.stderr}"
    return json.loads(proc.stdout)


def start(args: Sequence[str], env: Mapping[str, str]) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-m", "cli", *args], env=dict(env), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def run_together(commands: Sequence[Sequence[str]], env: Mapping[str, str], workdir: Path
                 ) -> tuple[list[tuple[int, str, str]], float]:
    """Start one process per command, wait until all are ready, release them at once.

    Returns:
        ``(returncode, stdout, stderr)`` per command, and the seconds from release to the last exit.
    """
    workdir.mkdir(parents=True, exist_ok=True)
    go = workdir / "go"
    procs = [
        subprocess.Popen([sys.executable, "-c", BARRIER, str(go), str(workdir / f"ready-{i}"), *cmd],
                         env=dict(env), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for i, cmd in enumerate(commands)
    ]
    try:
        wait_for(lambda: all((workdir / f"ready-{i}").exists() for i in range(len(commands))), 120,
                 what="all processes ready", procs=procs)
        go.touch()
        released = time.monotonic()
        results = []
        for p in procs:
            out, err = p.communicate(timeout=180)
            results.append((p.returncode, out, err))
        return results, time.monotonic() - released
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()


def wait_for(condition: Any, timeout: float, *, what: str, procs: Sequence[subprocess.Popen[str]] = ()) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        for p in procs:
            if p.poll() is not None and p.returncode != 0:
                raise AssertionError(f"process exited {p.returncode} while waiting for {what}: "
                                     f"{p.stderr.read() if p.stderr else ''}")
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.01)
