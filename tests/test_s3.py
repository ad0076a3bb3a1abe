"""Remote storage through s3fs against real S3 HTTP endpoints (moto and s3rver), and the same scenarios locally.

Scenarios that make sense on any storage take the parametrised ``storage`` fixture (local, moto,
s3rver); the rest are S3-only (the ``s3`` fixture: moto and s3rver): the cache, multipart uploads,
interrupted and failing uploads, gc of incomplete uploads, endpoints that go away, and secrets.
Where s3rver lacks an operation (ListMultipartUploads, ListParts, AbortMultipartUpload) the test
asserts the documented degraded behaviour: parts left on the server are said to be left.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import socket
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from registry import IntegrityError, Registry, StorageError
from tests.conftest import S3, S3_PREFIX, Cli, Storage
from tests.helpers import TUTORIAL_SPEC, fresh_python, registry_command, tutorial_model

MiB = 2**20
SECRET = "Sup3r-S3cret-Value/for+tests"


# -- fixtures and helpers -------------------------------------------------------------------------


@dataclass
class Traffic:
    """Every object-level request moto's server answers (method, path?query, body size), and injected faults."""

    requests: list[tuple[str, str, int]] = field(default_factory=list)
    faults: list[tuple[str, str, list[int]]] = field(default_factory=list)

    def count(self, method: str, contains: str = "") -> int:
        return sum(1 for m, url, _ in self.requests if m == method and contains in url)

    def fail(self, method: str, contains: str, times: int = 10**6) -> None:
        """Answer the matching requests with HTTP 500 InternalError, ``times`` times."""
        self.faults.append((method, contains, [times]))


@pytest.fixture
def traffic(monkeypatch: pytest.MonkeyPatch) -> Traffic:
    from moto.s3.responses import S3Response

    seen = Traffic()
    original = S3Response.key_response

    def key_response(self: Any, request: Any, full_url: str, headers: Any) -> Any:
        url = full_url.split("://", 1)[-1].split("/", 1)[-1]
        seen.requests.append((request.method, url, int(request.headers.get("Content-Length") or 0)))
        for method, contains, left in seen.faults:
            if request.method == method and contains in url and left[0] > 0:
                left[0] -= 1
                return 500, {}, (b"<?xml version='1.0' encoding='UTF-8'?><Error><Code>InternalError</Code>"
                                 b"<Message>injected failure</Message></Error>")
        return original(self, request, full_url, headers)

    monkeypatch.setattr(S3Response, "key_response", key_response)
    return seen


def model_files(directory: Path, seed: int = 1) -> tuple[nn.Module, dict[str, Path], Path]:
    """The tutorial's model saved the three ways, and its spec file."""
    model = tutorial_model(seed)
    directory.mkdir(parents=True, exist_ok=True)
    files = {"state_dict": directory / "sd.pt", "full": directory / "whole.pt",
             "torchscript": directory / "scripted.pt"}
    torch.save(model.state_dict(), files["state_dict"])
    torch.save(model, files["full"])
    torch.jit.script(model).save(str(files["torchscript"]))
    spec = directory / "spec.json"
    spec.write_text(json.dumps(TUTORIAL_SPEC))
    return model, files, spec


def big_state_dict(directory: Path, width: int) -> tuple[Path, Path]:
    """A state_dict file of about ``4 * width**2`` bytes, and its spec file."""
    torch.manual_seed(0)
    path, spec = directory / f"linear{width}.pt", directory / f"linear{width}.json"
    torch.save(nn.Linear(width, width, bias=False).state_dict(), path)
    spec.write_text(json.dumps({"target": "torch.nn.Linear",
                                "kwargs": {"in_features": width, "out_features": width, "bias": False}}))
    return path, spec


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def s3_env(monkeypatch: pytest.MonkeyPatch, s3: S3, **options: Any) -> None:
    monkeypatch.setenv("REGISTRY_STORAGE", s3.url)
    monkeypatch.setenv("REGISTRY_STORAGE_OPTIONS", json.dumps({**s3.options, **options}))


#: Fail fast where a test provokes failures on purpose (the default policy retries 3 times).
NO_RETRIES = {"config_kwargs": {"retries": {"total_max_attempts": 1}}}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def one_error_line(stderr: str) -> str:
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), stderr
    return lines[0]


# -- the same scenarios on local and S3 storage ---------------------------------------------------


def test_three_formats_push_pull_promote_load_delete_verify(
    storage: Storage, cli: Cli, tmp_path: Path
) -> None:
    model, files, spec = model_files(tmp_path / "src")
    shas = {}
    for fmt, path in files.items():
        extra = ["--arch", str(spec)] if fmt == "state_dict" else []
        out = json.loads(cli.ok("push", f"m-{fmt}", str(path), *extra, "--json").stdout)
        assert out["format"] == fmt and out["sha256"] == sha256(path.read_bytes())
        shas[fmt] = out["sha256"]
    assert storage.blobs() == sorted(shas.values())
    if storage.s3 is not None:  # the same content-addressed layout as on disk, under the prefix
        assert storage.s3.keys() == sorted(storage.s3.blob_key(s) for s in shas.values())

    (tmp_path / "pulled").mkdir()
    for fmt, path in files.items():
        dest = tmp_path / "pulled" / f"{fmt}.pt"
        out = json.loads(cli.ok("pull", f"m-{fmt}", "-o", str(dest), "--json").stdout)
        assert out["path"] == str(dest) and dest.read_bytes() == path.read_bytes()
    assert sorted(p.name for p in (tmp_path / "pulled").iterdir()) == ["full.pt", "state_dict.pt", "torchscript.pt"]

    cli.ok("promote", "m-full", "--version", "1")
    code = (
        "import json, torch\n"
        "from registry import Registry\n"
        "x = torch.linspace(-1, 1, 128).reshape(1, 128)\n"
        "reg = Registry()\n"
        "out = {r: reg.load(r)(x).tolist() for r in ['m-state_dict', 'm-full@production', 'm-torchscript']}\n"
        "print(json.dumps(out))\n"
    )
    outputs = json.loads(fresh_python(code).strip().splitlines()[-1])  # REGISTRY_STORAGE* and AWS_* inherited
    expected = model(torch.linspace(-1, 1, 128).reshape(1, 128)).flatten().tolist()
    assert len(outputs) == 3
    for ref, got in outputs.items():
        assert got[0] == pytest.approx(expected), ref
    cache = json.loads(cli.ok("cache", "info", "--json").stdout)
    assert cache["blobs"] == (3 if storage.kind == "s3" else 0)  # remote blobs were cached by the subprocess

    cli.ok("delete", "m-torchscript")
    assert storage.blobs() == sorted([shas["state_dict"], shas["full"]])
    assert cli.ok("verify").stdout.strip() == "all artifacts verified"


def test_identical_push_stores_and_uploads_nothing_new(storage: Storage, cli: Cli, tmp_path: Path,
                                                       request: pytest.FixtureRequest) -> None:
    _, files, _ = model_files(tmp_path / "src")
    on_moto = storage.s3 is not None and storage.s3.kind == "moto"
    traffic: Traffic | None = request.getfixturevalue("traffic") if on_moto else None
    first = json.loads(cli.ok("push", "a", str(files["full"]), "--json").stdout)
    if traffic is not None:
        assert traffic.count("PUT") == 1  # one small object: one PUT straight to its final key
        traffic.requests.clear()
    second = json.loads(cli.ok("push", "b", str(files["full"]), "--json").stdout)
    assert first["sha256"] == second["sha256"]
    assert storage.blobs() == [first["sha256"]]  # counted in the bucket (or directory) itself
    if traffic is not None:
        assert traffic.count("PUT") == 0 and traffic.count("POST") == 0  # found by HEAD, nothing sent


def test_corrupt_blob_is_detected_on_load_pull_and_verify(storage: Storage, tmp_path: Path) -> None:
    _, files, _ = model_files(tmp_path / "src")
    good = files["torchscript"].read_bytes()
    with Registry() as reg:
        mv = reg.push("m", files["torchscript"])
        bad = bytearray(good)
        bad[len(bad) // 2] ^= 0xFF
        storage.write(mv.sha256, bytes(bad))

        with pytest.raises(IntegrityError, match=f"artifact m:1 is corrupt: expected sha256 {mv.sha256}"):
            reg.load("m")
        assert reg.cache_info().blobs == 0  # the bad download never entered the cache
        out = tmp_path / "out"
        out.mkdir()
        with pytest.raises(IntegrityError):
            reg.pull("m", dest=out / "m.pt")
        assert list(out.iterdir()) == []  # no partial file
        assert [p.kind for p in reg.verify()] == ["corrupt"]

        storage.write(mv.sha256, good)  # repaired: loads again, nothing stale was kept
        assert isinstance(reg.load("m"), torch.jit.ScriptModule)
        assert reg.verify() == []


# -- S3: the cache --------------------------------------------------------------------------------


@pytest.mark.s3
def test_second_load_is_served_from_the_cache(s3: S3, traffic: Traffic, monkeypatch: pytest.MonkeyPatch,
                                              cli: Cli, tmp_path: Path) -> None:
    s3_env(monkeypatch, s3)
    _, files, spec = model_files(tmp_path / "src")
    with Registry() as reg:
        mv = reg.push("m", files["state_dict"], spec=TUTORIAL_SPEC)
        traffic.requests.clear()
        reg.load("m")
        gets = traffic.count("GET")
        assert gets >= 1
        reg.load("m")
        reg.pull("m", dest=tmp_path / "pulled.pt")
        assert traffic.count("GET") == gets  # served from the cache: no GET for the object
        cached = Path(reg.settings.cache_dir) / "blobs" / "sha256" / mv.sha256[:2] / mv.sha256
        assert cached.read_bytes() == files["state_dict"].read_bytes()

        cached.write_bytes(b"damaged")  # a cache file that fails verification is fetched again
        reg.load("m")
        assert traffic.count("GET") == 2 * gets
        assert cached.read_bytes() == files["state_dict"].read_bytes()

    info = json.loads(cli.ok("cache", "info", "--json").stdout)
    assert info == {"path": str(tmp_path / "home" / "cache"), "blobs": 1, "bytes": mv.size}
    assert "location: " + str(tmp_path / "home" / "cache") in cli.ok("cache", "info").stdout
    cleared = json.loads(cli.ok("cache", "clear", "--json").stdout)
    assert cleared["blobs"] == 1
    assert json.loads(cli.ok("cache", "info", "--json").stdout)["blobs"] == 0


@pytest.mark.s3
def test_cache_location_follows_registry_cache(s3: S3, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    s3_env(monkeypatch, s3)
    monkeypatch.setenv("REGISTRY_CACHE", str(tmp_path / "elsewhere"))
    _, files, _ = model_files(tmp_path / "src")
    with Registry() as reg:
        reg.push("m", files["full"])
        reg.load("m")
        info = reg.cache_info()
    assert (info.path, info.blobs) == (str(tmp_path / "elsewhere"), 1)


# -- S3: uploads ----------------------------------------------------------------------------------


@pytest.mark.s3
def test_large_file_goes_up_in_bounded_parts(s3: S3, traffic: Traffic, tmp_path: Path) -> None:
    path, spec = big_state_dict(tmp_path, 1800)  # ~13 MB
    with Registry(storage=s3.url, storage_options=s3.options) as reg:
        reg.store.part_size = 5 * MiB  # S3's minimum, so a small file needs several parts
        mv = reg.push("big", path, spec=json.loads(spec.read_text()))
        parts = [size for method, url, size in traffic.requests if method == "PUT" and "partNumber=" in url]
        assert len(parts) >= 2 and max(parts) <= 5 * MiB + 4 * MiB  # one part (plus a read chunk) in memory
        assert traffic.count("PUT", "partNumber=") == len(parts) and traffic.count("POST", "uploadId=") == 1
        assert s3.uploads() == []
        assert reg.pull("big", dest=tmp_path / "back.pt").read_bytes() == path.read_bytes()
        assert mv.size == path.stat().st_size


@pytest.mark.s3
def test_transient_server_errors_are_retried(s3: S3, traffic: Traffic, tmp_path: Path) -> None:
    path, spec = big_state_dict(tmp_path, 1800)  # ~13 MB: two parts of >= 5 MiB
    traffic.fail("PUT", "partNumber=2", times=1)
    with Registry(storage=s3.url, storage_options=s3.options) as reg:  # the default retry policy
        reg.store.part_size = 5 * MiB
        reg.push("m", path, spec=json.loads(spec.read_text()))
        assert traffic.count("PUT", "partNumber=2") == 2
        assert [p.kind for p in reg.verify()] == []


@pytest.mark.s3
def test_server_failing_mid_upload_leaves_no_version_and_no_upload(s3: S3, traffic: Traffic,
                                                                   tmp_path: Path) -> None:
    path, spec = big_state_dict(tmp_path, 1800)
    traffic.fail("PUT", "partNumber=2")
    with Registry(storage=s3.url, storage_options={**s3.options, **NO_RETRIES}) as reg:
        reg.store.part_size = 5 * MiB
        with pytest.raises(StorageError, match=f"cannot upload to storage {s3.url}: .*injected failure") as e:
            reg.push("m", path, spec=json.loads(spec.read_text()))
        assert "\n" not in str(e.value)
        assert traffic.count("PUT", "partNumber=1") == 1  # it was mid-upload
        assert s3.uploads() == []  # aborted: S3 keeps no parts
        assert s3.keys() == []  # and no object under the final key
        assert reg.models() == []


@pytest.mark.s3
@pytest.mark.slow
@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "sigterm"])
def test_ctrl_c_or_sigterm_during_push_aborts_the_multipart_upload(s3: S3, monkeypatch: pytest.MonkeyPatch,
                                                                   tmp_path: Path, signum: int) -> None:
    s3_env(monkeypatch, s3)
    path, spec = big_state_dict(tmp_path, 2100)  # ~17.6 MB: more than one 16 MiB part
    marker = tmp_path / "paused"
    proc = subprocess.Popen(
        [registry_command(), "push", "big", str(path), "--arch", str(spec)],
        env={**os.environ, "REGISTRY_TEST_PAUSE_AT": "uploading",
             "REGISTRY_TEST_PAUSE_FILE": str(marker)},
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        deadline = time.monotonic() + 60
        while not marker.exists():
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "the push never reached the upload"
            time.sleep(0.02)
        assert len(s3.uploads()) == 1  # a multipart upload is open, its first part sent
        assert len(s3.keys(f"{S3_PREFIX}/uploads/")) == 1  # and recorded, with the time it started
        proc.send_signal(signum)
        stdout, stderr = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 128 + signum, stderr
    assert stdout == ""
    if s3.kind == "moto":
        assert s3.uploads() == []  # aborted before exiting
        assert s3.keys() == []  # no object, no marker
        if signum == signal.SIGINT:
            assert one_error_line(stderr) == "error: interrupted"
        else:
            assert stderr == ""  # SIGTERM is silent when it leaves nothing behind
    else:  # s3rver answers AbortMultipartUpload with 405: the push says the parts remain
        what = "interrupted" if signum == signal.SIGINT else "terminated"
        line = one_error_line(stderr)
        assert line.startswith(f"error: {what}; the upload of {s3.bucket}/{S3_PREFIX}/blobs/sha256/"), line
        assert "could not be aborted: AbortMultipartUpload failed with HTTP 405 MethodNotAllowed" in line
        assert "parts remain on the server" in line and "AbortIncompleteMultipartUpload" in line
        assert len(s3.uploads()) == 1 and s3.server.pending_parts() >= 16 * MiB  # type: ignore[attr-defined]
        assert len(s3.keys(f"{S3_PREFIX}/uploads/")) == 1  # the marker stays, for gc to report it
    assert s3.blob_keys() == []
    with Registry() as reg:
        assert reg.models() == []


@pytest.mark.s3
def test_failed_upload_whose_abort_fails_says_the_parts_remain(s3: S3, tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    from registry import uploads

    path, spec = big_state_dict(tmp_path, 1800)  # ~13 MB: three parts of 5 MiB
    send = uploads.MultipartWriter._send
    sent = [0]

    def failing_send(self: uploads.MultipartWriter, data: bytes) -> None:
        sent[0] += 1
        if sent[0] == 2:
            raise OSError("injected failure")
        send(self, data)

    monkeypatch.setattr(uploads.MultipartWriter, "_send", failing_send)
    with Registry(storage=s3.url, storage_options=s3.options) as reg:
        reg.store.part_size = 5 * MiB
        with pytest.raises(StorageError) as e:
            reg.push("m", path, spec=json.loads(spec.read_text()))
        message = str(e.value)
        assert message.startswith(f"cannot upload to storage {s3.url}: injected failure"), message
        assert "\n" not in message and reg.models() == []
    assert s3.blob_keys() == []
    if s3.kind == "moto":
        assert "could not be aborted" not in message
        assert s3.uploads() == [] and s3.keys() == []
    else:
        assert "; the upload of " in message and "could not be aborted" in message
        assert "parts remain on the server" in message
        assert len(s3.uploads()) == 1 and len(s3.keys(f"{S3_PREFIX}/uploads/")) == 1


@pytest.mark.s3
def test_multipart_push_and_pull_leave_only_the_blob(s3: S3, tmp_path: Path) -> None:
    path, spec = big_state_dict(tmp_path, 1800)  # ~13 MB: three parts of 5 MiB
    with Registry(storage=s3.url, storage_options=s3.options) as reg:
        reg.store.part_size = 5 * MiB
        mv = reg.push("big", path, spec=json.loads(spec.read_text()))
        assert s3.keys() == [s3.blob_key(mv.sha256)]  # completed: its marker is gone too
        assert s3.uploads() == []
        assert reg.pull("big", dest=tmp_path / "back.pt").read_bytes() == path.read_bytes()
        assert reg.gc(grace=timedelta(0)) == [] and reg.verify() == []


@pytest.fixture
def initiated(monkeypatch: pytest.MonkeyPatch) -> Callable[[float], None]:
    """Set the start time moto reports for multipart uploads (it always says 2010-11-10 otherwise)."""
    from moto.s3.responses import S3Response

    original = S3Response.list_multipart_uploads
    when = [time.time()]

    def list_multipart_uploads(self: Any) -> Any:
        status, headers, body = original(self)
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S.000Z", time.gmtime(when[0]))
        return status, headers, body.replace("2010-11-10T20:48:33.000Z", stamp)

    monkeypatch.setattr(S3Response, "list_multipart_uploads", list_multipart_uploads)
    return lambda seconds_ago: when.__setitem__(0, time.time() - seconds_ago)


@pytest.mark.s3
def test_gc_aborts_incomplete_uploads_older_than_the_grace_period(
    s3: S3, monkeypatch: pytest.MonkeyPatch, cli: Cli, initiated: Callable[[float], None]
) -> None:
    s3_env(monkeypatch, s3)
    ours = f"team/models/blobs/sha256/ab/{'ab' * 32}"
    upload = s3.client.create_multipart_upload(Bucket=s3.bucket, Key=ours)["UploadId"]
    s3.client.upload_part(Bucket=s3.bucket, Key=ours, UploadId=upload, PartNumber=1, Body=b"x" * 1000)
    s3.client.create_multipart_upload(Bucket=s3.bucket, Key="someone-else/file.bin")  # not under our prefix

    initiated(60)
    assert json.loads(cli.ok("gc", "--json").stdout) == []  # younger than the default grace (1h)
    initiated(2 * 3600)
    dry = json.loads(cli.ok("gc", "--dry-run", "--json").stdout)
    assert [(g["kind"], g["size"], round(g["age_seconds"] / 3600)) for g in dry] == [("upload", 1000, 2)]
    assert len(s3.uploads()) == 2
    done = cli.ok("gc")
    assert f"removed upload blobs/sha256/ab/{'ab' * 32}?uploadId={upload}" in done.stdout
    assert [u["Key"] for u in s3.uploads()] == ["someone-else/file.bin"]


def abandoned_upload(s3: S3, sha: str, seconds_ago: float) -> str:
    """A multipart upload the registry started ``seconds_ago`` (its marker says so) and never finished."""
    from registry import uploads

    with Registry(storage=s3.url, storage_options=s3.options) as reg:
        writer = uploads.MultipartWriter(reg.store.fs, reg.store.root, reg.store.key(sha), 20 * MiB, 5 * MiB)
        writer.started = time.time() - seconds_ago
        writer.write(b"x" * 5 * MiB)  # the first part is sent: the upload exists, and is recorded
        assert writer.upload_id is not None
        return writer.upload_id


def entries(output: str) -> tuple[list[tuple[str, str]], dict[str, str]]:
    """``gc --json``: what it removed (kind, key), and its warnings by key."""
    data = json.loads(output)
    return ([(e["kind"], e["key"]) for e in data if e["kind"] != "warning"],
            {e["key"]: e["message"] for e in data if e["kind"] == "warning"})


@pytest.mark.s3
def test_gc_dates_uploads_by_the_registry_and_says_what_the_server_cannot_do(
    s3: S3, monkeypatch: pytest.MonkeyPatch, cli: Cli
) -> None:
    s3_env(monkeypatch, s3)
    old = abandoned_upload(s3, "ab" * 32, 2 * 3600)  # a killed push's, two hours ago
    young = abandoned_upload(s3, "cd" * 32, 0)  # a push in progress: moto dates both uploads 2010
    old_key = f"blobs/sha256/ab/{'ab' * 32}?uploadId={old}"
    young_key = f"blobs/sha256/cd/{'cd' * 32}?uploadId={young}"

    dry = cli.ok("gc", "--dry-run", "--json")
    removed, warnings = entries(dry.stdout)
    if s3.kind == "moto":
        assert removed == [("upload", old_key)] and warnings == {} and dry.stderr == ""
    else:  # no ListMultipartUploads (501), no AbortMultipartUpload (405): said, not hidden
        assert removed == [] and set(warnings) == {"uploads", old_key}
        assert "ListMultipartUploads failed with HTTP 501 NotImplemented" in warnings["uploads"]
        assert f"upload {old_key} could not be aborted: AbortMultipartUpload failed with HTTP 405" \
            in warnings[old_key]
        assert "parts remain on the server" in warnings[old_key]
        assert "AbortIncompleteMultipartUpload" in warnings[old_key]
        assert dry.stderr.splitlines() == [f"warning: {m}" for m in warnings.values()]
    assert len(s3.uploads()) == 2  # a dry run changes nothing

    done = cli.ok("gc", "--json")
    assert entries(done.stdout) == (removed, warnings)  # the dry run said exactly what gc would do
    markers = s3.keys(f"{S3_PREFIX}/uploads/")
    if s3.kind == "moto":
        assert [u["UploadId"] for u in s3.uploads()] == [young] and len(markers) == 1
    else:
        assert len(s3.uploads()) == 2 and len(markers) == 2  # kept: the next gc reports them again

    # gc does everything else it can: an orphan blob goes, whatever the server lacks; exit 0.
    orphan = "ef" * 32
    s3.client.put_object(Bucket=s3.bucket, Key=s3.blob_key(orphan), Body=b"orphan")
    time.sleep(2.2)
    out = cli.ok("gc", "--grace", "2s")
    assert f"removed blob {orphan}" in out.stdout
    if s3.kind == "moto":
        assert f"removed upload {young_key}" in out.stdout and out.stderr == ""
        assert s3.uploads() == [] and s3.keys() == []
    else:
        assert f"warning: upload {young_key} could not be aborted" in out.stderr
        assert s3.blob_keys() == []


# -- S3: failures ---------------------------------------------------------------------------------


@pytest.mark.s3
def test_endpoint_stopped_mid_run(s3: S3, monkeypatch: pytest.MonkeyPatch, cli: Cli, tmp_path: Path) -> None:
    server = s3.server.spawn()  # a server of this test's own, to stop (over the same data)
    monkeypatch.setenv("REGISTRY_STORAGE", s3.url)
    monkeypatch.setenv("REGISTRY_STORAGE_OPTIONS", json.dumps({"endpoint_url": server.endpoint, **NO_RETRIES}))
    _, files, _ = model_files(tmp_path / "src")
    try:
        cli.ok("push", "m", str(files["full"]))
        server.stop()
        failed = cli.fails("push", "m", str(files["torchscript"]), match=f"storage {s3.url}")
        assert "Could not connect to the endpoint URL" in failed.stderr
        cli.fails("pull", "m:1", "-o", str(tmp_path / "m.pt"), match=f"storage {s3.url}")
        assert not (tmp_path / "m.pt").exists()
        assert [v["version"] for v in json.loads(cli.ok("list", "m", "--json").stdout)] == [1]
    finally:
        server.stop()
    restarted = s3.server.spawn(port=server.port)
    try:
        assert cli.ok("verify").stdout.strip() == "all artifacts verified"
        cli.ok("pull", "m", "-o", str(tmp_path / "m.pt"))
        assert (tmp_path / "m.pt").read_bytes() == files["full"].read_bytes()
    finally:
        restarted.stop()


@pytest.mark.s3
def test_unreachable_endpoint_missing_bucket_bad_credentials(s3: S3, monkeypatch: pytest.MonkeyPatch,
                                                             cli: Cli, tmp_path: Path) -> None:
    _, files, _ = model_files(tmp_path / "src")
    nowhere = f"http://127.0.0.1:{free_port()}"
    cases: list[tuple[str, dict[str, Any], str]] = [
        (s3.url, {"endpoint_url": nowhere, **NO_RETRIES}, "Could not connect to the endpoint URL"),
        ("s3://no-such-bucket/models", s3.options, "bucket does not exist"),
        (s3.url, {**s3.options, "key": "AKIDWRONG", "secret": SECRET}, "Forbidden; check the credentials"),
    ]
    import moto.settings

    for url, options, reason in cases:
        monkeypatch.setenv("REGISTRY_STORAGE", url)
        monkeypatch.setenv("REGISTRY_STORAGE_OPTIONS", json.dumps(options))
        if "key" in options:
            monkeypatch.setattr(moto.settings, "INITIAL_NO_AUTH_ACTION_COUNT", 0)  # moto checks credentials
        failed = cli.fails("push", "m", str(files["full"]), match=reason)
        line = one_error_line(failed.stderr)
        assert line.startswith(f"error: cannot upload to storage {url}: "), line
        assert SECRET not in failed.stderr
    monkeypatch.setattr(moto.settings, "INITIAL_NO_AUTH_ACTION_COUNT", float("inf"))
    assert s3.keys() == [] and s3.uploads() == []
    assert json.loads(cli.ok("list", "--json").stdout) == []  # no version row for blobs that never landed


# -- S3: configuration and secrets ----------------------------------------------------------------


@pytest.mark.s3
def test_endpoint_and_region_from_the_aws_environment(s3: S3, monkeypatch: pytest.MonkeyPatch, cli: Cli,
                                                      tmp_path: Path) -> None:
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3.server.endpoint)
    monkeypatch.delenv("AWS_DEFAULT_REGION")
    monkeypatch.setenv("AWS_REGION", "eu-west-1")
    _, files, _ = model_files(tmp_path / "src")
    out = json.loads(cli.ok("--storage", s3.url, "push", "m", str(files["full"]), "--json").stdout)
    assert s3.keys() == [s3.blob_key(out["sha256"])]
    with Registry(storage=s3.url) as reg:
        assert reg.store.fs.client_kwargs.get("region_name") == "eu-west-1"


@pytest.mark.s3
def test_secrets_are_never_shown_logged_or_stored(s3: S3, monkeypatch: pytest.MonkeyPatch, cli: Cli,
                                                  tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET)  # moto accepts any credentials by default
    s3_env(monkeypatch, s3, key=s3.server.credentials["AWS_ACCESS_KEY_ID"], secret=SECRET, token=SECRET + "-token")
    _, files, _ = model_files(tmp_path / "src")
    shown = [
        cli.ok("push", "m", str(files["full"]), "--json"),
        cli.ok("push", "m", str(files["torchscript"])),
        cli.ok("show", "m"), cli.ok("show", "m", "--json"), cli.ok("list"), cli.ok("list", "m", "--json"),
        cli.ok("pull", "m", "-o", str(tmp_path / "m.pt"), "--json"), cli.ok("history", "m"),
        cli.ok("verify", "--json"), cli.ok("gc", "--json"), cli.ok("cache", "info", "--json"),
        cli.fails("pull", "nope", match="not found"),
    ]
    for result in shown:
        assert SECRET not in result.stdout + result.stderr
    with Registry() as reg:
        assert SECRET not in repr(reg.settings) and SECRET not in reg.store.display_url
        assert reg.settings.storage_options["secret"] == SECRET  # it is used, just never shown
    database_files = list((tmp_path / "home").glob("registry.db*"))  # the WAL too
    assert database_files and all(SECRET.encode() not in f.read_bytes() for f in database_files)
    assert SECRET not in caplog.text

    monkeypatch.setenv("REGISTRY_STORAGE_OPTIONS", json.dumps({**s3.options, "key": "wrong", "secret": SECRET}))
    import moto.settings

    monkeypatch.setattr(moto.settings, "INITIAL_NO_AUTH_ACTION_COUNT", 0)
    failed = cli.fails("pull", "m:1", "-o", str(tmp_path / "again.pt"), match=f"storage {s3.url}")  # not cached
    assert SECRET not in failed.stderr


@pytest.mark.s3
def test_server_messages_echoing_a_secret_are_scrubbed(s3: S3) -> None:
    with Registry(storage=s3.url, storage_options={**s3.options, "secret": SECRET}) as reg:
        with pytest.raises(StorageError) as e, reg.store._errors("read"):
            raise OSError(f"denied for {SECRET}\nsecond line")
    assert str(e.value) == f"cannot read storage {s3.url}: denied for *** second line"


# -- progress bars --------------------------------------------------------------------------------


class Bars:
    """A progress factory that records every bar: description, total, bytes reported, closed."""

    def __init__(self) -> None:
        self.bars: list[dict[str, Any]] = []

    def __call__(self, description: str, total: int) -> Any:
        bar = {"description": description, "total": total, "done": 0, "closed": False}
        self.bars.append(bar)

        class Bar:
            def update(self, n: int) -> None:
                bar["done"] += n

            def close(self) -> None:
                bar["closed"] = True

        return Bar()

    def summary(self) -> list[tuple[str, int, bool]]:
        return [(b["description"].split()[0], b["total"], b["done"] == b["total"] and b["closed"])
                for b in self.bars]


@pytest.mark.s3
def test_transfers_report_progress_to_the_factory(s3: S3, tmp_path: Path) -> None:
    path, spec = big_state_dict(tmp_path, 1300)
    size = path.stat().st_size
    bars = Bars()
    with Registry(storage=s3.url, storage_options=s3.options, progress=bars) as reg:
        reg.push("m", path, spec=json.loads(spec.read_text()))
        assert bars.summary() == [("hash", size, True), ("upload", size, True)]
        reg.load("m")
        reg.load("m")  # cached: no transfer, no bar
        assert bars.summary()[2:] == [("download", size, True)]
        assert bars.bars[2]["description"] == "download m:1"


@pytest.fixture
def terminal(monkeypatch: pytest.MonkeyPatch) -> Callable[[bool], None]:
    import cli as cli_module

    def set_tty(value: bool) -> None:
        monkeypatch.setattr(cli_module, "stderr_is_terminal", lambda: value)

    return set_tty


@pytest.mark.s3
def test_cli_progress_bars_only_on_a_terminal_and_never_in_json(
    s3: S3, monkeypatch: pytest.MonkeyPatch, cli: Cli, tmp_path: Path, terminal: Callable[[bool], None]
) -> None:
    s3_env(monkeypatch, s3)
    path, spec = big_state_dict(tmp_path, 1300)  # above the 4 MiB threshold
    _, files, _ = model_files(tmp_path / "src")  # a few kB: below it

    terminal(True)
    pushed = cli.ok("push", "big", str(path), "--arch", str(spec), "--json")
    assert json.loads(pushed.stdout)["name"] == "big"  # stdout is exactly one JSON document
    assert "upload sha256:" in pushed.stderr and "%" in pushed.stderr
    pulled = cli.ok("pull", "big", "-o", str(tmp_path / "big.pt"), "--json")
    assert json.loads(pulled.stdout)["path"] == str(tmp_path / "big.pt") and "download big:1" in pulled.stderr
    assert cli.ok("push", "small", str(files["full"])).stderr == ""  # too small for a bar

    assert cli.ok("--quiet", "pull", "big", "-o", str(tmp_path / "q.pt")).stderr == ""
    terminal(False)
    assert cli.ok("pull", "big", "-o", str(tmp_path / "n.pt"), "--force").stderr == ""


def test_cli_builds_no_bars_when_quiet_or_not_a_terminal(terminal: Callable[[bool], None]) -> None:
    from cli import State

    terminal(True)
    factory = State().progress()
    assert factory is not None
    bar = factory("upload x", 100)  # below the threshold: a disabled bar that still counts
    bar.update(100)
    bar.close()
    assert State(quiet=True).progress() is None
    terminal(False)
    assert State().progress() is None


# -- options handed to s3fs -----------------------------------------------------------------------


def test_s3_defaults_fill_only_what_the_user_left_open() -> None:
    from registry import remote

    opts = remote.storage_options("s3://b/p", {"endpoint_url": "http://x"}, environ={})
    assert opts == {"endpoint_url": "http://x", "client_kwargs": {},
                    "config_kwargs": {"retries": {"mode": "standard", "total_max_attempts": 3},
                                      "connect_timeout": 10.0, "read_timeout": 60.0}}
    timed = remote.storage_options("s3://b/p", {}, environ={}, timeout=2.5)["config_kwargs"]
    assert (timed["connect_timeout"], timed["read_timeout"]) == (2.5, 2.5)  # REGISTRY_TIMEOUT
    mine = {"config_kwargs": {"retries": {"max_attempts": 9}, "connect_timeout": 1, "read_timeout": 7}}
    assert remote.storage_options("s3://b", mine, environ={}, timeout=3)["config_kwargs"] == mine["config_kwargs"]
    assert "retries" not in remote.storage_options("s3://b", {}, environ={"AWS_MAX_ATTEMPTS": "7"})["config_kwargs"]
    region = remote.storage_options("s3://b", {}, environ={"AWS_REGION": "eu-west-1"})
    assert region["client_kwargs"] == {"region_name": "eu-west-1"}
    assert remote.storage_options("/local/dir", {"auto_mkdir": True}, environ={}) == {"auto_mkdir": True}
    passed = {"config_kwargs": {"retries": {"max_attempts": 2}}}
    remote.storage_options("s3://b", passed, environ={})["config_kwargs"]["retries"]["x"] = 1
    assert passed == {"config_kwargs": {"retries": {"max_attempts": 2}}}  # botocore mutates its copy, not ours


def test_secret_values_are_collected_from_options_and_environment() -> None:
    from registry import remote

    found = remote.secrets({"key": "id", "secret": "s1", "client_kwargs": {"aws_session_token": "t1"},
                            "config_kwargs": {"retries": {"max_attempts": 3}}},
                           environ={"AWS_SECRET_ACCESS_KEY": "env-secret", "AWS_ACCESS_KEY_ID": "id2"})
    assert set(found) == {"s1", "t1", "env-secret"}
    assert remote.scrub("a s1 b\nenv-secret", found) == "a *** b ***"


def test_part_size_keeps_huge_files_within_the_part_limit() -> None:
    from registry import remote

    assert remote.part_size(1) == remote.PART_SIZE
    huge = 1000 * 2**30
    assert remote.part_size(huge) * (remote.MAX_PARTS - 1) >= huge
    assert remote.part_size(huge) < 128 * MiB
