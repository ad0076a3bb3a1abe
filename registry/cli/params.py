"""Click parameter types and input files: what the command line accepts, converted before any Registry call."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import click

from registry.errors import ConfigError, SpecError

#: Version numbers (and --limit/--before) as the database can hold them.
VERSION = click.IntRange(min=1, max=2**31 - 1)


class Tolerance(click.ParamType[float]):
    """A finite, non-negative float (click's FloatRange lets NaN through)."""

    name = "float"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> float:
        if isinstance(value, float):
            return value
        try:
            number = float(value)
        except (TypeError, ValueError):
            self.fail(f"{value!r} is not a number", param, ctx)
        if not math.isfinite(number) or number < 0:
            self.fail(f"{value!r} is not a finite number >= 0", param, ctx)
        return number


@dataclass(frozen=True, slots=True)
class Expected:
    """``--expect``: the version an alias must point at now (None: at nothing)."""

    version: int | None


class Expect(click.ParamType[Expected]):
    """``M`` (a version number) or ``none``."""

    name = "M|none"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Expected:
        if isinstance(value, Expected):
            return value
        text = str(value)
        if text.lower() == "none":
            return Expected(None)
        if text.isdigit() and 1 <= int(text) < 2**31:
            return Expected(int(text))
        raise _bad(f"{text!r} is not a version number or 'none'", param, ctx)


class Tag(click.ParamType[tuple[str, str]]):
    """``KEY=VALUE`` (the value may hold ``=`` and may be empty)."""

    name = "KEY=VALUE"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> tuple[str, str]:
        if isinstance(value, tuple):
            return value
        key, sep, rest = str(value).partition("=")
        if not sep or not key:
            raise _bad(f"{value!r} is not KEY=VALUE", param, ctx)
        return key, rest


class Duration(click.ParamType[timedelta]):
    """``0``, ``90s``, ``30m``, ``2h``, ``1d`` (a bare number is seconds)."""

    name = "DURATION"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> timedelta:
        if isinstance(value, timedelta):
            return value
        # The registry's own parser, so the CLI and REGISTRY_* settings cannot disagree on a duration.
        from registry.config import parse_duration

        try:
            return parse_duration(str(value))
        except ConfigError as e:
            raise _bad(str(e), param, ctx) from None


def _bad(message: str, param: click.Parameter | None, ctx: click.Context | None) -> click.BadParameter:
    # "Invalid value for --grace: …", as these options always said (click's own hint quotes the name).
    hint = param.opts[0] if param is not None and param.opts else None
    return click.BadParameter(message, ctx=ctx, param=param, param_hint=hint)


TOLERANCE = Tolerance()
EXPECT = Expect()
TAG = Tag()
DURATION = Duration()


def read_spec(path: Path) -> Any:
    """The architecture spec in ``path`` (JSON); validated later by the registry."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise SpecError(f"spec file {str(path)!r} does not exist") from None
    except RecursionError:  # json's decoder recurses per level; spec.validate bounds what parses
        raise SpecError(f"spec file {str(path)!r} nests too deeply to be an architecture spec") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise SpecError(f"spec file {str(path)!r} is not valid JSON: {e}") from e


def read_example(path: Path) -> Any:
    """Example inputs saved with ``torch.save``; imports torch, so only when --example is given."""
    from registry.signature import read_example as read

    return read(path)
