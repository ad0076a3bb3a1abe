"""Programs are code: a TorchScript version runs nothing but tensor operators unless its author is trusted.

End to end through the installed ``registry`` command, in fresh processes: a TorchScript archive whose
``__setstate__`` writes a file (run by ``torch.jit.load`` itself) is accepted at push, recorded as not
data-only, shown as such, and refused by ``load``, ``check``, ``diff`` and ``push --example`` until
``--trust-code`` is given; the marker file it would write appears only then.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path

import pytest
import torch

from registry import Registry, UntrustedCode
from tests.helpers import run_registry, setstate_archive, tutorial_model

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

@pytest.fixture
def setstate(tmp_path: Path) -> tuple[Path, Path]:
    """A TorchScript archive whose loading writes its marker file (see tests.helpers.setstate_archive)."""
    return setstate_archive(tmp_path)


def test_a_program_with_setstate_loads_only_with_trust_code(
    setstate: tuple[Path, Path], tmp_path: Path
) -> None:
    path, marker = setstate
    example = tmp_path / "x.pt"
    torch.save(torch.zeros(1), example)
    refused = run_registry("push", "evil", str(path), "--example", str(example))
    assert refused.returncode == 1 and "--trust-code" in refused.stderr, refused.stderr
    assert not marker.exists()

    pushed = run_registry("--json", "push", "evil", str(path))
    assert pushed.returncode == 0, pushed.stderr
    record = json.loads(pushed.stdout)
    assert record["format"] == "torchscript"
    assert any("__setstate__" in p for p in record["code_problems"])
    assert "aten::from_file" in record["operators"]
    shown = run_registry("show", "evil")
    assert "runs code (loading needs --trust-code)" in shown.stdout and "aten::from_file" in shown.stdout

    for args in (["load", "evil"], ["diff", "evil", "evil"]):
        proc = run_registry(*args)
        lines = proc.stderr.strip().splitlines()
        assert proc.returncode == 1 and len(lines) == 1, proc.stderr
        assert lines[0].startswith("error: evil:1 is a program that is not data-only") and "--trust-code" in lines[0]
        assert not marker.exists()

    # Control: the same version does run its author's code once the caller says it trusts them.
    trusted = run_registry("load", "evil", "--trust-code")
    assert trusted.returncode == 0, trusted.stderr
    assert marker.read_bytes() == b"BB"


def test_an_ordinary_scripted_model_is_data_only_and_loads_without_a_flag(registry: Registry) -> None:
    model = tutorial_model().eval()
    mv = registry.push("mlp", torch.jit.script(model))
    assert mv.format.value == "torchscript"
    assert mv.code_problems == ()
    assert "aten::linear" in mv.operators and "aten::relu" in mv.operators
    x = torch.randn(4, 128)
    with torch.no_grad():
        assert torch.equal(registry.load("mlp")(x), model(x))


def test_a_planted_program_is_vetted_again_at_load(
    registry: Registry, setstate: tuple[Path, Path]
) -> None:
    """A row written without push's checks (an older writer, a compromised database) gains nothing."""
    path, marker = setstate
    blob = registry.store.put_file(path)
    with registry._session(write=True) as s:
        from registry import queries
        from registry.models import Version

        now = datetime.now(UTC)
        model_id, number = queries.next_version(s, "planted", now)
        s.add(Version(model_id=model_id, version=number, format="torchscript", sha256=blob.sha256,
                      size=blob.size, spec=None, pickle_globals=[], tags={}, created_by="x", created_at=now,
                      program={"operators": [], "problems": []}))  # claims data-only
    with pytest.raises(UntrustedCode, match="__setstate__"):
        registry.load("planted")
    assert not marker.exists()
