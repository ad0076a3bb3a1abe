"""registry diff: spec differences, tensors added/removed/changed, max |a - b|, across formats."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from torch import nn

from registry import Registry
from registry.diff import max_abs_diff, spec_changes
from tests.conftest import Cli
from tests.helpers import tutorial_model

SPECMODS = Path(__file__).resolve().parent


def _edited(delta: float) -> nn.Sequential:
    model = tutorial_model()
    with torch.no_grad():
        model[2].weight[0, 5] += delta
    return model


def test_one_changed_tensor_is_named_with_its_max_difference(registry: Registry, cli: Cli) -> None:
    registry.push("mlp", tutorial_model())
    registry.push("mlp", _edited(0.375), format="safetensors")
    report = registry.diff("mlp:1", "mlp:2")
    assert [(t.name, t.change, t.max_abs_diff) for t in report.tensors] == [("2.weight", "values", 0.375)]
    assert report.spec == () and report.compared == 4 and report.equal == 3 and not report.identical
    human = cli.ok("diff", "mlp:1", "mlp:2").stdout
    assert "~ 2.weight  max abs diff 0.375" in human and "0.weight" not in human
    data = json.loads(cli.ok("--json", "diff", "mlp:1", "mlp:2").stdout)
    assert data["tensors"] == [{"name": "2.weight", "change": "values", "a": "[1, 16] float32",
                                "b": "[1, 16] float32", "max_abs_diff": 0.375}]
    result = cli.run("diff", "mlp:1", "mlp:2", "--exit-code")
    assert result.exit_code == 1 and "2.weight" in result.stdout and result.stderr == ""
    assert cli.ok("diff", "mlp:1", "mlp:1", "--exit-code").stdout.strip() == "mlp:1 -> mlp:1: identical"


def test_spec_and_shape_changes_added_and_removed_tensors(registry: Registry) -> None:
    registry.push("mlp", tutorial_model())
    torch.manual_seed(0)
    registry.push("mlp", nn.Sequential(nn.Linear(128, 32), nn.ReLU(), nn.Linear(32, 1, bias=False)))
    report = registry.diff("mlp:1", "mlp:2")
    changes = {t.name: t for t in report.tensors}
    assert changes["0.weight"].change == "shape" and changes["0.weight"].b == "[32, 128] float32"
    assert changes["2.bias"].change == "removed" and changes["2.bias"].a == "[1] float32"
    assert changes["0.bias"].change == "shape"
    assert "args[0].kwargs.out_features: 16 -> 32" in report.spec
    assert "args[2].kwargs.bias: true -> false" in report.spec


def test_formats_without_a_tensor_file_and_tied_weights(registry: Registry, monkeypatch: pytest.MonkeyPatch) -> None:
    model = tutorial_model()
    registry.push("mlp", model, format="torchscript")
    registry.push("mlp", _edited(-2.0))
    registry.push("mlp", model, format="export", example_inputs=torch.zeros(1, 128))
    report = registry.diff("mlp:1", "mlp:2")
    assert [(t.name, t.max_abs_diff) for t in report.tensors] == [("2.weight", 2.0)]
    assert report.spec_note is not None and "mlp:1 records no architecture spec" in report.spec_note
    assert registry.diff("mlp:1", "mlp:3").identical

    monkeypatch.syspath_prepend(str(SPECMODS))
    from specmods.nets import Tied

    reg = Registry(trusted_modules=["specmods"])
    tied = Tied(6, 3)
    reg.push("tied", tied, format="safetensors")  # stores the shared weight once
    reg.push("tied", tied)  # state_dict: both names
    assert reg.diff("tied:1", "tied:2").identical
    reg.close()


def test_max_abs_diff_edge_cases() -> None:
    nan, inf = math.nan, math.inf
    assert max_abs_diff(torch.tensor([1.0, nan, inf]), torch.tensor([1.0, nan, inf])) == 0
    assert max_abs_diff(torch.tensor([1.0, nan]), torch.tensor([1.0, 2.0])) == inf
    assert max_abs_diff(torch.tensor([True, False]), torch.tensor([True, True])) == 1
    assert max_abs_diff(torch.zeros(0), torch.zeros(0)) == 0
    assert max_abs_diff(torch.tensor([1 + 1j]), torch.tensor([1 + 3j])) == 2
    big = torch.zeros(3_000_000)
    other = big.clone()
    other[-1] = 0.5  # in the last chunk
    assert max_abs_diff(big, other) == 0.5
    assert spec_changes({"a": [1, True]}, {"a": [1.0, 1], "b": None}) == ["a[1]: true -> 1", "b: added null"]


def test_spec_spelled_differently_is_not_a_difference_but_a_real_change_is(registry: Registry,
                                                                            tmp_path: Path) -> None:
    from tests.helpers import TUTORIAL_SPEC, tutorial_model

    model = tutorial_model()
    path = tmp_path / "sd.pt"
    torch.save(model.state_dict(), path)
    registry.push("m", path, spec=TUTORIAL_SPEC)  # hand-written: defaults left out
    registry.push("m", model)  # captured: every argument spelled out (ReLU inplace=False, ...)
    same = registry.diff("m:1", "m:2")
    assert same.spec == () and same.identical
    assert same.spec_note == "the specs are written differently but describe the same architecture"

    positional = {"target": "torch.nn.Sequential", "args": [
        {"target": "torch.nn.modules.linear.Linear", "args": [128, 16]},
        {"target": "torch.nn.ReLU", "kwargs": {"inplace": False}},
        {"target": "torch.nn.Linear", "args": [16, 1], "kwargs": {"bias": True}}]}
    registry.push("m", path, spec=positional)
    assert registry.diff("m:1", "m:3").spec == ()

    wider = nn.Sequential(nn.Linear(128, 32), nn.ReLU(), nn.Linear(32, 1))
    registry.push("m", wider)
    changed = registry.diff("m:1", "m:4")
    assert any("out_features: 16 -> 32" in line for line in changed.spec), changed.spec
