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
from urllib.parse import unquote_plus, urlsplit

from registry.errors import ConfigError
from registry.refs import validate_text
from registry.trust import normalize_prefixes

#: Every environment variable the registry reads, all at call time.
ENV_HOME = "REGISTRY_HOME"
ENV_DB = "REGISTRY_DB"
ENV_STORAGE = "REGISTRY_STORAGE"
ENV_STORAGE_OPTIONS = "REGISTRY_STORAGE_OPTIONS"
ENV_TRUSTED = "REGISTRY_TRUSTED_MODULES"
ENV_CACHE = "REGISTRY_CACHE"
ENV_USER = "REGISTRY_USER"
#: Seconds: replaces the default connect and read timeouts of storage (10 s / 60 s) and the database (10 s).
ENV_TIMEOUT = "REGISTRY_TIMEOUT"
#: Longest user name the database holds (versions.created_by, alias_events.user).
MAX_USER = 256
#: Deepest nesting of REGISTRY_STORAGE_OPTIONS: fsspec options nest two or three levels, and every
#: later walk over them (deepcopy, secret scrubbing) recurses.
MAX_OPTIONS_DEPTH = 32
#: Query parameters whose values are credentials: libpq's password and sslpassword, tokens, keys.
SECRET_QUERY_WORDS = ("password", "secret", "token", "key", "credential")
# SQLAlchemy's own reading of userinfo (engine/url.py::_parse_url): the password runs to the first "@"
# and may hold "/", "?" and "#", which urlsplit would take for the end of the host.
_USERINFO_RE = re.compile(r"[^:/]*(?::[^@]*)?@")


@dataclass(frozen=True, slots=True, repr=False)
class Settings:
    """Resolved configuration of one :class:`~registry.Registry`."""

    home: Path
    db_url: str
    storage_url: str
    cache_dir: Path
    user: str
    trusted_modules: tuple[str, ...]
    # May hold credentials: never printed and never stored.
    storage_options: dict[str, Any] = field(default_factory=dict)
    #: ``REGISTRY_TIMEOUT`` in seconds; None: each client's documented defaults.
    timeout: float | None = None

    def __repr__(self) -> str:
        return (f"Settings(home={self.home!r}, db_url={redact(self.db_url)!r}, "
                f"storage_url={redact(self.storage_url)!r}, cache_dir={self.cache_dir!r}, user={self.user!r}, "
                f"trusted_modules={self.trusted_modules!r}, timeout={self.timeout!r})")

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
            user=_user(user, env),
            trusted_modules=normalize_prefixes(trusted_modules),
            storage_options=dict(storage_options),
            timeout=_timeout(env.get(ENV_TIMEOUT)),
        )


def redact(url: str) -> str:
    """``url`` safe to show anywhere: no password in its userinfo, no value of a secret query parameter.

    The one function every URL goes through before it reaches a message, a repr or the terminal. It reads
    the userinfo both the way urlsplit does (to the last "@" of the host part) and the way SQLAlchemy does
    (to the first "@", "/" allowed in a password) and hides the longer, so neither parser's password shows.
    ``?password=``, ``?sslpassword=`` and every parameter named with one of :data:`SECRET_QUERY_WORDS`
    becomes ``=***``.
    """
    scheme, sep, rest = url.partition("://")
    if not sep:
        return url  # a local path: no userinfo, no query
    try:
        netloc = urlsplit(url).netloc
    except ValueError:  # e.g. an unclosed "[" of an IPv6 host
        netloc = rest.split("/", 1)[0]
    end = netloc.rfind("@") + 1
    if match := _USERINFO_RE.match(rest):
        end = max(end, match.end())
    head = ""
    if end:
        user = rest[: end - 1].split(":", 1)[0]
        head, rest = f"{user}:***@" if user else "***@", rest[end:]
    path, query_sep, query = rest.partition("?")
    if query_sep:
        params = [_redact_param(p) for p in query.split("&")]
        rest = f"{path}?{'&'.join(params)}"
    return f"{scheme}://{head}{rest}"


def _redact_param(param: str) -> str:
    key, eq, _value = param.partition("=")
    if eq and any(word in unquote_plus(key).lower() for word in SECRET_QUERY_WORDS):
        return f"{key}=***"
    return param


def _json_object(text: str | None, variable: str) -> dict[str, Any]:
    if not text:
        return {}
    example = '{"endpoint_url": "http://127.0.0.1:9000"}'
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise ConfigError(f"{variable} is not valid JSON ({e.msg}); expected an object such as {example}") from e
    except RecursionError:
        value = None  # nested deeper than the interpreter's recursion limit: refused below
    if value is None or _depth(value) > MAX_OPTIONS_DEPTH:
        raise ConfigError(f"{variable} nests deeper than {MAX_OPTIONS_DEPTH} levels; "
                          f"expected an object such as {example}")
    if not isinstance(value, dict):
        raise ConfigError(f"{variable} must be a JSON object, not {type(value).__name__}")
    return value


def _depth(value: Any) -> int:
    """How deeply JSON containers nest in ``value``, found without recursion."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict | list):
            deepest = max(deepest, depth)
            stack.extend((child, depth + 1) for child in (item.values() if isinstance(item, dict) else item))
    return deepest


def _timeout(text: str | None) -> float | None:
    if not text or not text.strip():
        return None
    try:
        seconds = float(text)
    except ValueError:
        seconds = float("nan")
    if not 0 < seconds <= 86400:  # NaN fails too
        raise ConfigError(f"{ENV_TIMEOUT}={text!r} is not a number of seconds between 0 and 86400, e.g. 30")
    return seconds


def _user(explicit: str | None, env: Mapping[str, str]) -> str:
    """The user recorded with pushes and alias moves: printable, one line, at most :data:`MAX_USER` characters."""
    if explicit:
        return validate_text(explicit, "user", max_length=MAX_USER)
    if env.get(ENV_USER):
        return validate_text(env[ENV_USER], ENV_USER, max_length=MAX_USER)
    return validate_text(_login_name(env), "login name (set REGISTRY_USER instead)", max_length=MAX_USER)


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
