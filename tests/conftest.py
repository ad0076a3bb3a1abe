"""Shared fixtures: an isolated environment per test, a registry on tmp_path, and CLI helpers."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner, Result
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url
from sqlalchemy.pool import NullPool

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


# -- PostgreSQL: a database of its own per test, and the CI rule that nothing may be skipped ------

#: Read once at import, before the autouse isolated_env fixture removes REGISTRY_* variables.
POSTGRES_URL = os.environ.get("REGISTRY_TEST_POSTGRES_URL") or None
REQUIRE_ALL = os.environ.get("REGISTRY_TEST_REQUIRE_ALL") == "1"
NO_POSTGRES = (
    "REGISTRY_TEST_POSTGRES_URL is not set: PostgreSQL tests need a server URL such as "
    "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"
)
#: Markers of tests that need a service; with REGISTRY_TEST_REQUIRE_ALL=1 (CI) none may be skipped.
SERVICE_MARKERS = ("postgres", "s3")
_skipped_services: list[str] = []


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if POSTGRES_URL is None:
        for item in items:
            if item.get_closest_marker("postgres"):
                item.add_marker(pytest.mark.skip(reason=NO_POSTGRES))


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Any:
    report = yield
    skipped = report.skipped and not hasattr(report, "wasxfail")  # an xfail reports as skipped too
    if skipped and any(item.get_closest_marker(m) for m in SERVICE_MARKERS):
        _skipped_services.append(item.nodeid)
    return report


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    if REQUIRE_ALL and _skipped_services:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
        reporter = session.config.pluginmanager.get_plugin("terminalreporter")
        lines = [f"REGISTRY_TEST_REQUIRE_ALL=1 but {len(_skipped_services)} PostgreSQL/S3 tests were skipped:"]
        lines += [f"  {nodeid}" for nodeid in _skipped_services]
        for line in lines:
            if reporter is not None:
                reporter.write_line(line, red=True, bold=True)
            else:  # pragma: no cover - running without the terminal reporter
                print(line)


class PostgresServer:
    """Creates databases with random names on the test server, and drops them (connections first)."""

    def __init__(self, url: str) -> None:
        self.url = make_url(url)
        if self.url.drivername == "postgresql":
            self.url = self.url.set(drivername="postgresql+psycopg")
        self.admin = create_engine(self.url, isolation_level="AUTOCOMMIT", poolclass=NullPool)

    def create(self) -> str:
        name = f"registry_test_{uuid.uuid4().hex[:12]}"
        with self.admin.connect() as conn:
            conn.exec_driver_sql(f'CREATE DATABASE "{name}"')
        return self.url.set(database=name).render_as_string(hide_password=False)

    def drop(self, url: str) -> None:
        name = make_url(url).database
        with self.admin.connect() as conn:
            conn.execute(text("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                              "WHERE datname = :name AND pid <> pg_backend_pid()"), {"name": name})
            conn.exec_driver_sql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer]:
    """The server of REGISTRY_TEST_POSTGRES_URL; skips the test when it is not set."""
    if POSTGRES_URL is None:
        pytest.skip(NO_POSTGRES)
    server = PostgresServer(POSTGRES_URL)
    yield server
    server.admin.dispose()


@pytest.fixture
def postgres_url(postgres_server: PostgresServer) -> Iterator[str]:
    """The URL of a new, empty PostgreSQL database, dropped after the test."""
    url = postgres_server.create()
    yield url
    postgres_server.drop(url)


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A new, empty metadata database: a SQLite file, and (as a second run) a PostgreSQL database."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'registry.db'}"
    url: str = request.getfixturevalue("postgres_url")
    return url


# -- S3: moto's S3 server on 127.0.0.1 (a real HTTP endpoint), reset before every test -----------

S3_BUCKET = "registry-test"
S3_PREFIX = "team/models"
#: Dummy credentials: moto accepts any unless a test turns its authentication on.
S3_CREDENTIALS = {"AWS_ACCESS_KEY_ID": "testing-key-id", "AWS_SECRET_ACCESS_KEY": "testing-secret-key",
                  "AWS_DEFAULT_REGION": "us-east-1"}


class S3Server:
    """A ThreadedMotoServer on a free loopback port (moto's backend state is per process)."""

    def __init__(self, port: int = 0) -> None:
        import logging

        from moto.server import ThreadedMotoServer

        logging.getLogger("werkzeug").setLevel(logging.ERROR)  # no access log on stderr
        self.server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
        self.server.start()
        host, self.port = self.server.get_host_and_port()
        self.endpoint = f"http://{host}:{self.port}"

    def reset(self) -> None:
        import urllib.request

        urllib.request.urlopen(urllib.request.Request(f"{self.endpoint}/moto-api/reset", method="POST"),
                               timeout=10).close()

    def client(self) -> Any:
        import boto3

        return boto3.client("s3", endpoint_url=self.endpoint, region_name="us-east-1",
                            aws_access_key_id="testing-key-id", aws_secret_access_key="testing-secret-key")

    def stop(self) -> None:
        """Stop serving and close the socket, so clients get "connection refused", not a hang."""
        self.server.stop()
        if self.server._server is not None:
            self.server._server.server_close()


@pytest.fixture(scope="session")
def s3_server() -> Iterator[S3Server]:
    server = S3Server()
    yield server
    server.stop()


class S3:
    """An empty bucket on the moto server, seen the way the registry sees it."""

    def __init__(self, server: S3Server) -> None:
        self.server = server
        self.bucket = S3_BUCKET
        self.url = f"s3://{S3_BUCKET}/{S3_PREFIX}"
        self.options: dict[str, Any] = {"endpoint_url": server.endpoint}
        self.client = server.client()

    def keys(self, prefix: str = "") -> list[str]:
        """Every object key in the bucket (under ``prefix``)."""
        pages = self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=prefix)
        return sorted(obj["Key"] for page in pages for obj in page.get("Contents", []))

    def blob_key(self, sha256: str) -> str:
        return f"{S3_PREFIX}/blobs/sha256/{sha256[:2]}/{sha256}"

    def uploads(self) -> list[dict[str, Any]]:
        """Incomplete multipart uploads in the bucket."""
        return list(self.client.list_multipart_uploads(Bucket=self.bucket).get("Uploads", []))


@pytest.fixture
def s3(s3_server: S3Server, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[S3]:
    """A freshly reset moto server with an empty bucket, dummy AWS_* credentials, no cached s3fs clients."""
    from s3fs import S3FileSystem

    s3_server.reset()
    for var, value in S3_CREDENTIALS.items():
        monkeypatch.setenv(var, value)
    # Never read the developer's own ~/.aws files.
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-aws-config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-aws-credentials"))
    S3FileSystem.clear_instance_cache()  # fsspec caches instances by their arguments
    bucket = S3(s3_server)
    bucket.client.create_bucket(Bucket=S3_BUCKET)
    yield bucket
    S3FileSystem.clear_instance_cache()


class Storage:
    """Where a test's artifacts go; REGISTRY_STORAGE(_OPTIONS) point there for Registry(), the CLI and subprocesses."""

    def __init__(self, kind: str, url: str, options: dict[str, Any], s3: S3 | None = None) -> None:
        self.kind, self.url, self.options, self.s3 = kind, url, options, s3

    def blobs(self) -> list[str]:
        """The sha256 of every stored blob."""
        if self.s3 is not None:
            return sorted(k.rsplit("/", 1)[-1] for k in self.s3.keys(f"{S3_PREFIX}/blobs/"))
        root = Path(self.url) / "blobs"
        return sorted(p.name for p in root.rglob("*") if p.is_file()) if root.exists() else []

    def read(self, sha256: str) -> bytes:
        if self.s3 is not None:
            body = self.s3.client.get_object(Bucket=self.s3.bucket, Key=self.s3.blob_key(sha256))["Body"]
            return bytes(body.read())
        return (Path(self.url) / "blobs" / "sha256" / sha256[:2] / sha256).read_bytes()

    def write(self, sha256: str, data: bytes) -> None:
        """Replace a stored blob's bytes (to corrupt it, or to repair it)."""
        if self.s3 is not None:
            self.s3.client.put_object(Bucket=self.s3.bucket, Key=self.s3.blob_key(sha256), Body=data)
        else:
            (Path(self.url) / "blobs" / "sha256" / sha256[:2] / sha256).write_bytes(data)


@pytest.fixture(params=["local", pytest.param("s3", marks=pytest.mark.s3)])
def storage(request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Storage:
    """Artifact storage: a local directory, and (as a second run) a bucket prefix on moto's S3 server."""
    if request.param == "local":
        target = Storage("local", str(tmp_path / "artifacts"), {})
    else:
        s3: S3 = request.getfixturevalue("s3")
        target = Storage("s3", s3.url, dict(s3.options), s3)
    monkeypatch.setenv("REGISTRY_STORAGE", target.url)
    if target.options:
        import json

        monkeypatch.setenv("REGISTRY_STORAGE_OPTIONS", json.dumps(target.options))
    return target
