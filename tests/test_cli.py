"""Every command through click's CliRunner: output, --json, and bad input that changes nothing."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import click
import pytest
import torch

from registry import Registry
from registry.db import SCHEMA_HEAD as HEAD
from tests.conftest import Cli
from tests.helpers import TUTORIAL_SPEC, blob_path, flip_byte, registry_snapshot, tutorial_model


@pytest.fixture
def files(tmp_path: Path) -> dict[str, Path]:
    """The tutorial model saved the three ways, its spec, and a few broken inputs."""
    model = tutorial_model()
    paths = {
        "state": tmp_path / "state.pt", "full": tmp_path / "full.pt", "script": tmp_path / "script.pt",
        "spec": tmp_path / "spec.json", "badjson": tmp_path / "bad.json", "text": tmp_path / "notes.txt",
    }
    torch.save(model.state_dict(), paths["state"])
    torch.save(model, paths["full"])
    torch.jit.script(model).save(str(paths["script"]))
    paths["spec"].write_text(json.dumps(TUTORIAL_SPEC))
    paths["badjson"].write_text("{not json")
    paths["text"].write_text("hello")
    return paths


@pytest.fixture
def populated(home: Path, files: dict[str, Path]) -> Registry:
    """``m`` with versions 1 (production) and 2, both state_dicts."""
    with Registry() as reg:
        reg.push("m", files["state"], spec=TUTORIAL_SPEC)
        reg.push("m", tutorial_model(seed=1))
        reg.promote("m", 1, reason="first")
        return reg


def _json(result: Any) -> Any:
    return json.loads(result.stdout)


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# --- push ------------------------------------------------------------------------------------


def test_push_human_output(cli: Cli, files: dict[str, Path]) -> None:
    out = cli.ok("push", "tut", str(files["full"])).stdout
    assert out.startswith("tut:1  full (detected)") and f"sha256:{_sha(files['full'])}" in out
    out = cli.ok("push", "tut", str(files["script"]), "--format", "torchscript").stdout
    assert out.startswith("tut:2  torchscript  ") and "(detected)" not in out
    out = cli.ok("push", "tut", str(files["state"]), "--arch", str(files["spec"]), "--alias", "staging").stdout
    assert out.startswith("tut:3  state_dict (detected)") and out.rstrip().endswith("aliases: staging")


@pytest.mark.fast  # in-process CLI: part of `python -m pytest -m fast`
def test_push_json(cli: Cli, files: dict[str, Path]) -> None:
    data = _json(cli.ok("--json", "push", "tut", str(files["state"]), "--arch", str(files["spec"]),
                        "--description", "the tutorial MLP", "--tag", "lr=0.1", "--tag", "data=x=y",
                        "--alias", "production"))
    assert {"name", "version", "format", "sha256", "size", "aliases"} <= set(data)
    assert (data["name"], data["version"], data["format"]) == ("tut", 1, "state_dict")
    assert data["sha256"] == _sha(files["state"]) and data["size"] == files["state"].stat().st_size
    assert data["aliases"] == ["production"] and data["description"] == "the tutorial MLP"
    assert data["tags"] == {"lr": "0.1", "data": "x=y"} and data["spec"] == TUTORIAL_SPEC
    # --json is accepted after the command too
    assert _json(cli.ok("push", "tut", str(files["full"]), "--json"))["version"] == 2


# --- pull ------------------------------------------------------------------------------------


def test_pull(
    cli: Cli, populated: Registry, registry: Registry, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    v1, v2 = registry.get("m:1"), registry.get("m:2")
    assert cli.ok("pull", "m").stdout.strip() == str(tmp_path / "m-v2.pt")
    assert _sha(tmp_path / "m-v2.pt") == v2.sha256

    out = tmp_path / "out.pt"
    assert cli.ok("pull", "m", "--version", "1", "-o", str(out)).stdout.strip() == str(out)
    assert _sha(out) == v1.sha256
    result = cli.fails("pull", "m", "-o", str(out), match="already exists; use --force")
    assert _sha(out) == v1.sha256 and result.stdout == ""
    cli.ok("pull", "m:2", "-o", str(out), "--force")
    assert _sha(out) == v2.sha256

    data = _json(cli.ok("--json", "pull", "m", "--alias", "production", "-o", str(tmp_path / "p.pt")))
    assert (data["name"], data["version"], data["format"], data["sha256"]) == ("m", 1, "state_dict", v1.sha256)
    assert data["path"] == str(tmp_path / "p.pt")
    assert _sha(tmp_path / "p.pt") == v1.sha256
    assert cli.ok("pull", "m@production", "-o", str(tmp_path)).stdout.strip() == str(tmp_path / "m-v1.pt")


def test_pull_of_a_corrupt_blob_fails_and_writes_nothing(
    cli: Cli, populated: Registry, registry: Registry, home: Path, tmp_path: Path
) -> None:
    mv = registry.get("m:1")
    blob = blob_path(home, mv.sha256)
    flip_byte(blob)
    before = registry_snapshot(home)
    dest = tmp_path / "dest"
    dest.mkdir()
    cli.fails("pull", "m:1", "-o", str(dest / "x.pt"),
              match=f"expected sha256 {mv.sha256}, got {_sha(blob)}; run 'registry verify m'")
    assert list(dest.iterdir()) == []
    assert registry_snapshot(home) == before


# --- list, show ------------------------------------------------------------------------------


def test_list(cli: Cli, populated: Registry, registry: Registry) -> None:
    registry.push("other", tutorial_model(seed=5))
    lines = cli.ok("list").stdout.splitlines()
    assert lines[0].split() == ["MODEL", "LATEST", "VERSIONS", "ALIASES"]
    assert lines[1].split() == ["m", "2", "2", "production→1"] and lines[2].split() == ["other", "1", "1"]
    data = _json(cli.ok("list", "--json"))
    assert [(d["name"], d["latest_version"], d["aliases"]) for d in data] == [
        ("m", 2, {"production": 1}), ("other", 1, {})]

    lines = cli.ok("list", "m").stdout.splitlines()
    assert lines[0].split()[:2] == ["VERSION", "FORMAT"]
    assert [line.split()[0] for line in lines[1:]] == ["m:2", "m:1"]
    assert lines[2].rstrip().endswith("production")
    assert [d["version"] for d in _json(cli.ok("--json", "list", "m", "--limit", "1"))] == [2]
    assert [d["version"] for d in _json(cli.ok("--json", "list", "m", "--before", "2"))] == [1]


@pytest.mark.fast  # in-process CLI: part of `python -m pytest -m fast`
def test_list_of_an_empty_registry(cli: Cli) -> None:
    assert cli.ok("list").stdout.split() == ["MODEL", "LATEST", "VERSIONS", "ALIASES"]
    assert _json(cli.ok("--json", "list")) == []


def test_show_state_dict(cli: Cli, populated: Registry, registry: Registry, files: dict[str, Path]) -> None:
    mv = registry.push("m", files["state"], spec=TUTORIAL_SPEC, description="third", tags={"lr": "0.1"},
                       alias="staging")
    out = cli.ok("show", "m:3").stdout
    for expected in ("version:        m:3", "format:         state_dict", f"sha256:         {mv.sha256}",
                     f"size:           {mv.size} ", "aliases:        staging", "by tester",
                     f"torch:          {mv.torch_version}", f"python:         {mv.python_version}",
                     "description:    third", "tag lr:         0.1", "spec:", '"target": "torch.nn.Sequential"'):
        assert expected in out, (expected, out)
    data = _json(cli.ok("show", "m", "--version", "3", "--json"))
    assert data == json.loads(json.dumps(mv.to_json()))
    assert data["spec"] == TUTORIAL_SPEC and data["created_by"] == "tester"
    assert _json(cli.ok("--json", "show", "m@production"))["version"] == 1
    assert _json(cli.ok("--json", "show", "m", "--alias", "staging"))["version"] == 3


def test_show_full_lists_the_pickle_globals(cli: Cli, files: dict[str, Path]) -> None:
    cli.ok("push", "whole", str(files["full"]))
    out = cli.ok("show", "whole").stdout
    line = next(line for line in out.splitlines() if line.startswith("pickle globals:"))
    assert "torch.nn.modules.container.Sequential" in line and "torch.nn.modules.linear.Linear" in line
    assert "spec:" not in out
    data = _json(cli.ok("--json", "show", "whole"))
    assert "torch.nn.modules.activation.ReLU" in data["pickle_globals"] and data["spec"] is None


# --- promote, demote, history ----------------------------------------------------------------


@pytest.mark.fast  # in-process CLI: part of `python -m pytest -m fast`
def test_promote_demote_history(cli: Cli, populated: Registry) -> None:
    assert cli.ok("promote", "m", "--version", "2", "--reason", "better").stdout.strip() == \
        "m@production -> m:2 (was 1)"
    assert cli.ok("promote", "m", "--version", "1", "--to", "staging", "--expect", "none").stdout.strip() == \
        "m@staging -> m:1"
    data = _json(cli.ok("--json", "promote", "m", "--version", "2", "--to", "staging", "--expect", "1"))
    assert (data["alias"], data["version"], data["previous"], data["action"]) == ("staging", 2, 1, "promote")
    assert cli.ok("demote", "m", "staging", "--reason", "done").stdout.strip() == "m@staging removed (was m:2)"

    lines = cli.ok("history", "m").stdout.splitlines()
    assert lines[0].split() == ["TIME", "ACTION", "ALIAS", "VERSION", "PREVIOUS", "USER", "REASON"]
    assert [line.split()[1:] for line in lines[1:]] == [
        ["promote", "production", "1", "-", "tester", "first"],
        ["promote", "production", "2", "1", "tester", "better"],
        ["promote", "staging", "1", "-", "tester", "-"],
        ["promote", "staging", "2", "1", "tester", "-"],
        ["demote", "staging", "-", "2", "tester", "done"],
    ]
    events = _json(cli.ok("--json", "history", "m"))
    assert [(e["action"], e["alias"], e["version"], e["previous"]) for e in events][-1] == (
        "demote", "staging", None, 2)


@pytest.mark.parametrize("expect", ["2", "none"])
def test_promote_expect_mismatch(cli: Cli, populated: Registry, home: Path, expect: str) -> None:
    before = registry_snapshot(home)
    cli.fails("promote", "m", "--version", "2", "--expect", expect,
              match="alias 'm@production' points at version 1, not")
    assert registry_snapshot(home) == before


# --- delete, verify, gc, db ------------------------------------------------------------------


def test_delete(cli: Cli, populated: Registry, registry: Registry, home: Path) -> None:
    v1 = registry.get("m:1")
    cli.fails("delete", "m:1", match="'m:1' is the target of alias production; demote it first or use --force")
    assert cli.ok("delete", "m", "--version", "2").stdout.strip() == "deleted m:2"
    data = _json(cli.ok("--json", "delete", "m:1", "--force"))
    assert (data["version"], data["aliases"]) == (1, ["production"])
    assert not blob_path(home, v1.sha256).exists()
    assert cli.ok("history", "m").stdout.splitlines()[-1].split()[1:5] == ["demote", "production", "-", "1"]
    assert _json(cli.ok("--json", "list", "m")) == []


def test_verify(cli: Cli, populated: Registry, registry: Registry, home: Path) -> None:
    assert cli.ok("verify").stdout.strip() == "all artifacts verified"
    v1, v2 = registry.get("m:1"), registry.get("m:2")
    flip_byte(blob_path(home, v1.sha256))
    blob_path(home, v2.sha256).unlink()
    result = cli.run("verify")
    assert result.exit_code == 1
    lines = sorted(result.stdout.splitlines())
    assert len(lines) == 2
    assert lines[0].startswith("m:1 corrupt: ") and v1.sha256 in lines[0]
    assert lines[1].startswith("m:2 missing: ") and v2.sha256 in lines[1]
    result = cli.run("--json", "verify", "m")
    assert result.exit_code == 1
    problems = sorted(_json(result), key=lambda p: p["version"])
    assert [(p["name"], p["version"], p["kind"], p["sha256"]) for p in problems] == [
        ("m", 1, "corrupt", v1.sha256), ("m", 2, "missing", v2.sha256)]


def test_gc(cli: Cli, populated: Registry, home: Path, tmp_path: Path) -> None:
    orphan = tmp_path / "orphan.bin"
    orphan.write_bytes(b"nobody uses me")
    sha = populated.store.put_file(orphan).sha256
    assert cli.ok("gc", "--grace", "1h").stdout.strip() == "nothing to remove (grace 1h)"
    assert cli.ok("gc", "--grace", "90m").stdout.strip() == "nothing to remove (grace 90m)"
    assert cli.ok("gc").stdout.strip() == "nothing to remove (grace 1h)"
    out = cli.ok("gc", "--dry-run", "--grace", "0").stdout
    assert f"would remove blob {sha}" in out and blob_path(home, sha).exists()
    data = _json(cli.ok("--json", "gc", "--grace", "0"))
    assert [(g["kind"], g["key"]) for g in data] == [("blob", sha)]
    assert not blob_path(home, sha).exists()
    assert cli.ok("verify").stdout.strip() == "all artifacts verified"


@pytest.mark.fast  # in-process CLI: part of `python -m pytest -m fast`
def test_db_commands(cli: Cli, home: Path) -> None:
    assert cli.ok("db", "current").stdout.strip() == f"none (head is {HEAD})"
    assert cli.ok("db", "upgrade").stdout.strip() == f"schema at {HEAD}"
    assert cli.ok("db", "current").stdout.strip() == f"{HEAD} (head)"
    assert _json(cli.ok("--json", "db", "current")) == {"revision": HEAD, "head": HEAD}
    assert cli.ok("db", "downgrade", "0001").stdout.strip() == "schema at 0001"
    assert cli.ok("db", "current").stdout.strip() == f"0001 (head is {HEAD})" or HEAD == "0001"
    assert cli.ok("db", "downgrade", "base").stdout.strip() == "schema at base"
    assert _json(cli.ok("db", "current", "--json"))["revision"] is None
    assert _json(cli.ok("--json", "db", "upgrade", "head")) == {"revision": HEAD}
    cli.fails("db", "upgrade", "9999", match="cannot migrate to revision '9999'")


def test_global_db_and_storage_options(cli: Cli, files: dict[str, Path], tmp_path: Path, home: Path) -> None:
    db, storage = tmp_path / "x" / "r.db", tmp_path / "blobs"
    cli.ok("--db", f"sqlite:///{db}", "--storage", str(storage), "push", "m", str(files["full"]))
    assert db.exists() and any(storage.rglob("*")) and not home.exists()
    assert cli.ok("--db", f"sqlite:///{db}", "list").stdout.splitlines()[1].split()[0] == "m"


# --- bad input -------------------------------------------------------------------------------

BAD_INPUT: list[tuple[tuple[str, ...], str]] = [
    (("push", "../x", "{state}", "--arch", "{spec}"), "invalid model name '../x'"),
    (("push", "", "{state}", "--arch", "{spec}"), "invalid model name '': must not be empty"),
    (("push", "a b", "{full}"), "invalid model name 'a b'"),
    (("push", "a/b", "{full}"), "invalid model name 'a/b'"),
    (("push", "a\x01b", "{full}"), "invalid model name"),
    (("push", "a" * 129, "{full}"), "longer than 128 characters"),
    (("push", "m", "{full}", "--alias", "../prod"), "invalid alias '../prod'"),
    (("push", "m", "{tmp}/missing.pt"), "does not exist"),
    (("push", "m", "{text}"), "is not a PyTorch model file"),
    (("push", "m", "{state}"), "--arch SPEC.json"),
    (("push", "m", "{state}", "--arch", "{badjson}"), "is not valid JSON"),
    (("push", "m", "{state}", "--arch", "{tmp}/nope.json"), "spec file"),
    (("push", "m", "{script}", "--format", "state_dict"), "declared state_dict but its bytes are torchscript"),
    (("push", "m", "{full}", "--format", "state_dict"), "declared state_dict but its bytes are full"),
    (("show", "nope"), "model 'nope' not found"),
    (("show", "m:9"), "version 'm:9' not found"),
    (("show", "m@staging"), "alias 'm@staging' not found"),
    (("show", "m:zero"), "invalid reference 'm:zero'"),
    (("show", "m:1", "--version", "1"), "names its version more than once"),
    (("pull", "nope"), "model 'nope' not found"),
    (("pull", "m", "--alias", "staging", "-o", "{tmp}/x.pt"), "alias 'm@staging' not found"),
    (("pull", "m", "-o", "{state}"), "already exists; use --force"),
    (("pull", "m", "-o", "{tmp}/no/such/dir/x.pt"), "no/such/dir"),
    (("list", "nope"), "model 'nope' not found"),
    (("list", "../x"), "invalid model name"),
    (("promote", "m", "--version", "9"), "version 'm:9' not found"),
    (("promote", "nope", "--version", "1"), "model 'nope' not found"),
    (("promote", "m", "--version", "2", "--expect", "2"), "points at version 1, not version 2"),
    (("promote", "m", "--version", "2", "--to", "a b"), "invalid alias 'a b'"),
    (("demote", "m", "staging"), "alias 'm@staging' not found"),
    (("history", "nope"), "model 'nope' not found"),
    (("delete", "m:1"), "is the target of alias production"),
    (("delete", "m:9"), "version 'm:9' not found"),
    (("delete", "nope"), "model 'nope' not found"),
    (("verify", "nope"), "model 'nope' not found"),
    (("--db", "not a url", "list"), "invalid database URL"),
    (("--db", "sqlite:///{text}", "list"), "file is not a database"),
    (("--db", "sqlite:////dev/null/registry.db", "list"), "/dev/null"),
    (("db", "downgrade", "nonsense"), "cannot migrate to revision 'nonsense'"),
]


@pytest.mark.parametrize(("args", "match"), BAD_INPUT, ids=[" ".join(a)[:40] for a, _ in BAD_INPUT])
def test_bad_input_is_one_error_line_and_changes_nothing(
    cli: Cli, populated: Registry, files: dict[str, Path], home: Path, tmp_path: Path,
    args: tuple[str, ...], match: str,
) -> None:
    names = {k: str(v) for k, v in files.items()} | {"tmp": str(tmp_path)}
    argv = [a.format(**names) for a in args]
    before = registry_snapshot(home)
    outside = sorted(p for p in tmp_path.rglob("*") if home not in p.parents and p != home)
    cli.fails(*argv, match=match)
    assert registry_snapshot(home) == before
    assert sorted(p for p in tmp_path.rglob("*") if home not in p.parents and p != home) == outside


USAGE_ERRORS: list[tuple[str, ...]] = [
    ("push", "m", "{full}", "--tag", "novalue"),
    ("push", "m", "{full}", "--tag", "=v"),
    ("push", "m", "{full}", "--format", "onnx"),
    ("push", "m"),
    ("promote", "m"),
    ("promote", "m", "--version", "0"),
    ("promote", "m", "--version", "2", "--expect", "two"),
    ("promote", "m", "--version", "2", "--expect", "0"),
    ("list", "m", "--limit", "0"),
    ("pull", "m", "--version", "x"),
    ("gc", "--grace", "soon"),
    ("gc", "--grace", "-1h"),
    ("frobnicate",),
]


@pytest.mark.parametrize("args", USAGE_ERRORS, ids=[" ".join(a) for a in USAGE_ERRORS])
def test_usage_errors_exit_2_and_change_nothing(
    cli: Cli, populated: Registry, files: dict[str, Path], home: Path, args: tuple[str, ...]
) -> None:
    argv = [a.format(**{k: str(v) for k, v in files.items()}) for a in args]
    before = registry_snapshot(home)
    result = cli.run(*argv)
    assert result.exit_code == 2, result.output
    assert result.stdout == "" and "Error:" in result.stderr
    assert registry_snapshot(home) == before


# --- help and side effects -------------------------------------------------------------------


def _commands(group: click.Group, prefix: tuple[str, ...] = ()) -> list[tuple[tuple[str, ...], click.Command]]:
    found: list[tuple[tuple[str, ...], click.Command]] = []
    for name, command in sorted(group.commands.items()):
        found.append(((*prefix, name), command))
        if isinstance(command, click.Group):
            found += _commands(command, (*prefix, name))
    return found


@pytest.mark.fast  # in-process CLI: part of `python -m pytest -m fast`
def test_commands_help(cli: Cli, home: Path) -> None:
    commands = _commands(cli.cli)
    assert {"push", "pull", "list", "show", "promote", "demote", "history", "delete", "verify", "gc",
            "db", "db upgrade", "db current", "db downgrade"} <= {" ".join(p) for p, _ in commands}
    for path, command in [((), cli.cli), *commands]:
        assert command.help and command.help.strip(), f"{' '.join(path)} has no help"
        for param in command.params:
            if isinstance(param, click.Option):
                assert param.help and param.help.strip(), f"{' '.join(path)} {param.opts} has no help"
        result = cli.ok(*path, "--help")
        assert "Usage:" in result.stdout
    assert not home.exists()


@pytest.mark.fast  # in-process CLI: part of `python -m pytest -m fast`
@pytest.mark.parametrize("args", [("--help",), ("push", "--help"), ("--version",), ("push",), ("nope",),
                                  ("list", "--limit", "-1"), ("db",), ()])
def test_help_and_usage_errors_do_not_create_the_database(cli: Cli, home: Path, args: tuple[str, ...]) -> None:
    result = cli.run(*args)
    assert result.exit_code in (0, 2)
    assert not home.exists() or list(home.iterdir()) == []


@pytest.mark.fast  # in-process CLI: part of `python -m pytest -m fast`
@pytest.mark.parametrize("value", ["nan", "-1", "inf", "x"])
def test_tolerances_must_be_finite_and_not_negative(cli: Cli, value: str) -> None:
    result = cli.run("check", "m", "--rtol", value)
    assert result.exit_code == 2 and "--rtol" in result.stderr
