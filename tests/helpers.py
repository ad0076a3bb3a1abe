"""Shared test helpers: the tutorial's model, subprocess runners, and a snapshot of a registry's state."""

from __future__ import annotations

import hashlib
import os
import shutil
import sqlite3
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

ROOT = Path(__file__).resolve().parent.parent

#: The architecture spec of the tutorial's model (../shared/reference/pytorch-save-load-tutorial.md).
TUTORIAL_SPEC: dict[str, Any] = {
    "target": "torch.nn.Sequential",
    "args": [
        {"target": "torch.nn.Linear", "kwargs": {"in_features": 128, "out_features": 16, "bias": True}},
        {"target": "torch.nn.ReLU"},
        {"target": "torch.nn.Linear", "kwargs": {"in_features": 16, "out_features": 1, "bias": True}},
    ],
}

#: Tables whose rows make up a registry's metadata.
TABLES = ("models", "versions", "aliases", "alias_events")


def tutorial_model(seed: int = 0) -> nn.Sequential:
    """The tutorial's model, with deterministic weights."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(128, 16), nn.ReLU(), nn.Linear(16, 1))


def registry_command() -> str:
    """The installed ``registry`` console script of this interpreter (not a pyenv shim)."""
    script = Path(sys.executable).with_name("registry")
    if script.exists():
        return str(script)
    found = shutil.which("registry")
    assert found, "the registry console script is not installed (pip install -e .)"
    return found


def _env(env: Mapping[str, str] | None) -> dict[str, str]:
    merged = dict(os.environ)  # already cleaned by the autouse isolated_env fixture
    merged.update(env or {})
    return merged


def run_registry(
    *args: str, env: Mapping[str, str] | None = None, cwd: Path | None = None
) -> subprocess.CompletedProcess[str]:
    """Run the installed ``registry`` command; ``env`` is added to the (isolated) environment."""
    return subprocess.run(
        [registry_command(), *args], env=_env(env), cwd=cwd, capture_output=True, text=True, timeout=120
    )


def run_python(
    code: str, env: Mapping[str, str] | None = None, *, cwd: Path | None = None, flags: tuple[str, ...] = ()
) -> subprocess.CompletedProcess[str]:
    """Run ``code`` in a fresh interpreter and return the finished process."""
    return subprocess.run(
        [sys.executable, *flags, "-c", code], env=_env(env), cwd=cwd, capture_output=True, text=True, timeout=120
    )


def fresh_python(code: str, env: Mapping[str, str] | None = None, *, cwd: Path | None = None) -> str:
    """Run ``code`` in a fresh interpreter, require success, and return its stdout."""
    proc = run_python(code, env, cwd=cwd)
    assert proc.returncode == 0, f"exit {proc.returncode}\nstdout: {proc.stdout}\nstderr: {proc.stderr}"
    return proc.stdout


def registry_snapshot(home: Path) -> dict[str, Any]:
    """Every metadata row and every stored file (with a hash of its bytes) of the registry in ``home``.

    Two equal snapshots mean nothing was written in between. Opens the database read-only, so taking
    a snapshot of a registry that does not exist yet creates nothing.
    """
    db = home / "registry.db"
    rows: dict[str, list[tuple[Any, ...]]] | None = None
    if db.exists():
        conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
        try:
            rows = {t: sorted(conn.execute(f"SELECT * FROM {t}").fetchall(), key=repr) for t in TABLES}
        finally:
            conn.close()
    artifacts = home / "artifacts"
    files = {
        str(p.relative_to(artifacts)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(artifacts.rglob("*"))
        if p.is_file()
    } if artifacts.exists() else {}
    return {"rows": rows, "files": files}


def blob_path(home: Path, sha256: str) -> Path:
    """Where the default local storage keeps the blob of ``sha256``."""
    return home / "artifacts" / "blobs" / "sha256" / sha256[:2] / sha256


def flip_byte(path: Path, offset: int | None = None) -> None:
    """Corrupt a file in place by inverting one byte (the middle one by default)."""
    data = bytearray(path.read_bytes())
    i = len(data) // 2 if offset is None else offset
    data[i] ^= 0xFF
    path.write_bytes(bytes(data))


#: A scripted module whose ``__setstate__`` maps ``marker`` and fills it: ``torch.jit.load`` itself writes the file.
_SETSTATE_BUILDER = """
import warnings, torch
from typing import Tuple
warnings.simplefilter("ignore")
class SetState(torch.nn.Module):
    def __init__(self, path: str):
        super().__init__()
        self.path, self.buf = path, torch.zeros(2, dtype=torch.uint8)
    def forward(self, x):
        return x
    @torch.jit.export
    def __getstate__(self) -> Tuple[str, bool]:
        return (self.path, self.training)
    @torch.jit.export
    def __setstate__(self, state: Tuple[str, bool]) -> None:
        self.path, self.training = state[0], state[1]
        self.buf = torch.from_file(self.path, shared=True, size=2, dtype=torch.uint8)
        self.buf.fill_(66)
torch.jit.script(SetState({marker!r})).save({path!r})
"""


def setstate_archive(directory: Path) -> tuple[Path, Path]:
    """A TorchScript archive whose loading writes ``b"BB"`` to a marker file; returns (archive, marker).

    Built by a script run as ``__main__`` (``torch.jit.script`` reads the class's source from a file).
    """
    marker, path, builder = directory / "MARKER", directory / "setstate.pt", directory / "build_setstate.py"
    builder.write_text(_SETSTATE_BUILDER.format(marker=str(marker), path=str(path)))
    subprocess.run([sys.executable, str(builder)], check=True, timeout=120)
    assert path.exists() and not marker.exists()
    return path, marker
