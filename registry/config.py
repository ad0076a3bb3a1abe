"""Where the registry keeps its metadata and artifacts: explicit arguments > REGISTRY_* variables > defaults."""

from __future__ import annotations

import getpass
import json
import os
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from registry.errors import ConfigError
from registry.trust import normalize_prefixes

#: Every environment variable the registry reads, all at call time.
ENV_HOME = "REGISTRY_HOME"
ENV_DB = "REGISTRY_DB"
ENV_STORAGE = "REGISTRY_STORAGE"
ENV_STORAGE_OPTIONS = "REGISTRY_STORAGE_OPTIONS"
ENV_TRUSTED = "REGISTRY_TRUSTED_MODULES"
ENV_CACHE = "REGISTRY_CACHE"
ENV_USER = "REGISTRY_USER"


@dataclass(frozen=True, slots=True)
class Settings:
    """Resolved configuration of one :class:`~registry.Registry`."""

    home: Path
    db_url: str
    storage_url: str
    cache_dir: Path
    user: str
    trusted_modules: tuple[str, ...]
    # May hold credentials: never printed (repr=False) and never stored.
    storage_options: dict[str, Any] = field(default_factory=dict, repr=False)

    @classmethod
    def resolve(
        cls,
        *,
        db: str | None = None,
        storage: str | os.PathLike[str] | None = None,
        storage_options: Mapping[str, Any] | None = None,
        trusted_modules: Iterable[str] | None = None,
        user: str | None = None,
        environ: Mapping[str, str] | None = None,
    ) -> Settings:
        """Apply precedence explicit argument > ``REGISTRY_*`` variable > default (``~/.registry``)."""
        env = os.environ if environ is None else environ
        home = Path(env.get(ENV_HOME) or Path("~/.registry")).expanduser()
        db_url = db or env.get(ENV_DB) or f"sqlite:///{home / 'registry.db'}"
        storage_url = os.fspath(storage) if storage else env.get(ENV_STORAGE) or str(home / "artifacts")
        if "://" not in storage_url:
            storage_url = str(Path(storage_url).expanduser().absolute())
        if storage_options is None:
            storage_options = _json_object(env.get(ENV_STORAGE_OPTIONS), ENV_STORAGE_OPTIONS)
        if trusted_modules is None:
            trusted_modules = env.get(ENV_TRUSTED, "").split(",")
        cache = Path(env.get(ENV_CACHE) or home / "cache").expanduser()
        return cls(
            home=home,
            db_url=db_url,
            storage_url=storage_url,
            cache_dir=cache,
            user=user or env.get(ENV_USER) or _login_name(env),
            trusted_modules=normalize_prefixes(trusted_modules),
            storage_options=dict(storage_options),
        )


def redact(url: str) -> str:
    """``url`` without a password or key in its userinfo part, safe to show in messages."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return "<unparseable url>"
    if parts.password is None and "@" not in parts.netloc:
        return url
    host = parts.netloc.rsplit("@", 1)[-1]
    user = parts.username or ""
    return urlunsplit(parts._replace(netloc=f"{user}:***@{host}" if user else host))


def _json_object(text: str | None, variable: str) -> dict[str, Any]:
    if not text:
        return {}
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise ConfigError(f"{variable} is not valid JSON ({e.msg}); expected an object such as "
                          '{"endpoint_url": "http://127.0.0.1:9000"}') from e
    if not isinstance(value, dict):
        raise ConfigError(f"{variable} must be a JSON object, not {type(value).__name__}")
    return value


def _login_name(env: Mapping[str, str]) -> str:
    for var in ("USER", "LOGNAME", "USERNAME"):
        if env.get(var):
            return env[var]
    try:
        return getpass.getuser()
    except (KeyError, OSError):  # no passwd entry, e.g. in a container with a random uid
        return f"uid-{os.getuid()}"


_DURATION_RE = re.compile(r"(\d+(?:\.\d+)?)\s*([smhd]?)\Z")
_UNITS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}
_MAX_DURATION = 36500 * 86400  # a century: beyond it datetime arithmetic overflows


def parse_duration(text: str) -> timedelta:
    """``0``, ``90s``, ``30m``, ``2h``, ``1d`` (a bare number is seconds)."""
    match = _DURATION_RE.match(text.strip().lower())
    if match is None:
        raise ConfigError(f"invalid duration {text!r}: use a number with s, m, h or d, e.g. 90s, 30m, 2h")
    seconds = float(match.group(1)) * _UNITS[match.group(2)]
    if seconds > _MAX_DURATION:
        raise ConfigError(f"invalid duration {text!r}: at most 36500d")
    return timedelta(seconds=seconds)
