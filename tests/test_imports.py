"""Import hygiene: the CLI and its metadata commands, and file pushes, never import torch."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import torch

from registry import Registry
from tests.helpers import fresh_python, run_python, tutorial_model

NO_TORCH = "assert 'torch' not in sys.modules, sorted(m for m in sys.modules if m.startswith('torch'))"

RUN_COMMANDS = """
import json
import sys

from click.testing import CliRunner

from cli import cli

runner = CliRunner()
for args in json.loads({commands!r}):
    result = runner.invoke(cli, args, catch_exceptions=False)
    assert result.exit_code == 0, (args, result.output)
    {no_torch}
    print(" ".join(args), "ok")
"""


def _run_commands(commands: list[list[str]], cwd: Path) -> str:
    code = textwrap.dedent(RUN_COMMANDS).format(commands=json.dumps(commands), no_torch=NO_TORCH)
    return fresh_python(code, cwd=cwd)


def test_importing_the_cli_and_the_package_does_not_import_torch() -> None:
    proc = run_python(
        "import sys\nimport cli\nimport registry\nfrom registry import Registry, ModelVersion\n"
        "import registry.api, registry.db, registry.store, registry.queries, registry.pickles\n" + NO_TORCH
    )
    assert proc.returncode == 0, proc.stderr


def test_metadata_commands_do_not_import_torch(home: Path, tmp_path: Path) -> None:
    with Registry() as reg:
        reg.push("m", tutorial_model(seed=1))
        reg.push("m", tutorial_model(seed=2))
        reg.promote("m", 1)
    commands = [
        ["list"], ["list", "m"], ["--json", "list", "m", "--limit", "1"], ["show", "m"], ["show", "m@production"],
        ["--json", "show", "m:1"], ["promote", "m", "--version", "2", "--reason", "r"],
        ["promote", "m", "--version", "1", "--to", "staging", "--expect", "none"], ["demote", "m", "staging"],
        ["history", "m"], ["--json", "history", "m"], ["db", "current"],
    ]
    out = _run_commands(commands, tmp_path)
    assert out.count(" ok\n") == len(commands)
    with Registry() as reg:  # the commands did run
        assert reg.get("m@production").version == 2
        assert [e.action for e in reg.history("m")][-1] == "demote"


def test_pushing_and_pulling_torchscript_and_full_files_does_not_import_torch(home: Path, tmp_path: Path) -> None:
    model = tutorial_model()
    torch.jit.script(model).save(str(tmp_path / "scripted.pt"))
    torch.save(model, tmp_path / "whole.pt")
    commands = [
        ["push", "s", "scripted.pt"], ["push", "f", "whole.pt", "--format", "full", "--tag", "k=v"],
        ["pull", "s", "-o", "s-out.pt"], ["pull", "f", "-o", "f-out.pt"], ["verify"],
    ]
    out = _run_commands(commands, tmp_path)
    assert out.count(" ok\n") == len(commands)
    with Registry() as reg:
        assert reg.get("s").format.value == "torchscript" and reg.get("f").format.value == "full"
    assert (tmp_path / "s-out.pt").read_bytes() == (tmp_path / "scripted.pt").read_bytes()
