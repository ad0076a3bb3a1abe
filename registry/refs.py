"""Model and alias names, and references: ``NAME``, ``NAME:N``, ``NAME:latest``, ``NAME@ALIAS``."""

from __future__ import annotations

import re
from dataclasses import dataclass

from registry.errors import InvalidName, InvalidReference

NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}\Z")
MAX_NAME = 128
#: Versions are SQL INTEGERs: larger numbers cannot exist (and would overflow the driver).
MAX_VERSION = 2**31 - 1
#: Alias names that would read as something else in a reference.
RESERVED_ALIASES = frozenset({"latest"})


def validate_name(name: object, *, kind: str = "model name") -> str:
    """Return ``name`` if it is 1-128 letters, digits, ``.``, ``_``, ``-``, starting with a letter or digit.

    Raises:
        InvalidName: naming what is wrong, with the input quoted.
    """
    if not isinstance(name, str):
        raise InvalidName(repr(name), "must be a string", kind=kind)
    if not name:
        raise InvalidName(name, "must not be empty", kind=kind)
    if len(name) > MAX_NAME:
        raise InvalidName(name[:20] + "…", f"longer than {MAX_NAME} characters", kind=kind)
    if not (name[0].isascii() and name[0].isalnum()):
        raise InvalidName(name, "must start with a letter or digit", kind=kind)
    if not NAME_RE.match(name):
        raise InvalidName(name, "use only letters, digits, '.', '_' and '-'", kind=kind)
    if kind == "alias" and name in RESERVED_ALIASES:
        raise InvalidName(name, "is reserved: NAME:latest already means the newest version", kind=kind)
    return name


@dataclass(frozen=True, slots=True)
class Ref:
    """A parsed reference: at most one of ``version`` and ``alias`` is set; neither means latest."""

    name: str
    version: int | None = None
    alias: str | None = None

    def __str__(self) -> str:
        if self.alias is not None:
            return f"{self.name}@{self.alias}"
        if self.version is not None:
            return f"{self.name}:{self.version}"
        return self.name


def parse_ref(text: str, *, version: int | None = None, alias: str | None = None) -> Ref:
    """Parse ``text``; ``version``/``alias`` (``--version``/``--alias``) may qualify a bare ``NAME``.

    Raises:
        InvalidReference: the text has a bad version, or names the version twice.
        InvalidName: the model or alias name breaks the naming rules.
    """
    if not isinstance(text, str):
        raise InvalidReference(f"invalid reference {text!r}: expected NAME, NAME:N or NAME@ALIAS")
    name, ref_version, ref_alias = text, None, None
    if "@" in text:
        name, ref_alias = text.split("@", 1)
        validate_name(ref_alias, kind="alias")
    elif ":" in text:
        name, tail = text.split(":", 1)
        if tail != "latest":
            if not (tail.isascii() and tail.isdigit()) or not 1 <= int(tail) <= MAX_VERSION:
                raise InvalidReference(
                    f"invalid reference {text!r}: the version after ':' must be a number >= 1 or 'latest'"
                )
            ref_version = int(tail)
    validate_name(name)
    given = [x for x in (ref_version, ref_alias, version, alias) if x is not None]
    if len(given) > 1:
        raise InvalidReference(
            f"reference {text!r} names its version more than once; use NAME with --version or --alias"
        )
    if version is not None and (isinstance(version, bool) or not isinstance(version, int)
                                or not 1 <= version <= MAX_VERSION):
        raise InvalidReference(f"invalid version {version!r}: must be a number >= 1")
    if alias is not None:
        validate_name(alias, kind="alias")
    return Ref(name, ref_version if ref_version is not None else version, ref_alias or alias)
