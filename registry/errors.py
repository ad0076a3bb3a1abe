"""Every exception the registry raises.

The hierarchy::

    RegistryError
    ├── ConfigError               (ValueError)   bad REGISTRY_* setting or argument
    │   └── InvalidText                          a description, tag, reason or user name is not printable
    ├── InvalidName               (ValueError)   model or alias name breaks the naming rules
    ├── InvalidReference          (ValueError)   "NAME", "NAME:N", "NAME@ALIAS" could not be parsed
    ├── NotFound                  (LookupError)  no such model, version or alias
    ├── AlreadyExists             (FileExistsError) a destination file is in the way
    ├── AliasInUse                               a version an alias points at cannot be deleted
    ├── AliasConflict                            a conditional promotion found the alias elsewhere
    ├── SpecError                 (ValueError)   an architecture spec is malformed or does not fit
    │   └── UntrustedTarget                      a spec names a class outside the trusted modules
    ├── FormatError               (ValueError)   bytes are not (or not the declared) model format
    ├── UntrustedPickle                          a pickle references globals that are not trusted
    ├── UntrustedCode                            a program would run more than tensor operators
    ├── IntegrityError                           stored bytes do not match their recorded sha256
    ├── StorageError              (OSError)      the artifact store failed (URL already redacted)
    └── DatabaseError                            the metadata database failed (URL already redacted)

Each error is one line naming what was wrong and what to do; the CLI prints it after ``error:``.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager

#: What never reaches a terminal raw: C0 and C1 controls and DEL (escape sequences, OSC 52 clipboard
#: writes), every other ``str.splitlines()`` separator (U+2028, U+2029), bidi overrides and isolates
#: (text displayed in another order than stored), and lone surrogates (undecodable OS bytes).
UNPRINTABLE = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029\u202a-\u202e\u2066-\u2069\ud800-\udfff]")
_SHORT_ESCAPES = {"\t": "\\t", "\n": "\\n", "\r": "\\r"}


def _escape(match: re.Match[str]) -> str:
    char = match.group()
    code = ord(char)
    return _SHORT_ESCAPES.get(char) or (f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}")


def printable(text: str) -> str:
    """``text`` made safe for one terminal line: each character :data:`UNPRINTABLE` matches is escaped
    (``\\n``, ``\\x1b``, ``\\u2028``); everything else, backslashes included, is shown as it is."""
    return UNPRINTABLE.sub(_escape, text)


def one_line(e: BaseException, limit: int = 500) -> str:
    """The first line of a foreign exception's message, whitespace folded, for an ``error:`` line."""
    text = str(e).strip() or type(e).__name__
    return printable(" ".join(text.splitlines()[0].split())[:limit])


@contextmanager
def translated(error: Callable[[str], RegistryError], context: str, *,
               passthrough: tuple[type[BaseException], ...] = ()) -> Iterator[None]:
    """Turn a foreign exception raised in the block into ``error(f"{context}: {one_line(e)}") from e``.

    For calls into torch, safetensors or a model's own code, which raise many kinds of exception: the
    user needs their reason on one line, not a traceback. ``passthrough`` types (a registry error
    raised inside, or one the caller handles itself) are re-raised unchanged.

    Example:
        >>> with translated(FormatError, f"cannot load {artifact}"):
        ...     module = torch.jit.load(path)
    """
    try:
        yield
    except passthrough:
        raise
    except Exception as e:
        raise error(f"{context}: {one_line(e)}") from e


class RegistryError(Exception):
    """Base class of every error raised by the registry."""


class ConfigError(RegistryError, ValueError):
    """A configuration value (argument or ``REGISTRY_*`` variable) is invalid."""


class InvalidText(ConfigError):
    """A free-text value (description, tag, reason, user name) is not printable UTF-8 text."""

    def __init__(self, what: str, value: object, reason: str) -> None:
        self.what, self.value = what, value
        shown = value[:60] + "…" if isinstance(value, str) and len(value) > 60 else value
        super().__init__(f"invalid {what} {repr(shown)[:80]}: {reason}")  # repr escapes the unprintable


class InvalidName(RegistryError, ValueError):
    """A model or alias name does not follow the naming rules."""

    def __init__(self, name: str, reason: str, *, kind: str = "model name") -> None:
        self.name = name
        super().__init__(f"invalid {kind} {name!r}: {reason}")


class InvalidReference(RegistryError, ValueError):
    """A model reference could not be parsed."""


class NotFound(RegistryError, LookupError):
    """No model, version or alias matches the request."""

    def __init__(
        self, name: str, *, version: int | None = None, alias: str | None = None
    ) -> None:
        self.name, self.version, self.alias = name, version, alias
        if alias is not None:
            what = f"alias '{name}@{alias}'"
            hint = f"run 'registry list {name}' or 'registry history {name}'"
        elif version is not None:
            what = f"version '{name}:{version}'"
            hint = f"run 'registry list {name}' to see its versions"
        else:
            what = f"model '{name}'"
            hint = "run 'registry list' to see the models"
        super().__init__(f"{what} not found; {hint}")


class AlreadyExists(RegistryError, FileExistsError):
    """A file the registry would write already exists."""


class AliasInUse(RegistryError):
    """A version that an alias points at cannot be deleted without ``force``."""

    def __init__(self, name: str, version: int, aliases: Iterable[str]) -> None:
        self.name, self.version, self.aliases = name, version, tuple(aliases)
        names = ", ".join(self.aliases)
        super().__init__(
            f"'{name}:{version}' is the target of alias {names}; demote it first or use --force"
        )


class AliasConflict(RegistryError):
    """A conditional promotion (``expect=``) found the alias somewhere else."""

    def __init__(self, name: str, alias: str, expected: int | None, actual: int | None) -> None:
        self.name, self.alias, self.expected, self.actual = name, alias, expected, actual
        exp = "nothing" if expected is None else f"version {expected}"
        act = "nothing" if actual is None else f"version {actual}"
        super().__init__(
            f"alias '{name}@{alias}' points at {act}, not {exp}; nothing changed"
        )


class SpecError(RegistryError, ValueError):
    """An architecture spec is malformed, cannot be captured, or does not match the weights."""


class UntrustedTarget(SpecError):
    """A spec's target lies outside the trusted module prefixes."""

    def __init__(self, target: str, trusted: Iterable[str]) -> None:
        self.target, self.trusted = target, tuple(trusted)
        super().__init__(
            f"spec target {target!r} is not trusted (trusted: {', '.join(self.trusted)}); "
            "add its module to REGISTRY_TRUSTED_MODULES or trusted_modules= if you trust it"
        )


class FormatError(RegistryError, ValueError):
    """Bytes are not a supported model format, or not the format that was declared."""


class UntrustedPickle(RegistryError):
    """A pickle references globals that may not be unpickled without explicit trust."""

    def __init__(self, what: str, globals_: Iterable[str], *, hint: str) -> None:
        self.globals_ = tuple(sorted(set(globals_)))
        super().__init__(f"{what} references {', '.join(self.globals_)}; {hint}")


class UntrustedCode(RegistryError):
    """A program would run code beyond tensor arithmetic when loaded or called, and was not trusted."""

    def __init__(self, artifact: str, problems: Iterable[str]) -> None:
        self.artifact, self.problems = artifact, tuple(problems)
        more = len(self.problems) - 3
        shown = "; ".join(self.problems[:3]) + (f"; and {more} more" if more > 0 else "")
        super().__init__(
            f"{artifact} is a program that is not data-only ({shown}); load it with --trust-code "
            "(trust_code=True) only if you trust whoever pushed it"
        )


class IntegrityError(RegistryError):
    """Stored bytes do not match the sha256 recorded for them."""

    def __init__(self, artifact: str, expected: str, actual: str, *, name: str | None = None) -> None:
        self.artifact, self.expected, self.actual = artifact, expected, actual
        hint = f"run 'registry verify {name}'" if name else "run 'registry verify'"
        super().__init__(
            f"artifact {artifact} is corrupt: expected sha256 {expected}, got {actual}; {hint}"
        )


class StorageError(RegistryError, OSError):
    """The artifact storage failed; ``url`` never contains credentials."""

    def __init__(self, message: str, *, url: str) -> None:
        self.url = url
        super().__init__(message)


class DatabaseError(RegistryError):
    """The metadata database cannot be reached or used; ``url`` never contains a password."""

    def __init__(self, message: str, *, url: str) -> None:
        self.url = url
        super().__init__(message)
