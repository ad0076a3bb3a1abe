"""Conversion between formats: every supported pair for two models, outputs compared; clean failures."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from sqlalchemy import text
from torch import nn

from registry import FormatError, Registry, SpecError
from registry.records import Format
from tests.conftest import Cli
from tests.helpers import registry_snapshot, tutorial_model

SOURCES = ("state_dict", "safetensors", "full", "torchscript", "export")
TARGETS = ("state_dict", "safetensors", "torchscript", "export")
#: Conversions PyTorch itself cannot do, and the reason it gives.
IMPOSSIBLE = {
    ("torchscript", "export"): "Exporting a ScriptModule is not supported",
    ("export", "torchscript"): "Expected a single top-level function",
}


def conv_model() -> nn.Module:
    torch.manual_seed(1)
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 2)).eval()


MODELS: dict[str, tuple[Any, torch.Tensor]] = {
    "mlp": (lambda: tutorial_model().eval(), torch.linspace(-1, 1, 3 * 128).reshape(3, 128)),
    "conv": (conv_model, torch.linspace(-2, 2, 2 * 3 * 8 * 8).reshape(2, 3, 8, 8)),
}


class DataDependent(nn.Module):
    """Control flow on a tensor value: torch.export cannot trace it."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.sum() > 0:
            return x * 2
        return x


@pytest.fixture(scope="module")
def versions(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Registry, dict[tuple[str, str], str]]]:
    """Each model pushed once in every source format, with its signature."""
    root = tmp_path_factory.mktemp("convert")
    with pytest.MonkeyPatch.context() as env:  # module scope: the autouse isolated_env is not active yet
        env.setenv("REGISTRY_HOME", str(root))
        reg = Registry(db=f"sqlite:///{root / 'registry.db'}", storage=str(root / "artifacts"), user="tester")
    refs: dict[tuple[str, str], str] = {}
    for name, (make, x) in MODELS.items():
        model = make()
        for fmt in SOURCES:
            refs[(name, fmt)] = reg.push(name, model, format=fmt, example_inputs=x).ref
    yield reg, refs
    reg.close()


@pytest.mark.parametrize("name", sorted(MODELS))
@pytest.mark.parametrize(("source", "target"), [(s, t) for s in SOURCES for t in TARGETS if s != t])
def test_convert_pair(versions: tuple[Registry, dict[tuple[str, str], str]], name: str, source: str,
                      target: str) -> None:
    reg, refs = versions
    make, x = MODELS[name]
    ref = refs[(name, source)]
    spec = reg.get(refs[(name, "state_dict")]).spec if source in ("torchscript", "export") else None
    if (source, target) in IMPOSSIBLE:
        count = len(reg.versions(name))
        with pytest.raises(FormatError) as info:
            reg.convert(ref, target, spec=spec)
        message = str(info.value)
        assert message.startswith(f"cannot save the model as {target}: ") and "\n" not in message
        assert IMPOSSIBLE[(source, target)] in message
        assert len(reg.versions(name)) == count  # nothing pushed
        return
    mv = reg.convert(ref, target, spec=spec)
    assert mv.format is Format(target) and mv.source == ref and mv.name == name
    assert mv.signature is not None and mv.example_sha256 == reg.get(ref).example_sha256
    loaded = reg.load(mv.ref)
    expected = make()(x)
    assert torch.allclose(loaded(x), expected, rtol=1e-5, atol=1e-6)
    assert reg.check(mv.ref).ok


def test_spec_needed_from_torchscript_and_export(versions: tuple[Registry, dict[tuple[str, str], str]]) -> None:
    reg, refs = versions
    for source in ("torchscript", "export"):
        with pytest.raises(SpecError, match=f"{source} version does not record: pass --arch SPEC.json"):
            reg.convert(refs[("mlp", source)], "safetensors")


def test_cli_convert_and_lineage(tmp_path: Path, home: Path, cli: Cli) -> None:
    model = tutorial_model()
    x = torch.randn(2, 128)
    torch.save(model, tmp_path / "m.pt")
    torch.save(x, tmp_path / "x.pt")
    cli.ok("push", "mlp", str(tmp_path / "m.pt"))  # full, no signature
    before = registry_snapshot(home)
    cli.fails("convert", "mlp:1", "--to", "export",
              match="converting mlp:1 to export needs example inputs to trace it with: mlp:1 has no recorded "
                    "signature; pass --example FILE")
    cli.fails("convert", "mlp:1", "--to", "full", match="Invalid value for '--to'", code=2)
    assert registry_snapshot(home) == before
    out = cli.ok("convert", "mlp:1", "--to", "export", "--example", str(tmp_path / "x.pt")).stdout
    assert out.startswith("mlp:2  export  from mlp:1 (outputs checked against the signature)")
    converted = json.loads(cli.ok("--json", "convert", "mlp:2", "--to", "safetensors",
                                  "--arch", str(_spec(tmp_path, model))).stdout)
    assert converted["source"] == "mlp:2" and converted["format"] == "safetensors" and converted["version"] == 3
    listing = cli.ok("list", "mlp").stdout.splitlines()
    assert listing[0].split()[-1] == "SOURCE" and listing[1].split()[-1] == "mlp:2"
    assert "source:         mlp:1" in cli.ok("show", "mlp:2").stdout
    cli.ok("promote", "mlp", "--version", "3")
    assert cli.ok("history", "mlp").stdout.splitlines()[1].split()[-1] == "mlp:2"
    assert json.loads(cli.ok("--json", "history", "mlp").stdout)[0]["source"] == "mlp:2"
    with Registry() as reg:
        assert torch.equal(reg.load("mlp:3")(x), model(x))


def test_conversion_that_changes_outputs_pushes_nothing(registry: Registry, home: Path) -> None:
    registry.push("mlp", tutorial_model(), example_inputs=torch.ones(1, 128))
    # Pretend the recorded outputs were different: the converted model no longer reproduces them.
    mv = registry.get("mlp")
    assert mv.signature is not None
    bad = json.loads(json.dumps(mv.signature))
    bad["outputs"][0]["values"] = [v + 1.0 for v in bad["outputs"][0]["values"]]
    with registry._session(write=True) as s:
        s.execute(text("UPDATE versions SET signature = :sig"), {"sig": json.dumps(bad)})
    before = registry_snapshot(home)
    with pytest.raises(FormatError, match=r"does not reproduce its signature .*: output: max abs diff 1"):
        registry.convert("mlp", "safetensors")
    assert registry_snapshot(home) == before


def test_untraceable_model_fails_with_pytorch_reason(home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with Registry(trusted_modules=["tests.test_convert"]) as reg:
        reg.push("dd", DataDependent(), format="full", example_inputs=torch.ones(3))
        before = registry_snapshot(home)
        with pytest.raises(FormatError) as info:
            reg.convert("dd", "export")
        assert str(info.value).startswith("cannot save the model as export: Could not guard on data-dependent")
        assert "\n" not in str(info.value)
        assert registry_snapshot(home) == before
        with pytest.raises(FormatError, match="already full|choose one of state_dict, safetensors"):
            reg.convert("dd", "full")


def _spec(tmp_path: Path, model: nn.Module) -> Path:
    from registry.spec import capture

    path = tmp_path / "spec.json"
    path.write_text(json.dumps(capture(model)))
    return path
