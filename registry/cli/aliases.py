"""Commands over aliases: promote, demote, history."""

from __future__ import annotations

import click

from registry.cli import State, cli, json_option, pass_state
from registry.cli.params import EXPECT, VERSION, Expected
from registry.cli.render import render, table


@cli.command()
@click.argument("name")
@click.option("--version", type=VERSION, required=True, help="Version to promote.")
@click.option("--to", "to", default="production", show_default=True, help="Alias to move.")
@click.option("--reason", help="Why, recorded in the history.")
@click.option("--expect", type=EXPECT,
              help="Only move the alias if it now points at version M (or at nothing: none).")
@json_option
@pass_state
def promote(state: State, name: str, version: int, to: str, reason: str | None, expect: Expected | None) -> None:
    """Point an alias (production by default) at NAME's version N."""
    if expect is None:
        event = state.registry.promote(name, version, to, reason=reason)
    else:
        event = state.registry.promote(name, version, to, reason=reason, expect=expect.version)
    was = f" (was {event.previous})" if event.previous is not None else ""
    render(state.as_json, event.to_json(), lambda: click.echo(f"{name}@{to} -> {name}:{version}{was}"))


@cli.command()
@click.argument("name")
@click.argument("alias")
@click.option("--reason", help="Why, recorded in the history.")
@json_option
@pass_state
def demote(state: State, name: str, alias: str, reason: str | None) -> None:
    """Remove ALIAS from model NAME."""
    event = state.registry.demote(name, alias, reason=reason)
    render(state.as_json, event.to_json(),
           lambda: click.echo(f"{name}@{alias} removed (was {name}:{event.previous})"))


@cli.command()
@click.argument("name")
@json_option
@pass_state
def history(state: State, name: str) -> None:
    """Every promotion and demotion of NAME's aliases, oldest first."""
    events = state.registry.history(name)
    # Lineage: the version each event points at may have been converted from another one. The history
    # records carry no source, so it is looked up in the versions the facade lists (one query); a
    # `source` on AliasEvent records would make this lookup unnecessary.
    sources = {v.version: v.source for v in state.registry.versions(name) if v.source} if events else {}
    lineage = any(e.version in sources for e in events)
    render(state.as_json,
           [{**e.to_json(), "source": sources.get(e.version) if e.version else None} for e in events],
           lambda: table(
        [(e.at.isoformat(timespec="seconds"), e.action, e.alias, e.version, e.previous, e.user, e.reason,
          *([sources.get(e.version) if e.version else None] if lineage else [])) for e in events],
        ("TIME", "ACTION", "ALIAS", "VERSION", "PREVIOUS", "USER", "REASON", *(["SOURCE"] if lineage else []))))
