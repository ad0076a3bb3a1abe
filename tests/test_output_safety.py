"""Output safety: every error is one escaped line, no URL shows a secret, stored text cannot drive the terminal."""

from __future__ import annotations

import json
import re
import sqlite3
import struct
import textwrap
import uuid
from pathlib import Path
from typing import Any

import pytest
import torch

from registry import ConfigError, InvalidText, Registry
from registry.config import Settings, redact
from registry.errors import one_line, printable
from tests.conftest import Cli
from tests.helpers import TUTORIAL_SPEC, registry_snapshot, run_python, run_registry, tutorial_model

#: Anything a terminal acts on, or that splits a line (str.splitlines() breaks at all of these).
RAW = re.compile("[\x00-\x09\x0b-\x1f\x7f-\x9f\u2028\u2029\u202a-\u202e\u2066-\u2069\ud800-\udfff]")
LINE_BREAKS = "\n\r\x0b\x0c\x1c\x1d\x1e\x85\u2028\u2029"
OSC52 = "\x1b]52;c;cm0gLXJmIH4=\x07"  # "copy `rm -rf ~` to the clipboard": passes through a pipe
DEEP = "[" * 100_000 + "]" * 100_000
UNREACHABLE_PG = "postgresql+psycopg://bob@127.0.0.1:1/reg?password=Sup3rS3cret&sslpassword=Pa55phrase"


def assert_one_error(stdout: str, stderr: str, code: int, match: str = "") -> None:
    """Exactly one ``error:`` line on stderr, nothing on stdout, no traceback, nothing raw for the terminal."""
    assert code == 1, f"exit {code}\nstdout: {stdout}\nstderr: {stderr}"
    assert stdout == "", stdout
    lines = stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), stderr
    assert "Traceback" not in stderr
    assert not RAW.search(stdout + stderr), ascii(stdout + stderr)
    assert match in stderr, stderr


def fails(cli: Cli, *args: str, match: str = "") -> str:
    result = cli.run(*args)
    assert_one_error(result.stdout, result.stderr, result.exit_code, match)
    return result.stderr


@pytest.fixture
def weights(tmp_path: Path) -> Path:
    path = tmp_path / "state.pt"
    torch.save(tutorial_model().state_dict(), path)
    (tmp_path / "spec.json").write_text(json.dumps(TUTORIAL_SPEC))
    return path


@pytest.fixture
def pushed(home: Path, weights: Path) -> Path:
    """``m`` with versions 1 (production) and 2; returns the SQLite database file."""
    with Registry() as reg:
        reg.push("m", weights, spec=TUTORIAL_SPEC)
        reg.push("m", tutorial_model(seed=1))
        reg.promote("m", 1, reason="first")
    return home / "registry.db"


def plant(db: Path, sql: str, *params: Any) -> None:
    conn = sqlite3.connect(db)
    try:
        conn.execute(sql, params)
        conn.commit()
    finally:
        conn.close()


# -- printable() and one_line() ----------------------------------------------------------------


@pytest.mark.fast
def test_printable_leaves_one_line_with_nothing_raw() -> None:
    nasty = "".join(chr(c) for c in [*range(0x20), *range(0x7F, 0xA0)]) + "\u2028\u2029\u202e\u2066\udcff"
    shown = printable(f"a{nasty}b")
    assert not RAW.search(shown) and len(shown.splitlines()) == 1
    assert printable("a\nb\tc\x1b[31m\u2028é\\x") == "a\\nb\\tc\\x1b[31m\\u2028é\\x"  # backslash kept as is
    assert printable("plain text, ünïcödé, 模型") == "plain text, ünïcödé, 模型"


@pytest.mark.fast
@pytest.mark.parametrize("sep", list(LINE_BREAKS))
def test_one_line_keeps_the_first_line_and_escapes_the_rest(sep: str) -> None:
    text = one_line(ValueError(f"first{OSC52} part{sep}second"))
    assert text == "first\\x1b]52;c;cm0gLXJmIH4=\\x07 part" and not RAW.search(text)


# -- redact(): userinfo and secret query parameters ---------------------------------------------


@pytest.mark.fast
@pytest.mark.parametrize(("url", "shown"), [
    ("postgresql://bob:s3cret@db:5432/reg", "postgresql://bob:***@db:5432/reg"),
    ("postgresql+psycopg://u@h/db?password=S3CRET", "postgresql+psycopg://u:***@h/db?password=***"),
    ("postgresql://h/db?sslpassword=S3CRET&sslmode=require", "postgresql://h/db?sslpassword=***&sslmode=require"),
    ("postgresql://h/db?Api_Token=S3CRET&sslkey=/k/S3CRET&client_secret=S3CRET",
     "postgresql://h/db?Api_Token=***&sslkey=***&client_secret=***"),
    ("postgresql://h/db?pass%77ord=S3CRET", "postgresql://h/db?pass%77ord=***"),  # SQLAlchemy unquotes keys
    ("postgresql://h/db?password=S3#CRET", "postgresql://h/db?password=***"),  # '#' is in SQLAlchemy's value
    ("postgresql://u:S3/CR?ET@h/db", "postgresql://u:***@h/db"),  # SQLAlchemy: a password may hold '/'
    ("postgresql://u@x:S3CRET@h/db", "postgresql://u@x:***@h/db"),
    ("postgresql://u:S3CRET@[::1/db", "postgresql://u:***@[::1/db"),  # urlsplit refuses it
    ("s3://AKIA:S3CRET@bucket/prefix?token=S3CRET", "s3://AKIA:***@bucket/prefix?token=***"),
    ("s3://bucket/prefix", "s3://bucket/prefix"),
    ("sqlite:////tmp/a@b/registry.db", "sqlite:////tmp/a@b/registry.db"),
    ("postgresql://h/db?options=-csearch_path%3Dx&application_name=a@b",
     "postgresql://h/db?options=-csearch_path%3Dx&application_name=a@b"),
])
def test_redact(url: str, shown: str) -> None:
    assert redact(url) == shown
    assert "S3CRET" not in redact(url) and "S3/CR" not in redact(url)


@pytest.mark.fast
def test_settings_repr_shows_no_secret() -> None:
    s = Settings.resolve(db="postgresql://u:pw1@h/db?password=pw2", storage="s3://k:pw3@b/p?token=pw4",
                         storage_options={"secret": "pw5"}, environ={})
    assert not any(f"pw{i}" in repr(s) for i in range(1, 6)), repr(s)
    assert "db_url='postgresql://u:***@h/db?password=***'" in repr(s) and s.db_url.endswith("password=pw2")


@pytest.mark.fast
@pytest.mark.parametrize("args", [("list",), ("db", "current"), ("db", "upgrade")])
def test_password_in_url_query_never_printed(cli: Cli, args: tuple[str, ...]) -> None:
    err = fails(cli, "--db", UNREACHABLE_PG, *args, match="database postgresql+psycopg://bob:***@127.0.0.1:1/reg")
    assert "Sup3rS3cret" not in err and "Pa55phrase" not in err and "password=***&sslpassword=***" in err


def test_password_in_url_query_never_printed_by_the_console_script(tmp_path: Path) -> None:
    proc = run_registry("--db", UNREACHABLE_PG, "list", cwd=tmp_path)
    assert_one_error(proc.stdout, proc.stderr, proc.returncode, "password=***")
    assert "Sup3rS3cret" not in proc.stderr and "Pa55phrase" not in proc.stderr


# -- text fields: printable UTF-8 or refused at input -------------------------------------------


@pytest.mark.fast
@pytest.mark.parametrize("bad", [OSC52, "\x1b[2J", "a\rb", "a\x85b", "a\u2028b", "a\u202eb", "a\x7fb", "a\udcffb"])
def test_text_fields_refuse_controls_and_undecodable_bytes(registry: Registry, home: Path, weights: Path,
                                                           bad: str) -> None:
    registry.push("m", weights, spec=TUTORIAL_SPEC)
    before = registry_snapshot(home)
    with pytest.raises(InvalidText, match="invalid description"):
        registry.push("m", weights, spec=TUTORIAL_SPEC, description=bad)
    with pytest.raises(InvalidText, match="invalid tag key"):
        registry.push("m", weights, spec=TUTORIAL_SPEC, tags={bad: "v"})
    with pytest.raises(InvalidText, match="invalid value of tag 'k'"):
        registry.push("m", weights, spec=TUTORIAL_SPEC, tags={"k": bad})
    with pytest.raises(InvalidText, match="invalid reason"):
        registry.promote("m", 1, reason=bad)
    assert registry_snapshot(home) == before
    registry.promote("m", 1)
    with pytest.raises(InvalidText, match="invalid reason"):
        registry.demote("m", "production", reason=bad)
    with pytest.raises(ConfigError, match="invalid user"):
        Settings.resolve(user=bad, environ={})
    with pytest.raises(ConfigError, match="invalid REGISTRY_USER"):
        Settings.resolve(environ={"REGISTRY_USER": bad})
    with pytest.raises(ConfigError, match=r"invalid login name \(set REGISTRY_USER instead\)"):
        Settings.resolve(environ={"USER": bad})
    assert registry.history("m")[-1].action == "promote"  # the refused demotion changed nothing


@pytest.mark.fast
def test_text_field_rules(registry: Registry, weights: Path) -> None:
    mv = registry.push("m", weights, spec=TUTORIAL_SPEC, description="two\tcolumns\nsecond line, ünïcödé",
                       tags={"owner": "ana ü", "k": ""})
    assert mv.description == "two\tcolumns\nsecond line, ünïcödé" and mv.tags == {"owner": "ana ü", "k": ""}
    for bad_tags in ({"": "v"}, {"k" * 129: "v"}, {"k": "a\tb"}, {"k": 1}):
        with pytest.raises(InvalidText):
            registry.push("m", weights, spec=TUTORIAL_SPEC, tags=bad_tags)  # type: ignore[arg-type]
    with pytest.raises(InvalidText, match="invalid reason 'a\\\\tb'"):
        registry.promote("m", 1, reason="a\tb")  # one line, no tabs: it is a table cell in `history`
    with pytest.raises(InvalidText, match="longer than 256"):
        Settings.resolve(user="u" * 257, environ={})
    assert Settings.resolve(user="Ana Müller", environ={}).user == "Ana Müller"


@pytest.mark.fast
def test_cli_refuses_terminal_escapes_in_description_tags_and_reason(cli: Cli, pushed: Path, weights: Path,
                                                                     home: Path) -> None:
    before = registry_snapshot(home)
    spec = str(weights.parent / "spec.json")
    fails(cli, "push", "m", str(weights), "--arch", spec, "--description", f"ok{OSC52}", match="invalid description")
    fails(cli, "push", "m", str(weights), "--arch", spec, "--tag", f"k=v{OSC52}", match="invalid value of tag 'k'")
    fails(cli, "push", "m", str(weights), "--arch", spec, "--tag", "k\u2028=v", match="invalid tag key")
    fails(cli, "promote", "m", "--version", "2", "--reason", "\x1b[1A\x1b[2K", match="invalid reason")
    fails(cli, "demote", "m", "production", "--reason", "x\u2029y", match="invalid reason")
    assert registry_snapshot(home) == before


def test_undecodable_bytes_in_description_and_user_are_refused_by_the_console_script(
        pushed: Path, weights: Path, home: Path) -> None:
    before = registry_snapshot(home)
    bad = "caf\udce9"  # the Latin-1 byte 0xE9 as the OS hands it over: a lone surrogate
    proc = run_registry("push", "m", str(weights), "--arch", str(weights.parent / "spec.json"), "--description", bad)
    assert_one_error(proc.stdout, proc.stderr, proc.returncode, "invalid description 'caf\\udce9': is not valid UTF-8")
    proc = run_registry("promote", "m", "--version", "2", env={"REGISTRY_USER": bad})
    assert_one_error(proc.stdout, proc.stderr, proc.returncode, "invalid REGISTRY_USER")
    assert registry_snapshot(home) == before


# -- what the database holds reaches the terminal escaped ----------------------------------------


@pytest.mark.fast
def test_show_list_history_escape_stored_text(cli: Cli, pushed: Path) -> None:
    # Rows written by an older registry, or by hand: "history can be made to show rows that never happened".
    fake = "\r\x1b[2K2030-01-01T00:00:00+00:00  promote  production  9  -  root  approved\u2028"
    plant(pushed, "UPDATE versions SET description = ?, tags = ?, created_by = ? WHERE version = 1",
          f"desc{OSC52}\nsecond", json.dumps({f"k{OSC52}": "v\x9b31m\u2029"}), "eve\x1b]0;title\x07")
    plant(pushed, "UPDATE alias_events SET user = ?, reason = ?", "mallory\u202e", fake)
    outputs = {args: cli.ok(*args).stdout for args in [("show", "m:1"), ("list", "m"), ("list",), ("history", "m")]}
    for args, out in outputs.items():
        assert not RAW.search(out), (args, ascii(out))
    assert "desc\\x1b]52;c;cm0gLXJmIH4=\\x07\\nsecond" in outputs[("show", "m:1")]
    assert "by eve\\x1b]0;title\\x07" in outputs[("show", "m:1")]
    history = outputs[("history", "m")].splitlines()
    assert len(history) == 2 and "\\r\\x1b[2K2030-01-01" in history[1] and "mallory\\u202e" in history[1]
    # JSON keeps the exact text, as \u escapes (ensure_ascii: U+2028 and friends too).
    for args in [("show", "m:1"), ("history", "m")]:
        out = cli.ok("--json", *args).stdout
        assert not RAW.search(out) and out.isascii()
    data = json.loads(cli.ok("--json", "show", "m:1").stdout)
    assert data["description"] == f"desc{OSC52}\nsecond" and data["tags"] == {f"k{OSC52}": "v\x9b31m\u2029"}
    assert json.loads(cli.ok("--json", "history", "m").stdout)[0]["reason"] == fake


@pytest.mark.fast
def test_planted_non_hex_sha256_gives_one_line(cli: Cli, pushed: Path, tmp_path: Path) -> None:
    plant(pushed, "UPDATE versions SET sha256 = ? WHERE version = 1", "../../../../etc/passwd\x1b]0;x\x07")
    before = registry_snapshot(pushed.parent)
    assert not RAW.search(cli.ok("show", "m:1").stdout)
    assert not RAW.search(cli.ok("list", "m").stdout)
    for args in [("load", "m:1"), ("pull", "m:1", "-o", str(tmp_path / "out.pt")), ("diff", "m:1", "m:2")]:
        fails(cli, *args, match="recorded sha256 '../../../../etc/passwd\\x1b]0;x\\x07' is not 64 lowercase hex")
    result = cli.run("verify")
    assert result.exit_code == 1 and result.stdout.startswith("m:1 corrupt: recorded sha256")
    assert len(result.stdout.splitlines()) == 1 and not RAW.search(result.stdout)
    assert not (tmp_path / "out.pt").exists() and registry_snapshot(pushed.parent) == before
    cli.ok("delete", "m:1", "--force")  # the damaged version can still be removed


# -- nesting bombs ----------------------------------------------------------------------------------


@pytest.mark.fast
def test_deeply_nested_arch_file(cli: Cli, weights: Path, home: Path) -> None:
    (weights.parent / "deep.json").write_text(DEEP)
    fails(cli, "push", "m", str(weights), "--arch", str(weights.parent / "deep.json"), match="nests too deeply")
    assert registry_snapshot(home) == {"rows": None, "files": {}}


@pytest.mark.fast
@pytest.mark.parametrize("options", [DEEP, "[" * 100_000, '{"a":' * 50 + "1" + "}" * 50])
def test_deeply_nested_storage_options(cli: Cli, home: Path, monkeypatch: pytest.MonkeyPatch, options: str) -> None:
    monkeypatch.setenv("REGISTRY_STORAGE_OPTIONS", options)
    fails(cli, "list", match="REGISTRY_STORAGE_OPTIONS nests deeper than 32 levels")
    assert registry_snapshot(home) == {"rows": None, "files": {}}


@pytest.mark.fast
@pytest.mark.parametrize("header", [b'{"a":' * 50_000 + b"1" + b"}" * 50_000, b"{" + b"[" * 100_000])
def test_deeply_nested_safetensors_header(cli: Cli, tmp_path: Path, home: Path, header: bytes) -> None:
    path = tmp_path / "deep.safetensors"
    path.write_bytes(struct.pack("<Q", len(header)) + header)
    fails(cli, "push", "m", str(path), match="is not a PyTorch model file")
    fails(cli, "push", "m", str(path), "--format", "safetensors", "--arch", str(tmp_path / "none.json"),
          match="does not exist")
    assert registry_snapshot(home) == {"rows": None, "files": {}}


# -- file names and foreign messages -----------------------------------------------------------


@pytest.mark.fast
@pytest.mark.parametrize("sep", [*LINE_BREAKS, OSC52, "\x1b[2J"])
def test_file_name_with_line_break_or_escape_in_an_error(cli: Cli, tmp_path: Path, home: Path, sep: str) -> None:
    path = tmp_path / f"weights{sep}v2.pt"
    torch.save(tutorial_model().state_dict(), tmp_path / "weights.pt")  # torch names zip members after the file
    (tmp_path / "weights.pt").rename(path)
    err = fails(cli, "push", "m", str(path), match="needs an architecture spec")
    assert err.startswith(f"error: {printable(path.name)} is a state_dict")  # the raw name, unquoted, escaped
    assert registry_snapshot(home) == {"rows": None, "files": {}}


DATA_DEPENDENT = """
import torch


class DataDependent(torch.nn.Module):
    def forward(self, x):
        if x.sum() > 0:  # control flow on a value: torch.export cannot trace it
            return x * 2
        return x
"""


def test_failed_export_prints_only_the_error_line(tmp_path: Path, home: Path) -> None:
    mod = f"dd_{uuid.uuid4().hex[:8]}"
    (tmp_path / f"{mod}.py").write_text(DATA_DEPENDENT)
    env = {"PYTHONPATH": str(tmp_path), "REGISTRY_TRUSTED_MODULES": mod}
    push = textwrap.dedent(f"""
        import torch
        from registry import Registry
        from {mod} import DataDependent
        with Registry() as reg:
            reg.push("dd", DataDependent(), format="full", example_inputs=torch.ones(3))
    """)
    proc = run_python(push, env)
    assert proc.returncode == 0, proc.stderr
    before = registry_snapshot(home)
    proc = run_registry("convert", "dd", "--to", "export", env=env)
    assert_one_error(proc.stdout, proc.stderr, proc.returncode,
                     "cannot save the model as export: Could not guard on data-dependent")
    assert registry_snapshot(home) == before
