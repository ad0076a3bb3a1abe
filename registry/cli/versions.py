"""Commands over versions: push, pull, list, show, delete, load."""

from __future__ import annotations

import json
from pathlib import Path

import click

from registry.cli import TRUST_CODE_HELP, State, cli, json_option, pass_state
from registry.cli.params import TAG, VERSION, read_example, read_spec
from registry.cli.render import echo, human_size, lines_out, render, table

FORMATS = ["auto", "state_dict", "full", "torchscript", "export", "safetensors"]


@cli.command()
@click.argument("name")
@click.argument("file", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--format", "fmt", type=click.Choice(FORMATS), default="auto", show_default=True,
              help="Artifact format; auto detects it from the bytes.")
@click.option("--arch", type=click.Path(dir_okay=False, path_type=Path), metavar="SPEC.json",
              help="Architecture spec (JSON), required for a state_dict or safetensors file.")
@click.option("--description", help="Free text shown by 'registry show'.")
@click.option("--tag", "tags", type=TAG, multiple=True, help="A tag; repeat for more.")
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
         tags: tuple[tuple[str, str], ...], alias: str | None, example: Path | None, trust_code: bool) -> None:
    """Store FILE as the next version of model NAME."""
    spec = read_spec(arch) if arch is not None else None
    example_inputs = read_example(example) if example is not None else None
    mv = state.registry.push(name, file, format=None if fmt == "auto" else fmt, spec=spec,
                             description=description, tags=dict(tags), alias=alias, example_inputs=example_inputs,
                             trust_code=trust_code)
    how = " (detected)" if fmt == "auto" else ""
    render(state.as_json, mv.to_json(), lambda: click.echo(
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
    render(state.as_json, {**mv.to_json(), "path": str(path)}, lambda: echo(str(path)))


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
        render(state.as_json, [m.to_json() for m in models], lambda: table(
            [(m.name, m.latest_version, m.version_count,
              ", ".join(f"{a}→{v}" for a, v in sorted(m.aliases.items()))) for m in models],
            ("MODEL", "LATEST", "VERSIONS", "ALIASES")))
        return
    versions = state.registry.versions(name, limit=limit, before=before)
    lineage = any(v.source for v in versions)  # the SOURCE column only once a version was converted
    render(state.as_json, [v.to_json() for v in versions], lambda: table(
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
            # Rendering only: describe() reads the recorded signature (JSON) and imports no torch.
            from registry.signature import describe

            click.echo("signature:")
            lines_out([f"  {line}" for line in describe(mv.signature)])

    render(state.as_json, mv.to_json(), human)


@cli.command()
@click.argument("ref")
@click.option("--version", type=VERSION, help="Version number (instead of NAME:N).")
@click.option("--force", is_flag=True, help="Delete even if aliases point at it (they are removed).")
@json_option
@pass_state
def delete(state: State, ref: str, version: int | None, force: bool) -> None:
    """Delete one version (its blob too, when no other version uses it)."""
    mv = state.registry.delete(ref, version=version, force=force)
    render(state.as_json, mv.to_json(), lambda: click.echo(f"deleted {mv.ref}"))


@cli.command()
@click.argument("ref")
@click.option("--version", type=VERSION, help="Version number (instead of NAME:N).")
@click.option("--alias", help="Alias (instead of NAME@ALIAS).")
@click.option("--device", help="Device for the weights (default cpu).")
@click.option("--trust-code", "--trust-pickle", "trust_code", is_flag=True, help=TRUST_CODE_HELP)
@json_option
@pass_state
def load(state: State, ref: str, version: int | None, alias: str | None, device: str | None,
         trust_code: bool) -> None:
    """Verify and load REF in this process, and describe the module it gives."""
    info = state.registry.describe(ref, version=version, alias=alias, map_location=device,
                                   trust_code=trust_code)
    render(state.as_json, info, lambda: lines_out([
        f"{info['ref']}  {info['format']}  loaded as {info['class']}",
        f"parameters: {info['parameters']:,} ({human_size(info['parameter_bytes'])}, {info['dtypes']})",
        f"device: {info['device']}",
    ]))
