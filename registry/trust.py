"""Which dotted names the registry may import: whole-component prefix matching, no dunders."""

from __future__ import annotations

import re
from collections.abc import Iterable

#: Always trusted: PyTorch's own building blocks.
DEFAULT_TRUSTED: tuple[str, ...] = ("torch.nn",)

_COMPONENT_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")


def components(dotted: str) -> list[str]:
    """Split ``pkg.mod.Class`` or ``pkg.mod:Class`` into components; [] if any is not an identifier."""
    parts = dotted.replace(":", ".", 1).split(".")
    return parts if all(_COMPONENT_RE.match(p) for p in parts) else []


def has_dunder(dotted: str) -> bool:
    """True if any component looks like ``__name__`` (``__reduce__``, ``__builtins__``, ...)."""
    return any(p.startswith("__") and p.endswith("__") for p in dotted.replace(":", ".").split("."))


def is_trusted(dotted: str, prefixes: Iterable[str]) -> bool:
    """True if ``dotted`` lies under one of ``prefixes``, matched on whole components.

    ``torch.nn.Linear`` is under ``torch.nn``; ``torch.nn_evil.X`` is not.
    """
    parts = components(dotted)
    if not parts or has_dunder(dotted):
        return False
    for prefix in prefixes:
        head = prefix.split(".")
        if parts[: len(head)] == head:
            return True
    return False


def normalize_prefixes(prefixes: Iterable[str]) -> tuple[str, ...]:
    """Validate user-given module prefixes and add the defaults; returns a sorted, unique tuple."""
    from registry.errors import ConfigError

    out = set(DEFAULT_TRUSTED)
    for raw in prefixes:
        prefix = raw.strip()
        if not prefix:
            continue
        if ":" in prefix or not components(prefix) or has_dunder(prefix):
            raise ConfigError(
                f"invalid trusted module prefix {prefix!r}: use a dotted module path such as 'mypkg.models'"
            )
        out.add(prefix)
    return tuple(sorted(out))
