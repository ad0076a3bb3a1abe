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
    # Child interpreters import this checkout as pytest does, from any directory: `import cli` there is the
    # root shim for registry.cli, which is not installed (tests/test_packaging.py builds a wheel without it).
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
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
        from registry.cli import cli

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


# -- S3: two implementations on 127.0.0.1, each reset before every test ------------------------------
#
# moto (in-process, implements the whole multipart API, dates every upload 2010) and s3rver (Node,
# a separate process: no ListMultipartUploads, ListParts or AbortMultipartUpload). Tests taking the
# ``s3`` fixture run on both, unless they also take a fixture that patches moto's internals
# (MOTO_ONLY): those run on moto alone. ``storage`` runs on local, moto and s3rver.

S3_BUCKET = "registry-test"
S3_PREFIX = "team/models"
#: Dummy credentials: moto accepts any unless a test turns its authentication on.
S3_CREDENTIALS = {"AWS_ACCESS_KEY_ID": "testing-key-id", "AWS_SECRET_ACCESS_KEY": "testing-secret-key",
                  "AWS_DEFAULT_REGION": "us-east-1"}
S3_IMPLEMENTATIONS = ("moto", "s3rver")
#: Fixtures that reach into moto's request handling; tests taking them run on moto only.
MOTO_ONLY = frozenset({"traffic", "initiated"})
#: ``npm install --prefix tests/.node s3rver@3`` (``.ci/run`` does it) puts the server here.
S3RVER = ROOT / "tests" / ".node" / "node_modules" / ".bin" / "s3rver"
NO_S3RVER = f"s3rver is not installed: run npm install --prefix {S3RVER.parents[2]} s3rver@3"


class S3Server:
    """A ThreadedMotoServer on a free loopback port (moto's backend state is per process)."""

    kind = "moto"

    def __init__(self, port: int = 0) -> None:
        import logging

        from moto.server import ThreadedMotoServer

        logging.getLogger("werkzeug").setLevel(logging.ERROR)  # no access log on stderr
        self.server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
        self.server.start()
        host, self.port = self.server.get_host_and_port()
        self.endpoint = f"http://{host}:{self.port}"
        self.credentials = dict(S3_CREDENTIALS)

    def spawn(self, port: int = 0) -> S3Server:
        """Another server over the same data (moto keeps it in this process)."""
        return S3Server(port)

    def reset(self) -> None:
        import urllib.request

        urllib.request.urlopen(urllib.request.Request(f"{self.endpoint}/moto-api/reset", method="POST"),
                               timeout=10).close()

    def client(self) -> Any:
        import boto3

        return boto3.client("s3", endpoint_url=self.endpoint, region_name="us-east-1",
                            aws_access_key_id=self.credentials["AWS_ACCESS_KEY_ID"],
                            aws_secret_access_key=self.credentials["AWS_SECRET_ACCESS_KEY"])

    def stop(self) -> None:
        """Stop serving and close the socket, so clients get "connection refused", not a hang."""
        self.server.stop()
        if self.server._server is not None:
            self.server._server.server_close()


class S3rverServer(S3Server):
    """The Node s3rver on a free loopback port, its data in ``directory``; stopped by its pid."""

    kind = "s3rver"

    def __init__(self, directory: Path, port: int = 0) -> None:
        import subprocess
        import time

        self.directory = directory
        directory.mkdir(parents=True, exist_ok=True)
        log = directory.parent / f"{directory.name}-{uuid.uuid4().hex[:6]}.log"
        # --silent still prints "S3rver listening on ADDRESS:PORT", which tells the port it chose.
        # Any signature is accepted for its access key (S3RVER), so tests can use any secret.
        with open(log, "wb") as out:
            self.proc = subprocess.Popen(
                [str(S3RVER), "--silent", "--directory", str(directory), "--address", "127.0.0.1",
                 "--port", str(port), "--allow-mismatched-signatures"],
                stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + 30
        while True:
            text = log.read_text(errors="replace")
            if "listening on" in text:
                self.port = int(text.split("listening on", 1)[1].split()[0].rsplit(":", 1)[1])
                break
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"s3rver did not start: {text.strip()}")
            time.sleep(0.05)
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self.credentials = {"AWS_ACCESS_KEY_ID": "S3RVER", "AWS_SECRET_ACCESS_KEY": "S3RVER",
                            "AWS_DEFAULT_REGION": "us-east-1"}

    def spawn(self, port: int = 0) -> S3rverServer:
        """Another server over the same data directory."""
        return S3rverServer(self.directory, port)

    def reset(self) -> None:
        import shutil

        for entry in self.directory.iterdir():  # s3rver reads its directory on every request
            if entry.is_dir():
                shutil.rmtree(entry)
            else:
                entry.unlink()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except Exception:
                self.proc.kill()
                self.proc.wait()

    def pending_parts(self) -> int:
        """Bytes of parts held for incomplete uploads (s3rver keeps them in ``<bucket>/._S3rver_uploads``)."""
        return sum(p.stat().st_size for p in self.directory.glob("*/._S3rver_uploads/*/*")
                   if p.name.isdigit())


@pytest.fixture(scope="session")
def s3_server() -> Iterator[S3Server]:
    server = S3Server()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def s3rver_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3rverServer]:
    if not S3RVER.exists():
        pytest.skip(NO_S3RVER)  # fails the run under REGISTRY_TEST_REQUIRE_ALL=1 (CI)
    server = S3rverServer(tmp_path_factory.mktemp("s3rver") / "data")
    yield server
    server.stop()


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "s3_impl" in metafunc.fixturenames:
        kinds = ["moto"] if MOTO_ONLY.intersection(metafunc.fixturenames) else list(S3_IMPLEMENTATIONS)
        metafunc.parametrize("s3_impl", kinds, indirect=True)


@pytest.fixture
def s3_impl(request: pytest.FixtureRequest) -> str:
    """Which S3 server a test runs on; moto for tests that ask for ``s3`` only at run time."""
    return str(getattr(request, "param", "moto"))


class S3:
    """An empty bucket on an S3 server, seen the way the registry sees it."""

    def __init__(self, server: S3Server) -> None:
        self.server = server
        self.kind = server.kind
        self.bucket = S3_BUCKET
        self.url = f"s3://{S3_BUCKET}/{S3_PREFIX}"
        self.options: dict[str, Any] = {"endpoint_url": server.endpoint}
        self.client = server.client()

    def keys(self, prefix: str = "") -> list[str]:
        """Every object key in the bucket (under ``prefix``)."""
        pages = self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=prefix)
        return sorted(obj["Key"] for page in pages for obj in page.get("Contents", []))

    def blob_keys(self) -> list[str]:
        """Every key but the registry's upload markers (``PREFIX/uploads/``)."""
        return [k for k in self.keys() if not k.startswith(f"{S3_PREFIX}/uploads/")]

    def blob_key(self, sha256: str) -> str:
        return f"{S3_PREFIX}/blobs/sha256/{sha256[:2]}/{sha256}"

    def uploads(self) -> list[dict[str, Any]]:
        """Incomplete multipart uploads in the bucket (s3rver cannot list them: its parts on disk instead)."""
        if isinstance(self.server, S3rverServer):
            return [{"Key": "?", "UploadId": p.name}
                    for p in self.server.directory.glob("*/._S3rver_uploads/*") if p.is_dir()]
        return list(self.client.list_multipart_uploads(Bucket=self.bucket).get("Uploads", []))


def _server(request: pytest.FixtureRequest, kind: str) -> S3Server:
    server: S3Server = request.getfixturevalue("s3_server" if kind == "moto" else "s3rver_server")
    return server


def _bucket(server: S3Server, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> S3:
    from s3fs import S3FileSystem

    server.reset()
    for var, value in server.credentials.items():
        monkeypatch.setenv(var, value)
    # Never read the developer's own ~/.aws files.
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-aws-config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-aws-credentials"))
    S3FileSystem.clear_instance_cache()  # fsspec caches instances by their arguments
    bucket = S3(server)
    bucket.client.create_bucket(Bucket=S3_BUCKET)
    return bucket


@pytest.fixture
def s3(request: pytest.FixtureRequest, s3_impl: str, monkeypatch: pytest.MonkeyPatch,
       tmp_path: Path) -> Iterator[S3]:
    """A freshly reset server (moto, then s3rver) with an empty bucket, its credentials, no cached s3fs clients."""
    from s3fs import S3FileSystem

    yield _bucket(_server(request, s3_impl), monkeypatch, tmp_path)
    S3FileSystem.clear_instance_cache()


class Storage:
    """Where a test's artifacts go; REGISTRY_STORAGE(_OPTIONS) point there for Registry(), the CLI and subprocesses."""

    def __init__(self, kind: str, url: str, options: dict[str, Any], s3: S3 | None = None) -> None:
        self.kind, self.url, self.options, self.s3 = kind, url, options, s3

    def blobs(self) -> list[str]:
        """The sha256 of every stored blob (never an upload marker)."""
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


@pytest.fixture(params=["local", *(pytest.param(kind, marks=pytest.mark.s3) for kind in S3_IMPLEMENTATIONS)])
def storage(request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Storage]:
    """Artifact storage: a local directory, then a bucket prefix on moto's S3 server, then on s3rver's."""
    from s3fs import S3FileSystem

    if request.param == "local":
        target = Storage("local", str(tmp_path / "artifacts"), {})
    else:
        s3 = _bucket(_server(request, request.param), monkeypatch, tmp_path)
        target = Storage("s3", s3.url, dict(s3.options), s3)
    monkeypatch.setenv("REGISTRY_STORAGE", target.url)
    if target.options:
        import json

        monkeypatch.setenv("REGISTRY_STORAGE_OPTIONS", json.dumps(target.options))
    yield target
    S3FileSystem.clear_instance_cache()
