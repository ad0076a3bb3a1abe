"""The ``registry`` command line: option parsing and presentation over :class:`registry.Registry`."""

from __future__ import annotations

import atexit
import gc as pygc
import json
import math
import os
import signal
import sys
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

import click

from registry.errors import RegistryError, SpecError, printable

F = TypeVar("F", bound=Callable[..., Any])
#: Version numbers (and --limit/--before) as the database can hold them.
VERSION = click.IntRange(min=1, max=2**31 - 1)


class Tolerance(click.ParamType[float]):
    """A finite, non-negative float (click's FloatRange lets NaN through)."""

    name = "float"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> float:
        try:
            number = float(value)
        except (TypeError, ValueError):
            self.fail(f"{value!r} is not a number", param, ctx)
        if not math.isfinite(number) or number < 0:
            self.fail(f"{value!r} is not a finite number >= 0", param, ctx)
        return number


TOLERANCE = Tolerance()

#: Transfers smaller than this finish too quickly to deserve a progress bar.
PROGRESS_MIN_BYTES = 4 * 1024 * 1024


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
        self._registry: Any = None

    @property
    def registry(self) -> Any:
        if self._registry is None:
            from registry.api import Registry

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

    def settings(self) -> Any:
        from registry.config import Settings

        return Settings.resolve(db=self.db, storage=self.storage)

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


def render(state: State, data: Any, human: Callable[[], None]) -> None:
    """The only output function: one JSON document, or the human-readable form."""
    if state.as_json:
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


@click.group(cls=RegistryGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--db", metavar="URL", help="SQLAlchemy URL of the metadata database [env REGISTRY_DB].")
@click.option("--storage", metavar="URL", help="fsspec URL or path of the artifact store [env REGISTRY_STORAGE].")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON document on stdout.")
@click.option("-q", "--quiet", is_flag=True, help="No progress bars or notes on stderr.")
@click.version_option(package_name="model-registry", prog_name="registry")
@click.pass_context
def cli(ctx: click.Context, db: str | None, storage: str | None, as_json: bool, quiet: bool) -> None:
    """A registry of PyTorch models: every version, verified, promotable, loadable years later."""
    state = ctx.ensure_object(State)
    state.db, state.storage, state.quiet = db, storage, quiet
    state.as_json = state.as_json or as_json
    ctx.call_on_close(state.close)


@cli.command()
@click.argument("name")
@click.argument("file", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--format", "fmt", type=click.Choice(["auto", "state_dict", "full", "torchscript",
                                                    "export", "safetensors"]),
              default="auto", show_default=True, help="Artifact format; auto detects it from the bytes.")
@click.option("--arch", type=click.Path(dir_okay=False, path_type=Path), metavar="SPEC.json",
              help="Architecture spec (JSON), required for a state_dict or safetensors file.")
@click.option("--description", help="Free text shown by 'registry show'.")
@click.option("--tag", "tags", multiple=True, metavar="KEY=VALUE", help="A tag; repeat for more.")
@click.option("--alias", help="Also point this alias at the new version.")
@click.option("--example", type=click.Path(dir_okay=False, path_type=Path), metavar="FILE",
              help="Example inputs (a tensor or tuple of tensors saved with torch.save): recorded with the "
                   "version as its signature, for 'registry check'.")
@click.option("--trust-code", "--trust-pickle", "trust_code", is_flag=True,
              help="Accept a whole-model pickle referencing classes outside the trusted modules, and let "
                   "--example run a TorchScript program that is not data-only. Only if you trust its author.")
@json_option
@pass_state
def push(state: State, name: str, file: Path, fmt: str, arch: Path | None, description: str | None,
         tags: tuple[str, ...], alias: str | None, example: Path | None, trust_code: bool) -> None:
    """Store FILE as the next version of model NAME."""
    spec = _read_spec(arch) if arch is not None else None
    example_inputs = _read_example(example) if example is not None else None
    tag_map = {}
    for tag in tags:
        key, sep, value = tag.partition("=")
        if not sep or not key:
            raise click.BadParameter(f"{tag!r} is not KEY=VALUE", param_hint="--tag")
        tag_map[key] = value
    mv = state.registry.push(name, file, format=None if fmt == "auto" else fmt, spec=spec,
                             description=description, tags=tag_map, alias=alias, example_inputs=example_inputs,
                             trust_code=trust_code)
    how = " (detected)" if fmt == "auto" else ""
    render(state, mv.to_json(), lambda: click.echo(
        f"{mv.ref}  {mv.format.value}{how}  {human_size(mv.size)}  sha256:{mv.sha256}"
        + (f"  aliases: {', '.join(mv.aliases)}" if mv.aliases else "")))


@cli.command()
@click.argument("ref")
@click.option("--version", type=VERSION, help="Version number (instead of NAME:N).")
@click.option("--alias", help="Alias (instead of NAME@ALIAS).")
@click.option("-o", "--output", type=click.Path(path_type=Path), help="File or directory to write.")
@click.option("--force", is_flag=True, help="Overwrite an existing file.")
@json_option
@pass_state
def pull(state: State, ref: str, version: int | None, alias: str | None, output: Path | None,
         force: bool) -> None:
    """Write the verified artifact of REF (NAME, NAME:N, NAME@ALIAS) to a file."""
    reg = state.registry
    mv = reg.get(ref, version=version, alias=alias)
    path = reg.pull(mv.ref, dest=output, force=force)
    render(state, {**mv.to_json(), "path": str(path)}, lambda: echo(str(path)))


@cli.command(name="list")
@click.argument("name", required=False)
@click.option("--limit", type=VERSION, default=50, show_default=True,
              help="Versions per page (with NAME), newest first.")
@click.option("--before", type=VERSION, help="Only versions older than this number.")
@json_option
@pass_state
def list_(state: State, name: str | None, limit: int, before: int | None) -> None:
    """List models, or the versions of model NAME."""
    if name is None:
        models = state.registry.models()
        render(state, [m.to_json() for m in models], lambda: table(
            [(m.name, m.latest_version, m.version_count,
              ", ".join(f"{a}→{v}" for a, v in sorted(m.aliases.items()))) for m in models],
            ("MODEL", "LATEST", "VERSIONS", "ALIASES")))
        return
    versions = state.registry.versions(name, limit=limit, before=before)
    lineage = any(v.source for v in versions)  # the SOURCE column only once a version was converted
    render(state, [v.to_json() for v in versions], lambda: table(
        [(v.ref, v.format.value, human_size(v.size), v.sha256[:12], v.created_at.strftime("%Y-%m-%d %H:%M"),
          ", ".join(v.aliases), *([v.source] if lineage else [])) for v in versions],
        ("VERSION", "FORMAT", "SIZE", "SHA256", "CREATED", "ALIASES", *(["SOURCE"] if lineage else []))))


@cli.command()
@click.argument("ref")
@click.option("--version", type=VERSION, help="Version number (instead of NAME:N).")
@click.option("--alias", help="Alias (instead of NAME@ALIAS).")
@json_option
@pass_state
def show(state: State, ref: str, version: int | None, alias: str | None) -> None:
    """Show everything recorded about one version."""
    mv = state.registry.get(ref, version=version, alias=alias)

    def human() -> None:
        rows = [("version", mv.ref), ("format", mv.format.value), ("sha256", mv.sha256),
                ("size", f"{mv.size} ({human_size(mv.size)})"), ("aliases", ", ".join(mv.aliases)),
                ("created", f"{mv.created_at.isoformat(timespec='seconds')} by {mv.created_by}"),
                ("torch", mv.torch_version), ("python", mv.python_version),
                ("description", mv.description), ("source", mv.source)]
        rows += [(f"tag {k}", v) for k, v in sorted(mv.tags.items())]
        if mv.pickle_globals:
            rows.append(("pickle globals", ", ".join(mv.pickle_globals)))
        if mv.operators:
            rows.append(("operators", ", ".join(mv.operators)))
        if mv.format.value in ("torchscript", "export"):
            rows.append(("program", ("runs code (loading needs --trust-code): " + "; ".join(mv.code_problems))
                         if mv.code_problems else "data-only (tensor operators only)"))
        for key, value in rows:
            if value:
                echo(f"{key + ':':<16}{value}")
        if mv.spec is not None:
            click.echo("spec:")
            click.echo(json.dumps(mv.spec, indent=2, sort_keys=True))
        if mv.signature is not None:
            from registry.signature import describe

            click.echo("signature:")
            lines_out([f"  {line}" for line in describe(mv.signature)])

    render(state, mv.to_json(), human)


@cli.command()
@click.argument("name")
@click.option("--version", type=VERSION, required=True, help="Version to promote.")
@click.option("--to", "to", default="production", show_default=True, help="Alias to move.")
@click.option("--reason", help="Why, recorded in the history.")
@click.option("--expect", metavar="M|none",
              help="Only move the alias if it now points at version M (or at nothing: none).")
@json_option
@pass_state
def promote(state: State, name: str, version: int, to: str, reason: str | None, expect: str | None) -> None:
    """Point an alias (production by default) at NAME's version N."""
    kwargs: dict[str, Any] = {}
    if expect is not None:
        if expect.lower() == "none":
            kwargs["expect"] = None
        elif expect.isdigit() and int(expect) >= 1:
            kwargs["expect"] = int(expect)
        else:
            raise click.BadParameter(f"{expect!r} is not a version number or 'none'", param_hint="--expect")
    event = state.registry.promote(name, version, to, reason=reason, **kwargs)
    was = f" (was {event.previous})" if event.previous is not None else ""
    render(state, event.to_json(), lambda: click.echo(f"{name}@{to} -> {name}:{version}{was}"))


@cli.command()
@click.argument("name")
@click.argument("alias")
@click.option("--reason", help="Why, recorded in the history.")
@json_option
@pass_state
def demote(state: State, name: str, alias: str, reason: str | None) -> None:
    """Remove ALIAS from model NAME."""
    event = state.registry.demote(name, alias, reason=reason)
    render(state, event.to_json(),
           lambda: click.echo(f"{name}@{alias} removed (was {name}:{event.previous})"))


@cli.command()
@click.argument("name")
@json_option
@pass_state
def history(state: State, name: str) -> None:
    """Every promotion and demotion of NAME's aliases, oldest first."""
    events = state.registry.history(name)
    # Lineage: the version each event points at may have been converted from another one.
    sources = {v.version: v.source for v in state.registry.versions(name) if v.source}
    lineage = any(e.version in sources for e in events)
    render(state, [{**e.to_json(), "source": sources.get(e.version) if e.version else None} for e in events],
           lambda: table(
        [(e.at.isoformat(timespec="seconds"), e.action, e.alias, e.version, e.previous, e.user, e.reason,
          *([sources.get(e.version) if e.version else None] if lineage else [])) for e in events],
        ("TIME", "ACTION", "ALIAS", "VERSION", "PREVIOUS", "USER", "REASON", *(["SOURCE"] if lineage else []))))


@cli.command()
@click.argument("ref")
@click.option("--version", type=VERSION, help="Version number (instead of NAME:N).")
@click.option("--force", is_flag=True, help="Delete even if aliases point at it (they are removed).")
@json_option
@pass_state
def delete(state: State, ref: str, version: int | None, force: bool) -> None:
    """Delete one version (its blob too, when no other version uses it)."""
    mv = state.registry.delete(ref, version=version, force=force)
    render(state, mv.to_json(), lambda: click.echo(f"deleted {mv.ref}"))


@cli.command()
@click.argument("name", required=False)
@json_option
@pass_state
def verify(state: State, name: str | None) -> None:
    """Re-hash stored artifacts; report missing or corrupt ones (exit 1 if any)."""
    found: list[dict[str, Any]] = []
    count = 0
    for problem in state.registry.iter_problems(name):  # streamed: a line per problem as it is found
        count += 1
        if state.as_json:
            found.append(problem.to_json())
        else:
            echo(str(problem))
    if state.as_json:
        render(state, found, lambda: None)
    elif not count:
        click.echo("all artifacts verified")
    if count:
        sys.exit(1)


@cli.command()
@click.argument("ref")
@click.option("--version", type=VERSION, help="Version number (instead of NAME:N).")
@click.option("--alias", help="Alias (instead of NAME@ALIAS).")
@click.option("--device", help="Device for the weights (default cpu).")
@click.option("--trust-code", "--trust-pickle", "trust_code", is_flag=True,
              help="Let the artifact run its author's code: a whole-model pickle importing classes outside the "
                   "trusted modules, or a TorchScript program that is not data-only. Only if you trust its author.")
@json_option
@pass_state
def load(state: State, ref: str, version: int | None, alias: str | None, device: str | None,
         trust_code: bool) -> None:
    """Verify and load REF in this process, and describe the module it gives."""
    info = state.registry.describe(ref, version=version, alias=alias, map_location=device,
                                   trust_code=trust_code)
    render(state, info, lambda: lines_out([
        f"{info['ref']}  {info['format']}  loaded as {info['class']}",
        f"parameters: {info['parameters']:,} ({human_size(info['parameter_bytes'])}, {info['dtypes']})",
        f"device: {info['device']}",
    ]))


@cli.command()
@click.option("--grace", default="1h", show_default=True, metavar="DURATION",
              help="Keep orphans younger than this (0, 90s, 30m, 2h): a push may still be committing them.")
@click.option("--dry-run", is_flag=True, help="List what would be removed; remove nothing.")
@json_option
@pass_state
def gc(state: State, grace: str, dry_run: bool) -> None:
    """Remove blobs no version uses and what interrupted pushes left behind."""
    from registry.config import parse_duration
    from registry.errors import ConfigError

    try:
        grace_period = parse_duration(grace)
    except ConfigError as e:
        raise click.BadParameter(str(e), param_hint="--grace") from None
    found = state.registry.gc(grace=grace_period, dry_run=dry_run)
    # What gc could not do is not a failure of the command (everything else was done): say it on stderr.
    for warning in found.warnings:
        click.echo(f"warning: {printable(warning.message)}", err=True)
    verb = "would remove" if dry_run else "removed"
    lines = [f"{verb} {g.kind} {g.key} ({human_size(g.size)}, {g.age_seconds:.0f}s old)" for g in found]
    render(state, found.to_json(), lambda: lines_out(lines or [f"nothing to remove (grace {grace})"]))


@cli.group(cls=RegistryGroup)
def cache() -> None:
    """Inspect or empty the local cache of artifacts downloaded from remote storage."""


@cache.command(name="info")
@json_option
@pass_state
def cache_info(state: State) -> None:
    """Show where the cache is, how many artifacts it holds and their size."""
    info = state.registry.cache_info()
    render(state, info.to_json(), lambda: lines_out([
        f"location: {info.path}", f"blobs:    {info.blobs}", f"size:     {human_size(info.bytes)}"]))


@cache.command(name="clear")
@json_option
@pass_state
def cache_clear(state: State) -> None:
    """Remove every cached artifact (later loads download them again)."""
    removed = state.registry.clear_cache()
    render(state, removed.to_json(), lambda: echo(
        f"removed {removed.blobs} cached artifacts ({human_size(removed.bytes)}) from {removed.path}"))


@cli.group(cls=RegistryGroup)
def db() -> None:
    """Operate the metadata database schema (Alembic)."""


@db.command()
@click.argument("revision", default="head")
@json_option
@pass_state
def upgrade(state: State, revision: str) -> None:
    """Migrate the schema up to REVISION (default head)."""
    _migrate(state, "upgrade", revision)


@db.command()
@click.argument("revision")
@json_option
@pass_state
def downgrade(state: State, revision: str) -> None:
    """Migrate the schema down to REVISION (base removes every table: data is lost)."""
    _migrate(state, "downgrade", revision)


def _migrate(state: State, direction: str, revision: str) -> None:
    from registry import db as dbmod

    engine = dbmod.make_engine(state.settings().db_url)
    try:
        getattr(dbmod, direction)(engine, revision)
        now = dbmod.current(engine)
    finally:
        engine.dispose()
    render(state, {"revision": now}, lambda: click.echo(f"schema at {now or 'base'}"))


@db.command()
@json_option
@pass_state
def current(state: State) -> None:
    """Print the schema revision of the database (none if empty)."""
    from registry import db as dbmod

    engine = dbmod.make_engine(state.settings().db_url)
    try:
        now = dbmod.current(engine)
    finally:
        engine.dispose()
    head = dbmod.SCHEMA_HEAD
    render(state, {"revision": now, "head": head},
           lambda: click.echo(f"{now or 'none'}{' (head)' if now == head else f' (head is {head})'}"))


@cli.command()
@click.argument("ref")
@click.option("--version", type=VERSION, help="Version number (instead of NAME:N).")
@click.option("--alias", help="Alias (instead of NAME@ALIAS).")
@click.option("--rtol", type=TOLERANCE, help="Relative tolerance [default 1e-4].")
@click.option("--atol", type=TOLERANCE, help="Absolute tolerance [default 1e-5].")
@click.option("--trust-code", "--trust-pickle", "trust_code", is_flag=True,
              help="Let the artifact run its author's code: a whole-model pickle importing classes outside the "
                   "trusted modules, or a TorchScript program that is not data-only. Only if you trust its author.")
@json_option
@pass_state
def check(state: State, ref: str, version: int | None, alias: str | None, rtol: float | None,
          atol: float | None, trust_code: bool) -> None:
    """Run REF's recorded example and compare with the recorded outputs (exit 1 if they drifted)."""
    report = state.registry.check(ref, version=version, alias=alias, rtol=rtol, atol=atol,
                                  trust_code=trust_code)
    render(state, report.to_json(), lambda: lines_out(
        [f"{'ok   ' if o.ok else 'DRIFT'}  {o.path}: {o.detail}" for o in report.outputs] + [report.summary()]))
    if not report.ok:
        sys.exit(1)


@cli.command()
@click.argument("ref")
@click.option("--to", "to", required=True, type=click.Choice(["state_dict", "safetensors", "torchscript", "export"]),
              help="Format of the new version.")
@click.option("--example", type=click.Path(dir_okay=False, path_type=Path), metavar="FILE",
              help="Inputs to trace an export with (default: the recorded signature's).")
@click.option("--arch", type=click.Path(dir_okay=False, path_type=Path), metavar="SPEC.json",
              help="Architecture spec, for state_dict/safetensors from a torchscript or export version.")
@click.option("--rtol", type=TOLERANCE, help="Relative tolerance of the output check [default 1e-4].")
@click.option("--atol", type=TOLERANCE, help="Absolute tolerance of the output check [default 1e-5].")
@click.option("--description", help="Free text shown by 'registry show'.")
@click.option("--trust-code", "--trust-pickle", "trust_code", is_flag=True,
              help="Let the artifact run its author's code: a whole-model pickle importing classes outside the "
                   "trusted modules, or a TorchScript program that is not data-only. Only if you trust its author.")
@json_option
@pass_state
def convert(state: State, ref: str, to: str, example: Path | None, arch: Path | None, rtol: float | None,
            atol: float | None, description: str | None, trust_code: bool) -> None:
    """Write REF in another format and push it as the model's next version (source: REF)."""
    spec = _read_spec(arch) if arch is not None else None
    example_inputs = _read_example(example) if example is not None else None
    mv = state.registry.convert(ref, to, example_inputs=example_inputs, spec=spec, rtol=rtol, atol=atol,
                                description=description, trust_code=trust_code)
    checked = " (outputs checked against the signature)" if mv.signature is not None else ""
    render(state, mv.to_json(), lambda: click.echo(
        f"{mv.ref}  {mv.format.value}  from {mv.source}{checked}  {human_size(mv.size)}  sha256:{mv.sha256}"))


@cli.command()
@click.argument("ref_a")
@click.argument("ref_b")
@click.option("--exit-code", is_flag=True, help="Exit 1 when the versions differ (as git diff --exit-code).")
@click.option("--trust-code", "--trust-pickle", "trust_code", is_flag=True,
              help="Let the artifact run its author's code: a whole-model pickle importing classes outside the "
                   "trusted modules, or a TorchScript program that is not data-only. Only if you trust its author.")
@json_option
@pass_state
def diff(state: State, ref_a: str, ref_b: str, exit_code: bool, trust_code: bool) -> None:
    """Compare the parameters of two versions: spec, tensors added/removed/changed, max abs difference."""
    report = state.registry.diff(ref_a, ref_b, trust_code=trust_code)
    render(state, report.to_json(), lambda: lines_out(report.lines()))
    if exit_code and not report.identical:
        sys.exit(1)


def _read_example(path: Path) -> Any:
    from registry.signature import read_example

    return read_example(path)


def _read_spec(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise SpecError(f"spec file {str(path)!r} does not exist") from None
    except RecursionError:  # json's decoder recurses per level; spec.validate bounds what parses
        raise SpecError(f"spec file {str(path)!r} nests too deeply to be an architecture spec") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise SpecError(f"spec file {str(path)!r} is not valid JSON: {e}") from e


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


if __name__ == "__main__":
    main()
