"""The reliability soak (bench/soak.py), short: writers, readers, gc and SIGKILLs on SQLite, invariants hold."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.conftest import ROOT


@pytest.mark.slow
def test_short_soak_on_sqlite_keeps_every_invariant(capsys: pytest.CaptureFixture[str]) -> None:
    proc = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "soak.py"), "--seconds", "15", "--db", "sqlite", "--storage", "local",
         "--file-count", "300"],
        capture_output=True, text=True, timeout=900, cwd=ROOT,
    )
    assert proc.returncode == 0, f"{proc.stdout}\n{proc.stderr}"
    assert "invariants: ok" in proc.stdout
    with capsys.disabled():
        print("\n" + proc.stdout)
