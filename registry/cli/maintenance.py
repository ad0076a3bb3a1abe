"""Operators' commands: verify, gc, and the cache and db groups."""

from __future__ import annotations

import sys
from datetime import timedelta
from typing import Any

import click

from registry.cli import RegistryGroup, State, cli, json_option, pass_state
from registry.cli.params import DURATION
from registry.cli.render import echo, human_size, lines_out, render, warn


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
        render(True, found, lambda: None)
    elif not count:
        click.echo("all artifacts verified")
    if count:
        sys.exit(1)


@cli.command()
@click.option("--grace", type=DURATION, default="1h", show_default=True,
              help="Keep orphans younger than this (0, 90s, 30m, 2h): a push may still be committing them.")
@click.option("--dry-run", is_flag=True, help="List what would be removed; remove nothing.")
@json_option
@pass_state
def gc(state: State, grace: timedelta, dry_run: bool) -> None:
    """Remove blobs no version uses and what interrupted pushes left behind."""
    found = state.registry.gc(grace=grace, dry_run=dry_run)
    # What gc could not do is not a failure of the command (everything else was done): say it on stderr.
    for warning in found.warnings:
        warn(warning.message)
    verb = "would remove" if dry_run else "removed"
    lines = [f"{verb} {g.kind} {g.key} ({human_size(g.size)}, {g.age_seconds:.0f}s old)" for g in found]
    render(state.as_json, found.to_json(),
           lambda: lines_out(lines or [f"nothing to remove (grace {_duration(grace)})"]))


def _duration(value: timedelta) -> str:
    seconds = value.total_seconds()
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds and seconds % size == 0:
            return f"{seconds / size:.0f}{unit}"
    return f"{seconds:g}s"


@cli.group(cls=RegistryGroup)
def cache() -> None:
    """Inspect or empty the local cache of artifacts downloaded from remote storage."""


@cache.command(name="info")
@json_option
@pass_state
def cache_info(state: State) -> None:
    """Show where the cache is, how many artifacts it holds and their size."""
    info = state.registry.cache_info()
    render(state.as_json, info.to_json(), lambda: lines_out([
        f"location: {info.path}", f"blobs:    {info.blobs}", f"size:     {human_size(info.bytes)}"]))


@cache.command(name="clear")
@json_option
@pass_state
def cache_clear(state: State) -> None:
    """Remove every cached artifact (later loads download them again)."""
    removed = state.registry.clear_cache()
    render(state.as_json, removed.to_json(), lambda: echo(
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
    now = state.registry.migrate(revision).revision
    render(state.as_json, {"revision": now}, lambda: click.echo(f"schema at {now or 'base'}"))


@db.command()
@click.argument("revision")
@json_option
@pass_state
def downgrade(state: State, revision: str) -> None:
    """Migrate the schema down to REVISION (base removes every table: data is lost)."""
    now = state.registry.migrate(revision, down=True).revision
    render(state.as_json, {"revision": now}, lambda: click.echo(f"schema at {now or 'base'}"))


@db.command()
@json_option
@pass_state
def current(state: State) -> None:
    """Print the schema revision of the database (none if empty)."""
    info = state.registry.schema()
    now, head = info.revision, info.head
    render(state.as_json, info.to_json(),
           lambda: click.echo(f"{now or 'none'}{' (head)' if now == head else f' (head is {head})'}"))
