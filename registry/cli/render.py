"""Output: one JSON document or a human-readable form; everything shown from users or the database is escaped."""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from typing import Any

import click

from registry.errors import printable


def render(as_json: bool, data: Any, human: Callable[[], None]) -> None:
    """The only output function: one JSON document, or the human-readable form."""
    if as_json:
        # ensure_ascii: control characters, U+2028/2029 and lone surrogates stay \u escapes.
        click.echo(json.dumps(data, sort_keys=True, indent=2, ensure_ascii=True))
    else:
        human()


def echo(text: str) -> None:
    """One line of human-readable output; what it shows from users or the database is escaped."""
    click.echo(printable(text))


def lines_out(lines: Sequence[str]) -> None:
    for line in lines:
        echo(line)


def warn(text: str) -> None:
    """A ``warning:`` line on stderr: something the command could not do, without failing it."""
    click.echo(f"warning: {printable(text)}", err=True)


def table(rows: Sequence[Sequence[Any]], header: Sequence[str]) -> None:
    cells = [[printable(str(c)) for c in header]]
    cells += [["-" if c is None else printable(str(c)) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    for row in cells:
        click.echo("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())


def human_size(n: int) -> str:
    size = float(n)
    for unit in ("B", "kB", "MB", "GB"):
        if size < 1000 or unit == "GB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1000
    return f"{n} B"  # pragma: no cover
