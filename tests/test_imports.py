"""Import hygiene: the CLI and its metadata commands, and file pushes, never import torch."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from registry import Registry
from tests.helpers import ROOT, fresh_python, run_python, tutorial_model

NO_TORCH = "assert 'torch' not in sys.modules, sorted(m for m in sys.modules if m.startswith('torch'))"

RUN_COMMANDS = """
import json
import sys

from click.testing import CliRunner

from registry.cli import cli

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
        "import sys\nimport registry.cli\nimport registry\nfrom registry import Registry, ModelVersion\n"
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



def test_python_m_registry_works_and_imports_neither_torch_nor_alembic_nor_fsspec(tmp_path: Path) -> None:
    # -X importtime lists every module the process imports (on stderr), even though main() ends with os._exit.
    proc = subprocess.run([sys.executable, "-X", "importtime", "-m", "registry", "--help"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("Usage: registry [OPTIONS] COMMAND [ARGS]...")
    imported = {line.split("|")[-1].strip() for line in proc.stderr.splitlines() if line.startswith("import time:")}
    assert "registry.cli" in imported
    heavy = sorted(m for m in imported if m.split(".")[0] in ("torch", "alembic", "fsspec"))
    assert heavy == [], heavy


#: What the CLI may import from the registry at module level: the facade's package and its errors.
CLI_IMPORTS = {"registry", "registry.errors", "registry.cli", "registry.cli.params", "registry.cli.render"}
#: And inside functions, for what one command needs: the Registry itself, presentation and input files.
CLI_LAZY_IMPORTS = {"registry", "registry.signature", "registry.config"}


@pytest.mark.fast
def test_the_cli_is_presentation_over_the_facade() -> None:
    for path in sorted((ROOT / "registry" / "cli").glob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        top = {n.module for n in tree.body if isinstance(n, ast.ImportFrom)}
        top |= {a.name for n in tree.body if isinstance(n, ast.Import) for a in n.names}
        nested = {n.module for f in ast.walk(tree) if isinstance(f, ast.FunctionDef)
                  for n in ast.walk(f) if isinstance(n, ast.ImportFrom)}
        assert {m for m in top if m and m.startswith("registry")} <= CLI_IMPORTS, path.name
        assert {m for m in nested if m and m.startswith("registry")} <= CLI_LAZY_IMPORTS, path.name
        assert len(path.read_text(encoding="utf-8").splitlines()) < 400, path.name
