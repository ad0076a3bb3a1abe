"""Shared fixtures: an isolated environment per test, a registry on tmp_path, and CLI helpers."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner, Result

from registry import Registry

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(autouse=True)
def isolated_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """No REGISTRY_*/AWS_* variables leak in; REGISTRY_HOME is the test's own directory."""
    for var in list(os.environ):
        if var.startswith(("REGISTRY_", "AWS_", "TORCH_FORCE")):
            monkeypatch.delenv(var)
    monkeypatch.setenv("REGISTRY_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("REGISTRY_USER", "tester")
    yield


@pytest.fixture
def home(tmp_path: Path) -> Path:
    return tmp_path / "home"


@pytest.fixture
def registry(home: Path) -> Iterator[Registry]:
    reg = Registry()
    yield reg
    reg.close()


class Cli:
    """Runs the click command in-process and asserts the exit status and the stdout/stderr split."""

    def __init__(self) -> None:
        from cli import cli

        self.cli = cli
        self.runner = CliRunner()

    def run(self, *args: str, input: str | None = None) -> Result:
        return self.runner.invoke(self.cli, list(args), input=input, catch_exceptions=False)

    def ok(self, *args: str) -> Result:
        result = self.run(*args)
        assert result.exit_code == 0, f"exit {result.exit_code}\nstdout: {result.stdout}\nstderr: {result.stderr}"
        return result

    def fails(self, *args: str, match: str, code: int = 1) -> Result:
        result = self.run(*args)
        assert result.exit_code == code, f"exit {result.exit_code}\nstdout: {result.stdout}\nstderr: {result.stderr}"
        if code == 1:
            lines = result.stderr.strip().splitlines()
            assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
            assert result.stdout == ""
        assert match in result.stderr, result.stderr
        return result


@pytest.fixture
def cli() -> Cli:
    return Cli()
