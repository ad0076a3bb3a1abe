"""Commands over a version's behaviour: check, convert, diff."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from registry.cli import TRUST_CODE_HELP, State, cli, json_option, pass_state
from registry.cli.params import TOLERANCE, VERSION, read_example, read_spec
from registry.cli.render import human_size, lines_out, render


@cli.command()
@click.argument("ref")
@click.option("--version", type=VERSION, help="Version number (instead of NAME:N).")
@click.option("--alias", help="Alias (instead of NAME@ALIAS).")
@click.option("--rtol", type=TOLERANCE, help="Relative tolerance [default 1e-4].")
@click.option("--atol", type=TOLERANCE, help="Absolute tolerance [default 1e-5].")
@click.option("--trust-code", "--trust-pickle", "trust_code", is_flag=True, help=TRUST_CODE_HELP)
@json_option
@pass_state
def check(state: State, ref: str, version: int | None, alias: str | None, rtol: float | None,
          atol: float | None, trust_code: bool) -> None:
    """Run REF's recorded example and compare with the recorded outputs (exit 1 if they drifted)."""
    report = state.registry.check(ref, version=version, alias=alias, rtol=rtol, atol=atol,
                                  trust_code=trust_code)
    render(state.as_json, report.to_json(), lambda: lines_out(
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
@click.option("--trust-code", "--trust-pickle", "trust_code", is_flag=True, help=TRUST_CODE_HELP)
@json_option
@pass_state
def convert(state: State, ref: str, to: str, example: Path | None, arch: Path | None, rtol: float | None,
            atol: float | None, description: str | None, trust_code: bool) -> None:
    """Write REF in another format and push it as the model's next version (source: REF)."""
    spec = read_spec(arch) if arch is not None else None
    example_inputs = read_example(example) if example is not None else None
    mv = state.registry.convert(ref, to, example_inputs=example_inputs, spec=spec, rtol=rtol, atol=atol,
                                description=description, trust_code=trust_code)
    checked = " (outputs checked against the signature)" if mv.signature is not None else ""
    render(state.as_json, mv.to_json(), lambda: click.echo(
        f"{mv.ref}  {mv.format.value}  from {mv.source}{checked}  {human_size(mv.size)}  sha256:{mv.sha256}"))


@cli.command()
@click.argument("ref_a")
@click.argument("ref_b")
@click.option("--exit-code", is_flag=True, help="Exit 1 when the versions differ (as git diff --exit-code).")
@click.option("--trust-code", "--trust-pickle", "trust_code", is_flag=True, help=TRUST_CODE_HELP)
@json_option
@pass_state
def diff(state: State, ref_a: str, ref_b: str, exit_code: bool, trust_code: bool) -> None:
    """Compare the parameters of two versions: spec, tensors added/removed/changed, max abs difference."""
    report = state.registry.diff(ref_a, ref_b, trust_code=trust_code)
    render(state.as_json, report.to_json(), lambda: lines_out(report.lines()))
    if exit_code and not report.identical:
        sys.exit(1)
