"""The safetensors format: push from Python and from a file, pull, load from the spec, tied weights."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from registry import FormatError, Registry, SpecError, UntrustedTarget
from registry.records import Format
from tests.conftest import Cli
from tests.helpers import TUTORIAL_SPEC, fresh_python, registry_snapshot, tutorial_model

SPECMODS = Path(__file__).resolve().parent  # tests/specmods is importable as "specmods" from here
X = torch.linspace(-1, 1, 2 * 128).reshape(2, 128)


def _spec_file(tmp_path: Path, spec: object = TUTORIAL_SPEC) -> Path:
    path = tmp_path / "spec.json"
    path.write_text(json.dumps(spec))
    return path


def test_push_from_python_captures_spec_and_loads_without_copying(registry: Registry) -> None:
    model = tutorial_model()
    mv = registry.push("mlp", model, format="safetensors")
    assert mv.format is Format.SAFETENSORS and mv.pickle_globals == ()
    assert mv.spec is not None and mv.spec["target"] == "torch.nn.Sequential"
    loaded = registry.load("mlp")
    assert not loaded.training and torch.equal(loaded(X), model(X))
    # safetensors' loader maps the file and the parameters are assigned, not copied: fixed-size storage.
    assert all(not p.untyped_storage().resizable() for p in loaded.parameters())


def test_push_file_with_arch_pull_bytes_equal_and_load_in_fresh_process(
    tmp_path: Path, home: Path, cli: Cli
) -> None:
    model = tutorial_model(3)
    path = tmp_path / "m.safetensors"
    save_file(model.state_dict(), str(path))
    pushed = cli.ok("--json", "push", "mlp", str(path), "--arch", str(_spec_file(tmp_path)))
    assert json.loads(pushed.stdout)["format"] == "safetensors"
    assert "safetensors (detected)" in cli.ok("push", "mlp", str(path), "--arch", str(_spec_file(tmp_path))).stdout
    out = tmp_path / "pulled"
    out.mkdir()
    pulled = cli.ok("pull", "mlp:1", "-o", str(out))
    assert Path(pulled.stdout.strip()) == out / "mlp-v1.safetensors"
    assert (out / "mlp-v1.safetensors").read_bytes() == path.read_bytes()
    code = (
        "import torch\n"
        "from registry import Registry\n"
        "m = Registry().load('mlp:1')\n"
        "assert not m.training\n"
        "x = torch.linspace(-1, 1, 256).reshape(2, 128)\n"
        "print(m(x).detach().flatten().tolist())\n"
    )
    assert json.loads(fresh_python(code)) == model(X).detach().flatten().tolist()


def test_user_class_is_importable_only_through_the_trusted_spec(
    home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.syspath_prepend(str(SPECMODS))
    from specmods.nets import TinyNet

    torch.manual_seed(1)
    model = TinyNet([4, 8, 2], nn.Tanh(), dropout=0.1).eval()
    with Registry(trusted_modules=["specmods"]) as reg:
        mv = reg.push("tiny", model, format="safetensors")
    assert mv.spec is not None and mv.spec["target"] == "specmods.nets:TinyNet"
    # A fresh process that never imports specmods itself: only the trusted spec does.
    code_load = (
        "import sys, torch\n"
        "from registry import Registry\n"
        "assert 'specmods' not in sys.modules\n"
        "m = Registry().load('tiny')\n"
        "assert type(m).__module__ == 'specmods.nets'\n"
        "print(m(torch.ones(3, 4)).flatten().tolist())\n"
    )
    env = {"PYTHONPATH": str(SPECMODS), "REGISTRY_TRUSTED_MODULES": "specmods"}
    assert json.loads(fresh_python(code_load, env)) == model(torch.ones(3, 4)).flatten().tolist()
    with Registry() as untrusting, pytest.raises(UntrustedTarget, match="specmods.nets:TinyNet"):
        untrusting.load("tiny")


def test_tied_weights_round_trip_with_the_tie_intact(registry: Registry, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.syspath_prepend(str(SPECMODS))
    from specmods.nets import Tied

    reg = Registry(trusted_modules=["specmods"])
    torch.manual_seed(0)
    model = Tied(50, 8)
    mv = reg.push("tied", model, format="safetensors")
    with reg.store.open_verified(mv.sha256, mv.size, artifact=mv.ref) as path, \
            safe_open(str(path), framework="pt") as f:
        assert list(f.keys()) == ["embed.weight"]  # the shared weight is stored once
    loaded = reg.load("tied")
    assert loaded.out.weight is loaded.embed.weight  # one Parameter, not two copies
    assert sum(p.numel() for p in loaded.parameters()) == 50 * 8
    tokens = torch.tensor([[1, 7, 49]])
    assert torch.equal(loaded(tokens), model(tokens))
    with torch.no_grad():
        loaded.embed.weight[0, 0] = 123.0
    assert loaded.out.weight[0, 0] == 123.0
    reg.close()


def test_tied_file_holding_both_names_must_agree(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.syspath_prepend(str(SPECMODS))

    reg = Registry(trusted_modules=["specmods"])
    spec = {"target": "specmods.nets:Tied", "args": [5, 3]}
    weight = torch.randn(5, 3)
    same = tmp_path / "same.safetensors"
    save_file({"embed.weight": weight, "out.weight": weight.clone()}, str(same))
    loaded = reg.load(reg.push("tied", same, spec=spec).ref)
    assert loaded.out.weight is loaded.embed.weight
    differ = tmp_path / "differ.safetensors"
    save_file({"embed.weight": weight, "out.weight": weight + 1}, str(differ))
    with pytest.raises(SpecError, match="one shared tensor"):
        reg.push("tied", differ, spec=spec)
    reg.close()


def test_without_arch_refused_like_a_state_dict(tmp_path: Path, home: Path, cli: Cli) -> None:
    model = tutorial_model()
    st = tmp_path / "m.safetensors"
    save_file(model.state_dict(), str(st))
    sd = tmp_path / "m.pt"
    torch.save(model.state_dict(), sd)
    before = registry_snapshot(home)
    cli.fails("push", "mlp", str(st), match="needs an architecture spec to be loaded again: pass --arch SPEC.json")
    cli.fails("push", "mlp", str(sd), match="needs an architecture spec to be loaded again: pass --arch SPEC.json")
    assert registry_snapshot(home) == before


def test_tensors_not_matching_the_spec_refused_with_the_state_dict_errors(
    tmp_path: Path, home: Path, cli: Cli
) -> None:
    state = tutorial_model().state_dict()
    state["extra"] = torch.zeros(3)
    del state["2.bias"]
    state["0.weight"] = torch.zeros(16, 127)
    arch = str(_spec_file(tmp_path))
    st = tmp_path / "bad.safetensors"
    save_file(state, str(st))
    sd = tmp_path / "bad.pt"
    torch.save(state, sd)
    before = registry_snapshot(home)
    err_st = cli.fails("push", "mlp", str(st), "--arch", arch, match="does not match the architecture").stderr
    err_sd = cli.fails("push", "mlp", str(sd), "--arch", arch, match="does not match the architecture").stderr
    assert err_st.replace(st.name, "F") == err_sd.replace(sd.name, "F")
    for part in ("missing keys: 2.bias", "unexpected keys: extra", "0.weight (expected [16, 128], got [16, 127])"):
        assert part in err_st
    assert registry_snapshot(home) == before


def test_declared_format_must_match_the_bytes(tmp_path: Path, registry: Registry) -> None:
    sd = tmp_path / "m.pt"
    torch.save(tutorial_model().state_dict(), sd)
    with pytest.raises(FormatError, match="declared safetensors but its bytes are state_dict"):
        registry.push("mlp", sd, format="safetensors", spec=TUTORIAL_SPEC)
    st = tmp_path / "m.safetensors"
    save_file(tutorial_model().state_dict(), str(st))
    with pytest.raises(FormatError, match="declared state_dict but its bytes are safetensors"):
        registry.push("mlp", st, format="state_dict", spec=TUTORIAL_SPEC)


def test_non_persistent_state_is_rebuilt(registry: Registry, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.syspath_prepend(str(SPECMODS))
    from specmods.nets import WithBuffer

    reg = Registry(trusted_modules=["specmods"])
    model = WithBuffer(3)
    reg.push("buf", model, format="safetensors")
    x = torch.randn(2, 3)
    assert torch.equal(reg.load("buf")(x), model(x))
    reg.close()


def test_conv_model_round_trip(registry: Registry) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 2))
    model.eval()
    registry.push("conv", model, format="safetensors")
    x = torch.randn(2, 3, 8, 8)
    assert torch.equal(registry.load("conv")(x), model(x))
