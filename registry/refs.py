"""Model and alias names, references (``NAME``, ``NAME:N``, ``NAME:latest``, ``NAME@ALIAS``), and free text."""

from __future__ import annotations

import re
from dataclasses import dataclass

from registry.errors import UNPRINTABLE, InvalidName, InvalidReference, InvalidText

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


def validate_text(value: object, what: str, *, multiline: bool = False, max_length: int | None = None) -> str:
    """Return ``value`` if it is printable UTF-8 text, the rule for descriptions, tags, reasons and user names.

    Refused: anything but a string; lone surrogates (bytes the OS could not decode as UTF-8); control
    characters, line separators and bidi overrides (:data:`registry.errors.UNPRINTABLE`), except newline
    and tab when ``multiline``; more than ``max_length`` characters.

    Raises:
        InvalidText: naming the field and the first offending character.
    """
    if not isinstance(value, str):
        raise InvalidText(what, value, f"must be a string, not {type(value).__name__}")
    if max_length is not None and len(value) > max_length:
        raise InvalidText(what, value, f"longer than {max_length} characters")
    for match in UNPRINTABLE.finditer(value):
        char = match.group()
        if multiline and char in "\n\t":
            continue
        if "\ud800" <= char <= "\udfff":
            raise InvalidText(what, value, "is not valid UTF-8 (bytes the system could not decode); use UTF-8 text")
        allowed = "newline and tab are allowed" if multiline else "one line, no tabs"
        raise InvalidText(what, value, f"contains control or line-separator character U+{ord(char):04X} "
                                       f"at position {match.start()}; use printable text ({allowed})")
    return value


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
