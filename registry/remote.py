"""Object-store specifics of the blob store: S3 options and retries, secrets, part sizes, incomplete uploads."""

from __future__ import annotations

import copy
import math
import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

#: Multipart uploads send parts of at least this size; one part is all an upload holds in memory.
PART_SIZE = 16 * 2**20
#: S3 refuses more parts than this per upload, so huge files get proportionally larger parts.
MAX_PARTS = 10_000
#: botocore's retry policy unless storage options or AWS_MAX_ATTEMPTS / AWS_RETRY_MODE choose one:
#: "standard" retries throttling, 5xx answers and dropped connections with jittered exponential backoff.
S3_RETRIES: dict[str, Any] = {"mode": "standard", "max_attempts": 3}
#: Option names (at any depth) whose values are credentials, scrubbed from every message.
SECRET_OPTION_WORDS = ("secret", "token", "password", "credential")
SECRET_ENV = ("AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN")


@dataclass(frozen=True, slots=True)
class Upload:
    """An incomplete multipart upload found under the registry's prefix."""

    key: str  # full key, bucket included, as fsspec names it
    upload_id: str
    initiated: float  # seconds since the epoch
    size: int  # bytes of the parts uploaded so far


def is_s3(protocol: str | tuple[str, ...]) -> bool:
    protocols = (protocol,) if isinstance(protocol, str) else protocol
    return any(p in ("s3", "s3a") for p in protocols)


def storage_options(url: str, options: Mapping[str, Any], environ: Mapping[str, str] | None = None) -> dict[str, Any]:
    """The fsspec options for ``url``: the caller's, plus the registry's S3 defaults where they chose none.

    Returns a deep copy: botocore rewrites the ``retries`` dict it is handed.
    """
    out = copy.deepcopy(dict(options))
    if not url.startswith(("s3://", "s3a://")):
        return out
    env = os.environ if environ is None else environ
    config = out.setdefault("config_kwargs", {})
    if "retries" not in config and not env.get("AWS_MAX_ATTEMPTS") and not env.get("AWS_RETRY_MODE"):
        config["retries"] = dict(S3_RETRIES)
    # botocore reads AWS_DEFAULT_REGION only; AWS_REGION is what most other AWS tools read.
    client = out.setdefault("client_kwargs", {})
    if env.get("AWS_REGION") and not env.get("AWS_DEFAULT_REGION") and "region_name" not in client:
        client["region_name"] = env["AWS_REGION"]
    return out


def secrets(options: Mapping[str, Any], environ: Mapping[str, str] | None = None) -> tuple[str, ...]:
    """Every credential value in ``options`` and the AWS environment, longest first (for scrubbing)."""
    env = os.environ if environ is None else environ
    found = {env[name] for name in SECRET_ENV if env.get(name)}

    def walk(value: Any, secret: bool) -> None:
        if isinstance(value, Mapping):
            for k, v in value.items():
                walk(v, secret or any(word in str(k).lower() for word in SECRET_OPTION_WORDS))
        elif isinstance(value, list | tuple):
            for v in value:
                walk(v, secret)
        elif secret and isinstance(value, str) and value:
            found.add(value)

    walk(options, False)
    return tuple(sorted(found, key=len, reverse=True))


def scrub(text: str, secret_values: tuple[str, ...]) -> str:
    """``text`` on one line, with every secret value replaced by ``***``."""
    for value in secret_values:
        text = text.replace(value, "***")
    return " ".join(text.split())


def transport_errors(protocol: str | tuple[str, ...]) -> tuple[type[BaseException], ...]:
    """Exceptions besides OSError that the filesystem's client raises for unreachable or refusing servers.

    s3fs turns S3 error answers into builtins, but passes botocore's own errors (no endpoint, no
    credentials) through untranslated.
    """
    if not is_s3(protocol):
        return ()
    try:
        from botocore.exceptions import BotoCoreError
    except ImportError:  # pragma: no cover - s3fs depends on botocore
        return ()
    return (BotoCoreError,)


def part_size(size: int, minimum: int = PART_SIZE) -> int:
    """Part size for uploading ``size`` bytes: ``minimum``, or larger to stay within S3's part limit."""
    return max(minimum, math.ceil(size / (MAX_PARTS - 1)))


def list_uploads(fs: Any, prefix: str) -> Iterator[Upload]:
    """Incomplete multipart uploads whose key starts with ``prefix`` (``bucket/key-prefix``)."""
    bucket, _, key_prefix = prefix.partition("/")
    kwargs: dict[str, Any] = {"Bucket": bucket, "Prefix": key_prefix}
    while True:
        page = fs.call_s3("list_multipart_uploads", **kwargs)
        for upload in page.get("Uploads", []):
            key, upload_id = upload["Key"], upload["UploadId"]
            yield Upload(f"{bucket}/{key}", upload_id, upload["Initiated"].timestamp(),
                         _uploaded_bytes(fs, bucket, key, upload_id))
        if not page.get("IsTruncated"):
            return
        kwargs["KeyMarker"] = page.get("NextKeyMarker", "")
        kwargs["UploadIdMarker"] = page.get("NextUploadIdMarker", "")


def abort_upload(fs: Any, upload: Upload) -> None:
    bucket, _, key = upload.key.partition("/")
    try:
        fs.call_s3("abort_multipart_upload", Bucket=bucket, Key=key, UploadId=upload.upload_id)
    except FileNotFoundError:  # NoSuchUpload: completed or aborted meanwhile
        pass


def _uploaded_bytes(fs: Any, bucket: str, key: str, upload_id: str) -> int:
    total = 0
    kwargs: dict[str, Any] = {"Bucket": bucket, "Key": key, "UploadId": upload_id}
    while True:
        try:
            page = fs.call_s3("list_parts", **kwargs)
        except FileNotFoundError:  # aborted or completed since it was listed
            return total
        total += sum(int(p.get("Size", 0)) for p in page.get("Parts", []))
        if not page.get("IsTruncated"):
            return total
        kwargs["PartNumberMarker"] = page["NextPartNumberMarker"]


def discard(f: Any) -> None:
    """Abandon a file opened for writing without committing it (S3: abort its multipart upload)."""
    try:
        discard_ = getattr(f, "discard", None)
        if discard_ is not None:
            discard_()
    except Exception:  # noqa: S110 - the server is failing too; `registry gc` aborts the upload later
        pass
    finally:
        # close() would commit what was buffered; a discarded fsspec file must only be marked closed.
        try:
            f.closed = True
        except AttributeError:  # pragma: no cover - files whose `closed` is read-only
            pass
