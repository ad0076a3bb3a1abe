"""Bounded time and clear local failures: endpoints that never answer, full disks, read-only databases."""

from __future__ import annotations

import errno
import json
import os
import socket
import sqlite3
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from registry import Registry
from registry.config import Settings
from registry.errors import ConfigError
from tests.conftest import S3, Cli
from tests.processes import model_files


class BlackHole:
    """A TCP server on 127.0.0.1 that accepts every connection and never answers (nor closes it)."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.port = int(self.sock.getsockname()[1])
        self.accepted: list[socket.socket] = []
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return  # closed
            self.accepted.append(conn)

    def close(self) -> None:
        self.sock.close()
        for conn in self.accepted:
            conn.close()


@pytest.fixture
def black_hole() -> Iterator[BlackHole]:
    server = BlackHole()
    yield server
    server.close()


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    return model_files(tmp_path_factory.mktemp("models"), 2)


def one_error(stderr: str) -> str:
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), stderr
    return lines[0]


# -- time bounds ------------------------------------------------------------------------------------


def test_registry_timeout_is_validated() -> None:
    assert Settings.resolve(environ={"REGISTRY_TIMEOUT": "2.5"}).timeout == 2.5
    assert Settings.resolve(environ={}).timeout is None
    for bad in ("0", "-1", "soon", "nan", "1e9"):
        with pytest.raises(ConfigError, match="REGISTRY_TIMEOUT"):
            Settings.resolve(environ={"REGISTRY_TIMEOUT": bad})


@pytest.mark.s3
def test_storage_that_never_answers_fails_within_its_budget(
    black_hole: BlackHole, s3: S3, monkeypatch: pytest.MonkeyPatch, cli: Cli, files: list[Path]
) -> None:
    endpoint = f"http://127.0.0.1:{black_hole.port}"
    monkeypatch.setenv("REGISTRY_STORAGE", s3.url)
    monkeypatch.setenv("REGISTRY_STORAGE_OPTIONS", json.dumps({"endpoint_url": endpoint}))
    monkeypatch.setenv("REGISTRY_TIMEOUT", "1")
    started = time.monotonic()
    line = one_error(cli.run("push", "m", str(files[0])).stderr)
    took = time.monotonic() - started
    assert line.startswith(f"error: cannot upload to storage {s3.url}: Read timeout on endpoint URL"), line
    assert endpoint in line
    # 3 attempts of 1 s each plus botocore's backoff between them; s3fs adds no retries of its own.
    assert len(black_hole.accepted) == 3, len(black_hole.accepted)
    assert took < 15, took
    started = time.monotonic()
    assert json.loads(cli.ok("list", "--json").stdout) == []  # metadata never waits for storage
    assert time.monotonic() - started < 5


def test_database_that_never_answers_fails_within_the_timeout(
    black_hole: BlackHole, monkeypatch: pytest.MonkeyPatch, cli: Cli
) -> None:
    url = f"postgresql+psycopg://registry@127.0.0.1:{black_hole.port}/registry"
    monkeypatch.setenv("REGISTRY_TIMEOUT", "2")  # psycopg waits at least 2 s
    started = time.monotonic()
    line = one_error(cli.run("--db", url, "list").stderr)
    took = time.monotonic() - started
    assert line.startswith("error: database postgresql+psycopg://registry"), line
    assert f"@127.0.0.1:{black_hole.port}/registry failed: connection timeout expired" in line, line
    assert took < 15, took


def test_postgres_connect_timeout_defaults_to_10s_unless_the_url_sets_one() -> None:
    from registry import db

    def connect_timeout(url: str, timeout: float | None = None) -> object:
        engine = db.make_engine(url, timeout=timeout)
        captured: dict[str, object] = {}
        engine.dialect.connect = lambda *a, **kw: captured.update(kw)  # type: ignore[method-assign]
        engine.pool._creator(None)  # type: ignore[attr-defined]
        return captured.get("connect_timeout")

    assert connect_timeout("postgresql+psycopg://u@h/db") == db.CONNECT_TIMEOUT == 10
    assert connect_timeout("postgresql+psycopg://u@h/db", 2.5) == 3
    assert connect_timeout("postgresql+psycopg://u@h/db?connect_timeout=4") == "4"


# -- full disks -------------------------------------------------------------------------------------


def full_disk(monkeypatch: pytest.MonkeyPatch, under: Path) -> None:
    """From now on, fsync of any file under ``under`` fails the way a full filesystem makes it fail."""
    real = os.fsync

    def fsync(fd: int) -> None:
        if os.readlink(f"/proc/self/fd/{fd}").startswith(str(under)):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real(fd)

    monkeypatch.setattr(os, "fsync", fsync)


def test_pull_onto_a_full_disk_names_the_destination(registry: Registry, files: list[Path], cli: Cli,
                                                     tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    registry.push("m", files[0])
    full = tmp_path / "full"
    full.mkdir()
    full_disk(monkeypatch, full)
    line = one_error(cli.run("pull", "m", "-o", str(full / "m.pt")).stderr)
    assert line.startswith(f"error: no space left on {full / 'm.pt'} "), line
    assert list(full.iterdir()) == []  # no partial file


@pytest.mark.s3
def test_full_cache_or_destination_is_named_not_the_storage(
    s3: S3, files: list[Path], cli: Cli, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("REGISTRY_STORAGE", s3.url)
    monkeypatch.setenv("REGISTRY_STORAGE_OPTIONS", json.dumps(s3.options))
    cli.ok("push", "m", str(files[0]))
    with monkeypatch.context() as patch:
        cache = tmp_path / "home" / "cache"
        full_disk(patch, cache)
        line = one_error(cli.run("pull", "m", "-o", str(tmp_path / "a.pt")).stderr)
        assert line.startswith(f"error: no space left on {cache}/"), line
        assert s3.url not in line
    cli.ok("pull", "m", "-o", str(tmp_path / "a.pt"))  # now cached
    full = tmp_path / "full"
    full.mkdir()
    full_disk(monkeypatch, full)
    line = one_error(cli.run("pull", "m", "-o", str(full / "b.pt")).stderr)
    assert line.startswith(f"error: no space left on {full / 'b.pt'} "), line


# -- read-only databases ----------------------------------------------------------------------------


@pytest.fixture
def sealed_db(tmp_path: Path, files: list[Path]) -> Path:
    """A SQLite registry with one version, closed (its WAL checkpointed into the file)."""
    path = tmp_path / "sealed.db"
    with Registry(db=f"sqlite:///{path}", storage=tmp_path / "artifacts") as reg:
        reg.push("m", files[0])
    return path


def test_read_only_sqlite_url_reads_and_refuses_writes(sealed_db: Path, files: list[Path], cli: Cli,
                                                       tmp_path: Path) -> None:
    url = f"sqlite:///file:{sealed_db}?mode=ro&uri=true"
    storage = str(tmp_path / "artifacts")
    listed = json.loads(cli.ok("--db", url, "--storage", storage, "list", "--json").stdout)
    assert [m["name"] for m in listed] == ["m"]
    cli.ok("--db", url, "--storage", storage, "pull", "m", "-o", str(tmp_path / "m.pt"))
    failed = cli.fails("--db", url, "--storage", storage, "push", "m", str(files[1]), match="is read-only")
    assert "attempt to write a readonly database" in failed.stderr


def test_sqlite_file_we_cannot_write_is_opened_read_only(sealed_db: Path, files: list[Path], cli: Cli,
                                                         tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Root ignores permission bits, so "not writable" is what os.access says.
    real = os.access
    monkeypatch.setattr(os, "access", lambda p, mode, **kw: False if Path(p) == sealed_db and mode & os.W_OK
                        else real(p, mode, **kw))
    for leftover in sealed_db.parent.glob("sealed.db-*"):
        leftover.unlink()
    args = ["--db", f"sqlite:///{sealed_db}", "--storage", str(tmp_path / "artifacts")]
    assert [m["name"] for m in json.loads(cli.ok(*args, "list", "--json").stdout)] == ["m"]
    cli.fails(*args, "push", "m", str(files[1]), match="is read-only")
    with sqlite3.connect(sealed_db) as conn:  # nothing was written
        assert conn.execute("SELECT count(*) FROM versions").fetchone() == (1,)
