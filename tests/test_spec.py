"""Architecture specs: validation, trusted resolution, meta builds, capture round trips, weight loading."""

from __future__ import annotations

import copy
import inspect
import json
import pickle
import subprocess
import sys
from collections import OrderedDict
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from registry.errors import SpecError, UntrustedTarget
from registry.spec import (
    MAX_DEPTH,
    MAX_SPEC_BYTES,
    build,
    build_with_weights,
    capture,
    check_state_dict,
    record_init,
    resolve,
    skeleton,
    validate,
)
from tests.specmods import nets

TORCH = ("torch.nn",)
USER = ("torch.nn", "tests.specmods")
TUTORIAL: dict[str, Any] = {
    "target": "torch.nn.Sequential",
    "args": [
        {"target": "torch.nn.Linear", "kwargs": {"in_features": 128, "out_features": 16, "bias": True}},
        {"target": "torch.nn.ReLU"},
        {"target": "torch.nn.Linear", "kwargs": {"in_features": 16, "out_features": 1, "bias": True}},
    ],
}


def _same(a: Any, b: Any) -> bool:
    """Outputs are equal: tensors exactly, tuples/lists/dicts element by element."""
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.shape == b.shape and torch.equal(a, b)
    if isinstance(a, (tuple, list)):
        return type(a) is type(b) and len(a) == len(b) and all(map(_same, a, b))
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    return bool(a == b)


def _round_trip(module: nn.Module, run: Callable[[nn.Module], Any], trusted: tuple[str, ...] = TORCH) -> nn.Module:
    """capture -> JSON -> build_with_weights(original state_dict) gives the same outputs in eval mode."""
    module.eval()
    spec = json.loads(json.dumps(capture(module)))
    loaded = build_with_weights(spec, module.state_dict(), trusted)
    assert type(loaded) is type(module)
    assert not loaded.training
    assert all(not t.is_meta for t in [*loaded.parameters(), *loaded.buffers()])
    with torch.no_grad():
        assert _same(run(module), run(loaded))
    return loaded


def _x(*shape: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(7))


# ---------------------------------------------------------------- build and validate


def test_tutorial_spec_builds_the_tutorial_model_on_meta() -> None:
    model = build(TUTORIAL, TORCH)
    assert isinstance(model, nn.Sequential) and len(model) == 3
    first, act, last = model
    assert isinstance(first, nn.Linear) and (first.in_features, first.out_features) == (128, 16)
    assert isinstance(act, nn.ReLU)
    assert isinstance(last, nn.Linear) and (last.in_features, last.out_features) == (16, 1)
    assert first.bias is not None
    assert all(p.device.type == "meta" for p in model.parameters())


def test_build_on_meta_allocates_no_memory() -> None:
    # 10^5 x 10^5 float32 would be 40 GB if it were allocated.
    spec = {"target": "torch.nn.Linear", "args": [100_000, 100_000]}
    model = build(spec, TORCH)
    assert model.weight.is_meta and model.weight.shape == (100_000, 100_000)


def test_build_on_a_real_device() -> None:
    model = build(TUTORIAL, TORCH, device="cpu")
    assert all(p.device.type == "cpu" for p in model.parameters())
    assert model(_x(2, 128)).shape == (2, 1)


def test_validate_normalizes_a_deep_copy() -> None:
    spec = {
        "target": "torch.nn:Sequential",
        "args": [({"target": "torch.nn.Identity", "args": [], "kwargs": {}},)],
        "kwargs": {},
    }
    clean = validate(spec, TORCH)
    assert clean == {"target": "torch.nn:Sequential", "args": [[{"target": "torch.nn.Identity"}]]}
    clean["args"][0].append("changed")
    assert spec["args"][0] == ({"target": "torch.nn.Identity", "args": [], "kwargs": {}},)


def test_plain_json_objects_become_ordered_dicts() -> None:
    spec = {"target": "torch.nn.Sequential", "args": [{"fc": {"target": "torch.nn.Linear", "args": [2, 3]}}]}
    model = build(spec, TORCH)
    assert [name for name, _ in model.named_children()] == ["fc"]
    assert model.fc.out_features == 3


def test_colon_form_resolves() -> None:
    assert resolve("torch.nn:Linear", TORCH) is nn.Linear
    assert resolve("torch.nn.modules.linear:Linear", TORCH) is nn.Linear
    assert resolve("tests.specmods.nets:Outer.Inner", USER) is nets.Outer.Inner


def test_constructor_errors_name_the_target() -> None:
    with pytest.raises(SpecError, match=r"spec.args\[0\]: cannot construct torch.nn.Linear: .*out_features"):
        build({"target": "torch.nn.Sequential", "args": [{"target": "torch.nn.Linear", "args": [2]}]}, TORCH)
    with pytest.raises(SpecError, match="cannot construct torch.nn.Dropout: .*probability"):
        build({"target": "torch.nn.Dropout", "kwargs": {"p": 2.0}}, TORCH)


# ---------------------------------------------------------------- refusals


@pytest.mark.parametrize(
    "target",
    [
        "os.system",
        "subprocess.Popen",
        "builtins.eval",
        "torch.nn_evil.X",
        "torch.nn.__class__",
        "torch.nn.Linear.__init__",
        "torch.nn.modules.module.torch.load",
        "torch.nn.modules.module:torch.load",
        "tests.specmods.nets.ReExported",
    ],
)
def test_untrusted_targets_are_refused(target: str) -> None:
    trusted = USER if target.startswith("tests.") else TORCH
    with pytest.raises(UntrustedTarget, match=f"spec target '{target}' is not trusted"):
        resolve(target, trusted)
    with pytest.raises(UntrustedTarget):
        build({"target": "torch.nn.Sequential", "args": [{"target": target}]}, trusted)


def test_untrusted_targets_fail_validation_without_any_import() -> None:
    with pytest.raises(UntrustedTarget, match="'os.system' is not trusted"):
        validate({"target": "torch.nn.Sequential", "args": [{"target": "os.system"}]}, TORCH)


@pytest.fixture
def evil_module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A module on sys.path that leaves a marker file when it is imported."""
    marker = tmp_path / "imported"
    (tmp_path / "evilmod_xyz.py").write_text(
        f"import pathlib\npathlib.Path({str(marker)!r}).write_text('pwned')\n"
        "import torch\nclass Thing(torch.nn.Module):\n    pass\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    yield marker
    sys.modules.pop("evilmod_xyz", None)


def test_untrusted_target_is_refused_before_import(evil_module: Path) -> None:
    for call in (
        lambda: resolve("evilmod_xyz.Thing", TORCH),
        lambda: resolve("evilmod_xyz:Thing", TORCH),
        lambda: validate({"target": "evilmod_xyz.Thing"}, TORCH),
        lambda: build({"target": "evilmod_xyz.Thing"}, TORCH),
        lambda: build_with_weights({"target": "evilmod_xyz.Thing"}, {}, TORCH),
    ):
        with pytest.raises(UntrustedTarget):
            call()
    assert not evil_module.exists()
    assert "evilmod_xyz" not in sys.modules


def test_the_marker_module_does_run_once_trusted(evil_module: Path) -> None:
    # Control for the test above: the same module, once trusted, is imported and leaves its marker.
    assert resolve("evilmod_xyz.Thing", ("torch.nn", "evilmod_xyz")).__name__ == "Thing"
    assert evil_module.read_text() == "pwned"


def test_a_trusted_target_that_is_not_a_module_class() -> None:
    with pytest.raises(SpecError, match="'torch.nn.functional.relu' is not an nn.Module subclass") as info:
        resolve("torch.nn.functional.relu", TORCH)
    assert not isinstance(info.value, UntrustedTarget)
    with pytest.raises(SpecError, match="is not an nn.Module subclass"):
        resolve("torch.nn.Parameter", TORCH)


def test_unimportable_trusted_targets_name_themselves() -> None:
    with pytest.raises(SpecError, match="'torch.nn.NoSuchLayer'.*no attribute 'NoSuchLayer'") as info:
        resolve("torch.nn.NoSuchLayer", TORCH)
    assert isinstance(info.value.__cause__, AttributeError)
    with pytest.raises(SpecError, match="cannot import spec target 'tests.specmods.broken.Net'") as info:
        resolve("tests.specmods.broken.Net", USER)
    assert isinstance(info.value.__cause__, ImportError)
    with pytest.raises(SpecError, match="cannot import spec target 'tests.specmods.nope:Net'") as info:
        resolve("tests.specmods.nope:Net", USER)
    assert isinstance(info.value.__cause__, ModuleNotFoundError)
    # The part before ":" must be a module itself, never an attribute path.
    with pytest.raises(SpecError, match="'torch.nn.modules.module' is not a package"):
        resolve("torch.nn.modules.module.torch:load", TORCH)


@pytest.mark.parametrize(
    ("value", "match"),
    [
        (float("nan"), r"spec.args\[0\].kwargs.bias: nan is not valid JSON"),
        (float("inf"), r"spec.args\[0\].kwargs.bias: inf is not valid JSON"),
        ({1, 2}, r"spec.args\[0\].kwargs.bias: a set is not a JSON value"),
        (b"raw", r"spec.args\[0\].kwargs.bias: a bytes is not a JSON value"),
        ({1: "a"}, r"spec.args\[0\].kwargs.bias: key 1 is not a string"),
        ([torch.zeros(1)], r"spec.args\[0\].kwargs.bias\[0\]: a Tensor is not a JSON value"),
        (2**64, r"spec.args\[0\].kwargs.bias: integer outside the 64-bit range"),
        ("\ud800", r"spec: a string is not valid Unicode \(surrogates not allowed\)"),
    ],
)
def test_non_json_values_are_refused_with_their_place(value: object, match: str) -> None:
    spec = {
        "target": "torch.nn.Sequential",
        "args": [{"target": "torch.nn.Linear", "kwargs": {"bias": value}}],
    }
    with pytest.raises(SpecError, match=match):
        validate(spec, TORCH)


@pytest.mark.parametrize(
    ("spec", "match"),
    [
        ('{"target": "torch.nn.ReLU"}', "expected a JSON object, got str"),
        ({"args": []}, "no 'target' key"),
        ({"target": "torch.nn.ReLU", "kwarg": {}}, "spec: unknown key.*'kwarg'.*only target, args, kwargs"),
        ({"target": 3}, "spec.target: expected a dotted path string, got int"),
        ({"target": "torch.nn.Linear()"}, "is not a dotted path"),
        ({"target": "torch..Linear"}, "is not a dotted path"),
        ({"target": "torch.nn:Lin:ear"}, "is not a dotted path"),
        ({"target": "Linear"}, "is not a dotted path"),
        ({"target": "torch.nn.Linear", "args": {"in": 1}}, "spec.args: expected a list, got dict"),
        ({"target": "torch.nn.Linear", "kwargs": [1]}, "spec.kwargs: expected an object, got list"),
        (
            {"target": "torch.nn.Linear", "kwargs": {"in-features": 1}},
            "'in-features' is not a Python identifier",
        ),
        ({"target": "torch.nn.Linear", "kwargs": {3: 1}}, "key 3 is not a Python identifier"),
    ],
)
def test_malformed_specs_are_refused(spec: object, match: str) -> None:
    with pytest.raises(SpecError, match=match) as info:
        validate(spec, TORCH)
    assert not isinstance(info.value, UntrustedTarget)


def test_too_deep_is_refused_without_recursion_errors() -> None:
    nested: Any = {"target": "torch.nn.Identity"}
    for _ in range(MAX_DEPTH // 2):
        nested = {"target": "torch.nn.Sequential", "args": [nested]}
    with pytest.raises(SpecError, match=f"nested deeper than {MAX_DEPTH} levels"):
        validate(nested, TORCH)
    value: Any = 1
    for _ in range(100_000):
        value = [value]
    with pytest.raises(SpecError, match=r"spec.args\[0\]\[0\].*nested deeper"):
        validate({"target": "torch.nn.Identity", "args": [value]}, TORCH)


def test_depth_limit_is_inclusive() -> None:
    value: Any = 1
    for _ in range(MAX_DEPTH - 1):  # with the spec object around it: MAX_DEPTH levels
        value = [value]
    validate({"target": "torch.nn.Identity", "args": value}, TORCH)
    with pytest.raises(SpecError, match="nested deeper"):
        validate({"target": "torch.nn.Identity", "args": [value]}, TORCH)


def test_too_big_is_refused() -> None:
    spec = {"target": "torch.nn.Identity", "kwargs": {"note": "x" * MAX_SPEC_BYTES}}
    with pytest.raises(SpecError, match=f"bytes, more than the limit of {MAX_SPEC_BYTES}"):
        validate(spec, TORCH)
    fits = MAX_SPEC_BYTES - len(json.dumps({"target": "torch.nn.Identity", "kwargs": {"note": ""}}).replace(" ", ""))
    validate({"target": "torch.nn.Identity", "kwargs": {"note": "x" * fits}}, TORCH)


def test_spec_module_does_not_import_torch() -> None:
    code = "import registry.spec, sys; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).resolve().parent.parent)


# ---------------------------------------------------------------- capture round trips


def _trained_batchnorm(module: nn.Module, shape: tuple[int, ...]) -> nn.Module:
    """Update running statistics so eval mode uses something other than the initial values."""
    module.train()
    with torch.no_grad():
        for _ in range(3):
            module(torch.randn(*shape) * 3 + 1)
    return module


MHA_Q, MHA_K, MHA_V = _x(2, 3, 8), _x(2, 4, 6), _x(2, 4, 5)
LAYERS: dict[str, tuple[Callable[[], nn.Module], Callable[[nn.Module], Any]]] = {
    "linear": (lambda: nn.Linear(8, 4), lambda m: m(_x(2, 8))),
    "linear-no-bias": (lambda: nn.Linear(8, 4, bias=False), lambda m: m(_x(2, 8))),
    "bilinear": (lambda: nn.Bilinear(3, 4, 5), lambda m: m(_x(2, 3), _x(2, 4))),
    "conv1d": (lambda: nn.Conv1d(3, 4, 3, padding=1, dilation=2), lambda m: m(_x(2, 3, 10))),
    "conv2d": (
        lambda: nn.Conv2d(3, 6, (3, 2), stride=2, padding="valid", groups=3, bias=False),
        lambda m: m(_x(2, 3, 9, 9)),
    ),
    "conv2d-same": (
        lambda: nn.Conv2d(2, 4, 3, padding="same", padding_mode="reflect"),
        lambda m: m(_x(1, 2, 6, 6)),
    ),
    "conv3d": (lambda: nn.Conv3d(2, 3, 2), lambda m: m(_x(1, 2, 4, 4, 4))),
    "conv-transpose1d": (lambda: nn.ConvTranspose1d(3, 2, 3, stride=2), lambda m: m(_x(1, 3, 5))),
    "conv-transpose2d": (
        lambda: nn.ConvTranspose2d(4, 2, 3, stride=2, output_padding=1, bias=False),
        lambda m: m(_x(1, 4, 5, 5)),
    ),
    "rnn": (
        lambda: nn.RNN(4, 8, num_layers=2, nonlinearity="relu", batch_first=True),
        lambda m: m(_x(2, 5, 4)),
    ),
    "lstm": (
        lambda: nn.LSTM(4, 8, num_layers=2, batch_first=True, bidirectional=True, proj_size=3, dropout=0.2),
        lambda m: m(_x(2, 5, 4)),
    ),
    "gru": (lambda: nn.GRU(4, 6, bias=False), lambda m: m(_x(5, 2, 4))),
    "mha": (
        lambda: nn.MultiheadAttention(8, 2, batch_first=True, add_bias_kv=True, add_zero_attn=True, kdim=6, vdim=5),
        lambda m: m(MHA_Q, MHA_K, MHA_V),
    ),
    "mha-no-bias": (
        lambda: nn.MultiheadAttention(8, 4, bias=False),
        lambda m: m(_x(3, 2, 8), _x(3, 2, 8), _x(3, 2, 8)),
    ),
    "embedding": (
        lambda: nn.Embedding(10, 4, padding_idx=0, max_norm=2.0),
        lambda m: m(torch.tensor([[0, 3, 9], [1, 1, 2]])),
    ),
    "batchnorm1d": (lambda: _trained_batchnorm(nn.BatchNorm1d(4), (6, 4)), lambda m: m(_x(6, 4))),
    "batchnorm2d": (
        lambda: _trained_batchnorm(nn.BatchNorm2d(3, momentum=None, affine=False), (2, 3, 4, 4)),
        lambda m: m(_x(2, 3, 4, 4)),
    ),
    "instancenorm1d": (
        lambda: _trained_batchnorm(nn.InstanceNorm1d(4, affine=True, track_running_stats=True), (2, 4, 5)),
        lambda m: m(_x(2, 4, 5)),
    ),
    "layernorm": (lambda: nn.LayerNorm([3, 4], eps=1e-3), lambda m: m(_x(2, 3, 4))),
    "layernorm-no-bias": (lambda: nn.LayerNorm(4, bias=False), lambda m: m(_x(2, 4))),
    "layernorm-no-affine": (lambda: nn.LayerNorm(4, elementwise_affine=False), lambda m: m(_x(2, 4))),
    "groupnorm": (lambda: nn.GroupNorm(2, 4), lambda m: m(_x(2, 4, 3))),
    "dropout": (lambda: nn.Dropout(0.3), lambda m: m(_x(4, 4))),
    "dropout2d": (lambda: nn.Dropout2d(0.5), lambda m: m(_x(1, 2, 3, 3))),
    "alpha-dropout": (lambda: nn.AlphaDropout(0.2), lambda m: m(_x(4, 4))),
    "relu": (lambda: nn.ReLU(), lambda m: m(_x(4, 4))),
    "leaky-relu": (lambda: nn.LeakyReLU(0.2), lambda m: m(_x(4, 4))),
    "gelu-tanh": (lambda: nn.GELU(approximate="tanh"), lambda m: m(_x(4, 4))),
    "softmax": (lambda: nn.Softmax(dim=0), lambda m: m(_x(4, 4))),
    "log-softmax": (lambda: nn.LogSoftmax(dim=-1), lambda m: m(_x(4, 4))),
    "elu": (lambda: nn.ELU(alpha=0.5), lambda m: m(_x(4, 4))),
    "silu": (lambda: nn.SiLU(), lambda m: m(_x(4, 4))),
    "tanh": (lambda: nn.Tanh(), lambda m: m(_x(4, 4))),
    "sigmoid": (lambda: nn.Sigmoid(), lambda m: m(_x(4, 4))),
    "hardtanh": (lambda: nn.Hardtanh(-0.5, 0.25), lambda m: m(_x(4, 4))),
    "relu6": (lambda: nn.ReLU6(), lambda m: m(_x(4, 4) * 8)),
    "prelu": (lambda: nn.PReLU(3, init=0.1), lambda m: m(_x(2, 3))),
    "softplus": (lambda: nn.Softplus(beta=2.0, threshold=5.0), lambda m: m(_x(4, 4))),
    "flatten": (lambda: nn.Flatten(0, 1), lambda m: m(_x(2, 3, 4))),
    "unflatten": (lambda: nn.Unflatten(1, (2, 4)), lambda m: m(_x(3, 8))),
    "identity": (lambda: nn.Identity(), lambda m: m(_x(4, 4))),
    "maxpool2d": (lambda: nn.MaxPool2d(2, stride=1, ceil_mode=True), lambda m: m(_x(1, 2, 5, 5))),
    "maxpool1d-indices": (lambda: nn.MaxPool1d(2, return_indices=True), lambda m: m(_x(1, 2, 6))),
    "avgpool1d": (
        lambda: nn.AvgPool1d(3, stride=2, padding=1, count_include_pad=False),
        lambda m: m(_x(1, 2, 7)),
    ),
    "adaptive-avgpool2d": (lambda: nn.AdaptiveAvgPool2d((2, None)), lambda m: m(_x(1, 2, 5, 7))),
    "adaptive-maxpool1d": (lambda: nn.AdaptiveMaxPool1d(3), lambda m: m(_x(1, 2, 7))),
}


@pytest.mark.parametrize("name", LAYERS)
@pytest.mark.filterwarnings("ignore:LSTM with projections is not supported with oneDNN:UserWarning")
def test_builtin_layers_round_trip(name: str) -> None:
    make, run = LAYERS[name]
    torch.manual_seed(0)
    _round_trip(make(), run)


def test_lstm_keeps_working_after_assigned_weights_and_a_move() -> None:
    torch.manual_seed(0)
    lstm = nn.LSTM(4, 8, num_layers=2, batch_first=True).eval()
    state = {k: v.clone() for k, v in lstm.state_dict().items()}
    loaded = build_with_weights(capture(lstm), state, TORCH, device="cpu")
    assert all(w.device.type == "cpu" for w in loaded._flat_weights)
    x = _x(2, 5, 4)
    assert _same(lstm(x), loaded(x))
    # Later assignments still reach the flat weights the RNN kernels read.
    with torch.no_grad():
        loaded.weight_hh_l0.zero_()
    assert not _same(lstm(x), loaded(x))


def test_tutorial_model_captures_and_reloads() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(128, 16), nn.ReLU(), nn.Linear(16, 1))
    spec = capture(model)
    assert spec["target"] == "torch.nn.Sequential"
    assert spec["args"][0] == TUTORIAL["args"][0]
    assert spec["args"][1] == {"target": "torch.nn.ReLU", "kwargs": {"inplace": False}}
    _round_trip(model, lambda m: m(_x(3, 128)))
    _round_trip(build(TUTORIAL, TORCH, device="cpu"), lambda m: m(_x(3, 128)))


def test_nested_containers_round_trip() -> None:
    torch.manual_seed(0)
    model = nn.ModuleDict(
        {
            "encoder": nn.Sequential(nn.Sequential(nn.Linear(4, 6), nn.Tanh()), nn.Linear(6, 4)),
            "heads": nn.ModuleList([nn.Linear(4, 2), nn.ModuleList([nn.Linear(4, 3)])]),
            "empty": nn.ModuleList(),
        }
    )

    def run(m: nn.Module) -> Any:
        h = m["encoder"](_x(2, 4))
        return m["heads"][0](h), m["heads"][1][0](h), len(m["empty"])

    loaded = _round_trip(model, run)
    assert list(loaded.keys()) == ["encoder", "heads", "empty"]


def test_named_sequential_round_trips_as_an_ordered_mapping() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(OrderedDict([("fc", nn.Linear(4, 3)), ("act", nn.GELU()), ("out", nn.Linear(3, 1))]))
    spec = capture(model)
    assert list(spec["args"][0]) == ["fc", "act", "out"]
    loaded = _round_trip(model, lambda m: m(_x(2, 4)))
    assert list(loaded.state_dict()) == ["fc.weight", "fc.bias", "out.weight", "out.bias"]


def test_record_init_user_class_round_trips() -> None:
    torch.manual_seed(0)
    model = nets.TinyNet([8, 6, 2], nn.GELU(approximate="tanh"), dropout=0.1)
    spec = capture(model)
    assert spec == {
        "target": "tests.specmods.nets:TinyNet",
        "kwargs": {
            "sizes": [8, 6, 2],
            "act": {"target": "torch.nn.GELU", "kwargs": {"approximate": "tanh"}},
            "dropout": 0.1,
        },
    }
    _round_trip(model, lambda m: m(_x(3, 8)), USER)
    with pytest.raises(UntrustedTarget, match="tests.specmods.nets:TinyNet"):
        build_with_weights(spec, model.state_dict(), TORCH)


def test_record_init_variadic_positional_and_omitted_defaults() -> None:
    torch.manual_seed(0)
    stack = nets.Stack(4, nn.Linear(4, 4), nn.ReLU(), gain=2.0)
    spec = capture(stack)
    # `act` defaulted to a class, which JSON cannot hold: it is left to the constructor's default.
    assert spec["args"][0] == 4 and len(spec["args"]) == 3
    assert spec["kwargs"] == {"gain": 2.0}
    _round_trip(stack, lambda m: m(_x(2, 4)), USER)
    positional = nets.Positional(3, 2, scale=0.5, target="y")
    assert capture(positional) == {
        "target": "tests.specmods.nets:Positional",
        "args": [3, 2],
        "kwargs": {"scale": 0.5, "target": "y"},
    }
    _round_trip(positional, lambda m: m(_x(2, 3)), USER)
    _round_trip(nets.Outer.Inner(3), lambda m: m(_x(2, 3)), USER)


def test_record_init_records_the_outermost_init_only() -> None:
    wide = nets.Wide(3)
    assert capture(wide) == {"target": "tests.specmods.nets:Wide", "kwargs": {"width": 3, "factor": 2}}
    assert wide.fc.in_features == 6
    _round_trip(wide, lambda m: m(_x(2, 6)), USER)
    with pytest.raises(SpecError, match="Undecorated.*neither a torch.nn built-in nor decorated"):
        capture(nets.Undecorated())


def test_record_init_keeps_the_signature_and_docs() -> None:
    params = list(inspect.signature(nets.TinyNet).parameters)
    assert params == ["sizes", "act", "dropout"]
    assert nets.TinyNet.__init__.__name__ == "__init__"
    assert nets.TinyNet.__init__.__qualname__ == "TinyNet.__init__"
    with pytest.raises(TypeError, match="sizes"):
        nets.TinyNet()  # type: ignore[call-arg]
    with pytest.raises(TypeError, match="nn.Module subclasses"):
        record_init(dict)  # type: ignore[type-var]


def test_record_init_does_not_touch_the_state_dict_and_survives_copies() -> None:
    model = nets.TinyNet([2, 2, 1], nn.ReLU())
    assert list(model.state_dict()) == ["body.0.weight", "body.0.bias", "head.weight", "head.bias"]
    assert capture(copy.deepcopy(model)) == capture(model)
    # A whole-model pickle carries the record with no registry class in it, and captures again.
    data = pickle.dumps(model, protocol=2)
    assert b"registry.spec" not in data
    assert capture(pickle.loads(data)) == capture(model)


# ---------------------------------------------------------------- capture refusals


def test_undecorated_user_class_says_how_to_supply_a_spec() -> None:
    with pytest.raises(SpecError, match="Plain.*neither a torch.nn built-in nor decorated") as info:
        capture(nn.Sequential(nets.Plain()))
    message = str(info.value)
    assert "model.0" in message
    assert "pass spec= explicitly" in message and "@registry.record_init" in message
    assert "REGISTRY_TRUSTED_MODULES" in message


def test_locally_defined_class_is_refused() -> None:
    @record_init
    class Local(nn.Module):
        def __init__(self, n: int) -> None:
            super().__init__()
            self.fc = nn.Linear(n, n)

    with pytest.raises(SpecError, match="defined inside a function.*pass spec= explicitly"):
        capture(Local(2))


def test_class_from_main_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(nets.Base, "__module__", "__main__")
    with pytest.raises(SpecError, match="defined in __main__"):
        capture(nets.Base(2))


def test_non_json_arguments_are_refused() -> None:
    with pytest.raises(SpecError, match=r"model.sizes\[0\]: the Tensor value .* is not JSON-able.*spec="):
        capture(nets.TinyNet([torch.tensor(2), 2, 1], nn.ReLU()))
    # A tensor argument kept as a buffer is no longer refused: the weights carry its values.
    assert capture(nn.CrossEntropyLoss(weight=torch.ones(3)))["kwargs"]["weight"] == {
        "tensor": {"dtype": "float32", "shape": [3]}}
    with pytest.raises(SpecError, match="model.dropout: the float value nan"):
        capture(nets.TinyNet([2, 2, 1], nn.ReLU(), dropout=float("nan")))


def test_builtins_that_keep_their_arguments_elsewhere_are_read_back() -> None:
    # TransformerEncoderLayer keeps neither d_model nor nhead as attributes: they are read from its parts.
    spec = capture(nn.TransformerEncoderLayer(8, 2, 16, activation="gelu", norm_first=True, bias=False))
    assert spec["kwargs"]["activation"] == {"target": "torch.nn.functional.gelu"}
    assert spec["kwargs"] | {"d_model": 8, "nhead": 2, "dim_feedforward": 16} == spec["kwargs"]
    assert capture(nn.PairwiseDistance(p=1.0))["kwargs"]["p"] == 1.0


def test_changes_after_construction_are_detected() -> None:
    model = nets.TinyNet([4, 3, 1], nn.GELU())
    model.body[1] = nn.ReLU()
    with pytest.raises(SpecError, match=r"builds model.body.1 as GELU where the model has model.body.1 as ReLU"):
        capture(model)
    model = nets.TinyNet([4, 3, 1], nn.GELU())
    model.body[2].p = 0.5
    with pytest.raises(SpecError, match=r"model.body.2 \(Dropout\) has p = 0.5, but its spec builds it with 0.0"):
        capture(model)
    model = nets.TinyNet([4, 3, 1], nn.GELU())
    model.extra = nn.Linear(1, 1)
    with pytest.raises(SpecError, match="state_dict does not match the architecture: missing keys: extra.weight"):
        capture(model)


def test_parametrized_and_subclassed_builtins_are_refused() -> None:
    linear = nn.utils.parametrizations.weight_norm(nn.Linear(3, 3))
    with pytest.raises(SpecError, match=r"parametrized .*remove_parametrizations\(model, 'weight'\)"):
        capture(linear)

    class MyLinear(nn.Linear):
        pass

    with pytest.raises(SpecError, match="MyLinear"):
        capture(MyLinear(2, 2))


def test_shared_module_arguments_are_refused() -> None:
    shared = nn.Linear(2, 2)
    with pytest.raises(SpecError, match=r"model.1 is the same module object as model.0 \(held twice\).*tie"):
        capture(nn.Sequential(shared, shared))


# ---------------------------------------------------------------- weights


def test_check_state_dict_names_the_differences() -> None:
    model = build(TUTORIAL, TORCH)
    good = {k: torch.empty(v.shape, device="meta") for k, v in model.state_dict().items()}
    check_state_dict(model, good)
    bad = dict(good)
    del bad["2.bias"]
    bad["0.weight"] = torch.empty(8, 128, device="meta")
    bad["extra"] = torch.empty(1)
    with pytest.raises(SpecError) as info:
        check_state_dict(model, bad)
    assert str(info.value) == (
        "state_dict does not match the architecture: missing keys: 2.bias; unexpected keys: extra; "
        "shape mismatch: 0.weight (expected [16, 128], got [8, 128])"
    )


def test_check_state_dict_truncates_long_lists() -> None:
    model = build(TUTORIAL, TORCH)
    with pytest.raises(SpecError, match=r"unexpected keys: k0, k1, k2, k3, k4, … and 3 more$"):
        check_state_dict(model, {**model.state_dict(), **{f"k{i}": torch.zeros(1) for i in range(8)}})
    with pytest.raises(SpecError, match=r"missing keys: 0.weight, 0.bias, 2.weight, 2.bias$"):
        check_state_dict(model, {})
    with pytest.raises(SpecError, match=r"shape mismatch: 2.bias \(expected \[1\], got a str\)$"):
        check_state_dict(model, {**model.state_dict(), "2.bias": "not a tensor"})  # type: ignore[dict-item]


def test_build_with_weights_refuses_mismatched_weights() -> None:
    weights = nn.Linear(8, 128).state_dict()
    with pytest.raises(SpecError, match=r"shape mismatch: 0.weight \(expected \[16, 128\], got \[128, 8\]\)"):
        build_with_weights(
            TUTORIAL,
            {**build(TUTORIAL, TORCH, device="cpu").state_dict(), "0.weight": weights["weight"]},
            TORCH,
        )


def test_build_with_weights_uses_the_given_tensors() -> None:
    model = nn.Sequential(nn.Linear(4, 4)).eval()
    state = model.state_dict()
    loaded = build_with_weights(capture(model), state, TORCH)
    assert loaded[0].weight.data_ptr() == state["0.weight"].data_ptr()


def test_non_persistent_state_is_rebuilt_for_real() -> None:
    torch.manual_seed(0)
    model = nets.WithBuffer(3)
    loaded = _round_trip(model, lambda m: m(_x(2, 3)), USER)
    assert torch.equal(loaded.scale, torch.tensor([1.0, 2.0, 3.0]))
    assert loaded.offset.device.type == "cpu"
    moved = build_with_weights(capture(model), model.state_dict(), USER, device="cpu")
    assert torch.equal(moved(_x(2, 3)), model(_x(2, 3)))


def test_tied_weights_stay_tied() -> None:
    torch.manual_seed(0)
    loaded = _round_trip(nets.Tied(10, 4), lambda m: m(torch.tensor([[1, 2, 3]])), USER)
    assert loaded.out.weight is loaded.embed.weight


def test_constructors_that_cannot_run_on_meta_build_for_real() -> None:
    torch.manual_seed(0)
    model = nets.DataDependent(3)
    loaded = _round_trip(model, lambda m: m(_x(2, 4)), USER)
    assert [layer.p for layer in loaded.layers] == [0.0, 0.25, 0.5]


@pytest.mark.parametrize("spec", [
    {"target": "torch.nn.MultiheadAttention", "kwargs": {"embed_dim": 5, "num_heads": 2}},  # AssertionError
    {"target": "torch.nn.Linear", "kwargs": {"in_features": -1, "out_features": 2}},  # RuntimeError
    {"target": "torch.nn.Embedding", "kwargs": {"num_embeddings": 3, "embedding_dim": 2, "padding_idx": 9}},
])
def test_constructor_failures_of_any_kind_are_spec_errors(spec: dict[str, Any]) -> None:
    with pytest.raises(SpecError, match="cannot construct"):
        build(spec, ["torch.nn"], device="cpu")
    with pytest.raises(SpecError, match="cannot construct"):
        skeleton(spec, ["torch.nn"])
