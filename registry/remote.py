"""Object-store specifics of the blob store: S3 options, timeouts and retries, secrets, part sizes, S3 errors."""

from __future__ import annotations

import copy
import math
import os
from collections.abc import Mapping
from typing import Any

#: Multipart uploads send parts of at least this size; one part is all an upload holds in memory.
PART_SIZE = 16 * 2**20
#: S3 refuses more parts than this per upload, so huge files get proportionally larger parts.
MAX_PARTS = 10_000
#: botocore's retry policy unless storage options or AWS_MAX_ATTEMPTS / AWS_RETRY_MODE choose one:
#: "standard" retries throttling, 5xx answers, timeouts and dropped connections with jittered
#: exponential backoff; ``total_max_attempts`` counts the first attempt (``max_attempts`` would not).
S3_ATTEMPTS = 3
S3_RETRIES: dict[str, Any] = {"mode": "standard", "total_max_attempts": S3_ATTEMPTS}
#: Seconds to wait for a connection, and for each answer (or each chunk of a body being read).
CONNECT_TIMEOUT = 10.0
READ_TIMEOUT = 60.0
#: s3fs retries botocore's calls again itself (5 times by default): 3 x 5 attempts of a minute each
#: is what made a hung endpoint take 329 s. botocore alone keeps the budget.
S3FS_RETRIES = 1
#: Option names (at any depth) whose values are credentials, scrubbed from every message.
SECRET_OPTION_WORDS = ("secret", "token", "password", "credential")
SECRET_ENV = ("AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN")


def is_s3(protocol: str | tuple[str, ...]) -> bool:
    protocols = (protocol,) if isinstance(protocol, str) else protocol
    return any(p in ("s3", "s3a") for p in protocols)


def storage_options(url: str, options: Mapping[str, Any], environ: Mapping[str, str] | None = None, *,
                    timeout: float | None = None) -> dict[str, Any]:
    """The fsspec options for ``url``: the caller's, plus the registry's S3 defaults where they chose none.

    ``timeout`` (``REGISTRY_TIMEOUT``) replaces the default connect and read timeouts; timeouts in
    ``options`` win over both. Returns a deep copy: botocore rewrites the ``retries`` dict it is handed.
    """
    out = copy.deepcopy(dict(options))
    if not url.startswith(("s3://", "s3a://")):
        return out
    env = os.environ if environ is None else environ
    config = out.setdefault("config_kwargs", {})
    if "retries" not in config and not env.get("AWS_MAX_ATTEMPTS") and not env.get("AWS_RETRY_MODE"):
        config["retries"] = dict(S3_RETRIES)
    config.setdefault("connect_timeout", CONNECT_TIMEOUT if timeout is None else timeout)
    config.setdefault("read_timeout", READ_TIMEOUT if timeout is None else timeout)
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


def client_error(e: BaseException | None) -> tuple[str, int, str, str] | None:
    """``(operation, HTTP status, code, message)`` of a botocore ClientError, else None."""
    response = getattr(e, "response", None)
    if not isinstance(response, dict) or "Error" not in response:
        return None
    error = response.get("Error") or {}
    status = int((response.get("ResponseMetadata") or {}).get("HTTPStatusCode") or 0)
    return (str(getattr(e, "operation_name", "") or "the request"), status, str(error.get("Code", "")),
            " ".join(str(error.get("Message", "")).split()))


def unsupported(e: BaseException) -> bool:
    """Whether ``e`` (or the ClientError s3fs translated into it) says the server lacks the operation.

    S3-compatible servers answer 501 NotImplemented for what they never implemented, and s3rver
    405 MethodNotAllowed for multipart operations it routes nowhere (ListParts, AbortMultipartUpload).
    """
    for candidate in (e, e.__cause__):
        info = client_error(candidate)
        if info is not None and (info[1] in (501, 405) or info[2] in ("NotImplemented", "MethodNotAllowed")):
            return True
    return False
