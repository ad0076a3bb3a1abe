"""The ``registry`` command line: option parsing and presentation over :class:`registry.Registry`.

This module holds the group, its global options and the lazily built Registry (:class:`State`), the
one error policy (:class:`RegistryGroup`) and the console script (:func:`main`). The commands live
in the modules imported at the bottom, one per part of the registry they face:

- :mod:`registry.cli.versions`: push, pull, list, show, delete, load
- :mod:`registry.cli.aliases`: promote, demote, history
- :mod:`registry.cli.behaviour`: check, convert, diff
- :mod:`registry.cli.maintenance`: verify, gc, cache, db

Nothing here imports torch, fsspec or Alembic: metadata commands start light (README, Performance).
"""

from __future__ import annotations

import atexit
import gc as pygc
import os
import signal
import sys
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar

import click

from registry.errors import RegistryError, printable

if TYPE_CHECKING:
    from registry import Registry

F = TypeVar("F", bound=Callable[..., Any])

#: Transfers smaller than this finish too quickly to deserve a progress bar.
PROGRESS_MIN_BYTES = 4 * 1024 * 1024
#: The distribution that installs this command (``--version``).
DISTRIBUTION = "torch-model-registry"


class RegistryGroup(click.Group):
    """Applies the error policy once: a RegistryError is one ``error:`` line and exit status 1."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except RegistryError as e:
            if os.environ.get("REGISTRY_DEBUG"):
                raise
            # One line, always, and nothing the terminal would act on: a file name, a stored text or a
            # foreign message may carry line breaks or escape sequences.
            click.echo(f"error: {printable(str(e))}", err=True)
            ctx.exit(1)
        except KeyboardInterrupt as e:
            # Notes say what the interruption left behind (a multipart upload that could not be aborted).
            click.echo(printable("; ".join(["error: interrupted", *getattr(e, "__notes__", ())])), err=True)
            ctx.exit(130)
        except SystemExit as e:
            if getattr(e, "__notes__", None):  # SIGTERM (see _terminate), with something left behind
                click.echo(printable("; ".join(["error: terminated", *e.__notes__])), err=True)
            raise


class State:
    """Global options, and the Registry built from them on first use (so --help never opens a database)."""

    def __init__(self, db: str | None = None, storage: str | None = None, as_json: bool = False,
                 quiet: bool = False) -> None:
        self.db, self.storage, self.as_json, self.quiet = db, storage, as_json, quiet
        self._registry: Registry | None = None

    @property
    def registry(self) -> Registry:
        if self._registry is None:
            from registry import Registry

            self._registry = Registry(db=self.db, storage=self.storage, progress=self.progress())
            _resume_gc()
        return self._registry

    def progress(self) -> Callable[[str, int], Any] | None:
        """tqdm bars on stderr for large transfers; none with --quiet or when stderr is not a terminal.

        Bars never touch stdout, so --json output stays one clean document.
        """
        if self.quiet or not stderr_is_terminal():
            return None

        def bar(description: str, total: int) -> Any:
            from tqdm import tqdm

            return tqdm(total=total, desc=description, unit="B", unit_scale=True, unit_divisor=1024,
                        file=sys.stderr, leave=False, dynamic_ncols=True, disable=total < PROGRESS_MIN_BYTES)

        return bar

    def close(self) -> None:
        if self._registry is not None:
            self._registry.close()


pass_state = click.make_pass_decorator(State)


def stderr_is_terminal() -> bool:
    return sys.stderr.isatty()


def json_option(f: F) -> F:
    """``--json`` is accepted after any command as well as before it."""

    def set_json(ctx: click.Context, _param: click.Parameter, value: bool) -> None:
        if value:
            ctx.ensure_object(State).as_json = True

    return click.option("--json", "json_", is_flag=True, expose_value=False, callback=set_json,
                        help="Print one JSON document on stdout.")(f)


#: The help of every ``--trust-code`` option that lets a stored artifact run code.
TRUST_CODE_HELP = ("Let the artifact run its author's code: a whole-model pickle importing classes outside the "
                   "trusted modules, or a TorchScript program that is not data-only. Only if you trust its author.")


@click.group(cls=RegistryGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--db", metavar="URL", help="SQLAlchemy URL of the metadata database [env REGISTRY_DB].")
@click.option("--storage", metavar="URL", help="fsspec URL or path of the artifact store [env REGISTRY_STORAGE].")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON document on stdout.")
@click.option("-q", "--quiet", is_flag=True, help="No progress bars or notes on stderr.")
@click.version_option(package_name=DISTRIBUTION, prog_name="registry")
@click.pass_context
def cli(ctx: click.Context, db: str | None, storage: str | None, as_json: bool, quiet: bool) -> None:
    """A registry of PyTorch models: every version, verified, promotable, loadable years later."""
    state = ctx.ensure_object(State)
    state.db, state.storage, state.quiet = db, storage, quiet
    state.as_json = state.as_json or as_json
    ctx.call_on_close(state.close)


#: Set by main() while the command starts up without the cyclic garbage collector.
_gc_paused = False


def _resume_gc() -> None:
    """Collect again once the heavy imports are done; what they created is frozen out of later passes."""
    global _gc_paused
    if _gc_paused:
        _gc_paused = False
        pygc.freeze()
        pygc.enable()


def main() -> None:
    """The console script: one short-lived command.

    Startup and shutdown are most of a metadata command's time. The cyclic collector would walk
    SQLAlchemy's hundred thousand new objects again and again while it is imported (about 50 ms),
    and tearing them all down at exit takes longer than the query (about 80 ms). So the collector
    is paused until the Registry is built, and the process exits without the teardown, after
    atexit handlers ran and output was flushed ("dismissing Python garbage collection", Instagram).
    """
    global _gc_paused
    # SIGTERM unwinds like Ctrl-C: temporary files and multipart uploads are cleaned up on the way out.
    signal.signal(signal.SIGTERM, _terminate)
    if pygc.isenabled():
        pygc.disable()
        _gc_paused = True
    try:
        cli(prog_name="registry")
        code: Any = 0
    except SystemExit as e:
        code = e.code
    _exit(code)


def _terminate(signum: int, _frame: Any) -> None:
    raise SystemExit(128 + signum)


def _exit(code: Any) -> None:
    if isinstance(code, str):
        print(code, file=sys.stderr)
        code = 1
    elif not isinstance(code, int):
        code = 0 if code is None else 1
    if any(t.is_alive() and not t.daemon for t in threading.enumerate() if t is not threading.main_thread()):
        sys.exit(code)  # a thread still working: the normal shutdown waits for it
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed pipe (registry list | head): nothing more to say
            pass
    os._exit(code)


# The command modules add themselves to ``cli`` (and import the names above): last, once those exist.
from registry.cli import aliases, behaviour, maintenance, versions  # noqa: E402, F401, I001
