"""Programs that are not data-only: TorchScript code and .pt2 graphs that reach files, and what ordinary models call."""

from __future__ import annotations

import io
import re
import warnings
import zipfile
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from torch import nn

from registry import operators, programs, pt2
from registry.errors import FormatError
from tests.helpers import fresh_python, setstate_archive, tutorial_model


def _script(module: nn.Module, path: Path) -> Path:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.jit.script(module).save(str(path))
    return path


def _jit_load(path: Path) -> torch.jit.ScriptModule:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return torch.jit.load(str(path))  # type: ignore[no-untyped-call]


def _rezip(src: Path, dst: Path, member: str, edit: Callable[[str], str]) -> Path:
    """Copy a zip, editing the text of the one member whose name matches the regex ``member``."""
    edited = 0
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w") as zout:
        for info in zin.infolist():
            data = zin.read(info)
            if re.fullmatch(member, info.filename):
                new = edit(data.decode()).encode()
                assert new != data, "the edit must change the member"
                data, edited = new, edited + 1
            zout.writestr(info, data)
    assert edited == 1
    return dst


def _problems(path: Path | io.BytesIO) -> str:
    return "\n".join(programs.vet_torchscript(path, "evil").problems)


# -- ordinary models ----------------------------------------------------------------------------


class _Branchy(nn.Module):
    """A custom module with control flow, a loop, a buffer and no_grad."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(4, 4), nn.Linear(4, 4)
        self.register_buffer("scale", torch.ones(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.a(x) if x.shape[0] > 1 else self.b(x)
        for i in range(3):
            y = y * self.scale + i
        with torch.no_grad():
            z = y.detach()
        return torch.softmax(y + z, dim=-1)


class _Buffered(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 4)
        self.register_buffer("running", torch.zeros(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin(x) - self.running


def _encoder() -> nn.Module:
    return nn.TransformerEncoder(nn.TransformerEncoderLayer(8, 2, dim_feedforward=16), 2, enable_nested_tensor=False)


ORDINARY: dict[str, tuple[Callable[[], nn.Module], tuple[torch.Tensor, ...]]] = {
    "tutorial_mlp": (tutorial_model, (torch.randn(2, 128),)),
    "conv_bn_pool_dropout": (lambda: nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.MaxPool2d(2),
                                                   nn.Dropout()), (torch.randn(2, 3, 8, 8),)),
    "lstm": (lambda: nn.LSTM(4, 4, num_layers=2), (torch.randn(3, 2, 4),)),
    "gru": (lambda: nn.GRU(4, 4, batch_first=True), (torch.randn(2, 3, 4),)),
    "embedding": (lambda: nn.Embedding(10, 4), (torch.tensor([[1, 2], [3, 4]]),)),
    "layer_norm": (lambda: nn.LayerNorm(4), (torch.randn(2, 4),)),
    "multihead_attention": (lambda: nn.MultiheadAttention(8, 2), (torch.randn(3, 2, 8),) * 3),
    "transformer_encoder_layer": (lambda: nn.TransformerEncoderLayer(8, 2, dim_feedforward=16),
                                  (torch.randn(3, 2, 8),)),
    "transformer_encoder": (_encoder, (torch.randn(3, 2, 8),)),
    "transformer": (lambda: nn.Transformer(8, 2, 1, 1, 16), (torch.randn(3, 2, 8), torch.randn(3, 2, 8))),
    "activations": (lambda: nn.Sequential(nn.GELU(), nn.SiLU(), nn.Softmax(dim=-1)), (torch.randn(2, 4),)),
    "conv1d_convtranspose2d": (lambda: nn.Sequential(nn.Conv1d(3, 4, 3), nn.Unflatten(2, (2, 3)),
                                                     nn.ConvTranspose2d(4, 2, 3)), (torch.randn(2, 3, 8),)),
    "upsample": (lambda: nn.Upsample(scale_factor=2, mode="bilinear"), (torch.randn(1, 3, 4, 4),)),
    "buffer": (_Buffered, (torch.randn(2, 4),)),
    "control_flow": (_Branchy, (torch.randn(2, 4),)),
}


@pytest.mark.fast
@pytest.mark.parametrize("name", sorted(ORDINARY))
def test_ordinary_torchscript_is_data_only(name: str, tmp_path: Path) -> None:
    make, inputs = ORDINARY[name]
    with warnings.catch_warnings():  # nn.Transformer warns about nested tensors
        warnings.simplefilter("ignore")
        model = make().eval()
    path = _script(model, tmp_path / f"{name}.pt")
    report = programs.vet_torchscript(path, name)
    assert report.problems == ()
    assert report.data_only and report.ops
    assert {op.split("::")[0] for op in report.ops} <= operators.ALLOWED_NAMESPACES
    # The scan reads what torch runs: the same archive loads and runs.
    loaded = _jit_load(path)
    if hasattr(loaded, "forward"):  # LSTM and Transformer keep only their overloads (forward__0 ...)
        loaded(*inputs)


@pytest.mark.fast
def test_ordinary_torchscript_from_an_open_file(tmp_path: Path) -> None:
    path = _script(tutorial_model(), tmp_path / "mlp.pt")
    with open(path, "rb") as f:
        report = programs.vet_torchscript(f, "mlp")
        assert not f.closed
    assert report == programs.ProgramReport(
        ops=("aten::linear", "aten::relu", "aten::relu_", "prim::GetAttr"), problems=())


@pytest.mark.fast
@pytest.mark.parametrize("name", sorted(set(ORDINARY) - {"control_flow"}))
def test_ordinary_exported_programs_pass(name: str, tmp_path: Path) -> None:
    make, inputs = ORDINARY[name]
    with warnings.catch_warnings():  # nn.Transformer warns about nested tensors, export about RNNs
        warnings.simplefilter("ignore")
        path = tmp_path / f"{name}.pt2"
        torch.export.save(torch.export.export(make().eval(), inputs), path)
    pt2.vet(path, label=name)
    ops = programs.export_operators(path)
    assert ops
    assert [op for op in ops if "::" in op and operators.effectful(op)] == []


@pytest.mark.fast
def test_exported_control_flow_passes(tmp_path: Path) -> None:
    class Cond(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.cond(x.sum() > 0, lambda t: t.relu(), lambda t: t.neg(), (x,))

    path = tmp_path / "cond.pt2"
    torch.export.save(torch.export.export(Cond(), (torch.randn(2, 4),)), path)
    ops = programs.export_operators(path)
    assert {"higher_order::cond", "aten::relu.default", "aten::neg.default"} <= set(ops)
    # (pt2.vet itself refuses this program for an unrelated reason: torch writes an empty name in it.)
    assert [op for op in ops if "::" in op and operators.export_target_problem(
        "torch.ops." + op.replace("::", "."))] == []


# -- TorchScript that writes files --------------------------------------------------------------


class _FromFile(nn.Module):
    def __init__(self, path: str) -> None:
        super().__init__()
        self.path = path

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = torch.from_file(self.path, shared=True, size=4, dtype=torch.uint8)
        t.fill_(65)
        return x + t[0]


class _Plain(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


_CODE = r".*/code/__torch__/.*\.py"


@pytest.fixture
def plain(tmp_path: Path) -> Path:
    return _script(_Plain(), tmp_path / "plain.pt")


def _with_line(plain: Path, dst: Path, line: str) -> Path:
    """The plain module with ``line`` (TorchScript source) run before forward returns."""
    return _rezip(plain, dst, _CODE, lambda s: s.replace("    return x\n", f"    {line}\n    return x\n"))


@pytest.mark.fast
def test_from_file_in_forward_is_flagged(tmp_path: Path) -> None:
    marker = tmp_path / "written"
    path = _script(_FromFile(str(marker)), tmp_path / "from_file.pt")
    assert re.search(r"line \d+: calls aten::from_file, which maps a file", _problems(path))
    # What the flag prevents: running the module writes the file.
    _jit_load(path)(torch.zeros(1))
    assert marker.read_bytes() == b"AAAA"


@pytest.mark.fast
def test_save_edited_into_the_code_is_flagged(plain: Path, tmp_path: Path) -> None:
    marker = tmp_path / "saved"
    path = _with_line(plain, tmp_path / "save.pt", f"_0 = torch.save(x, {str(marker)!r})")
    assert "calls aten::save, which writes a file" in _problems(path)
    # torch.save cannot be scripted, but torch compiles the edited source: aten::save writes the file.
    _jit_load(path)(torch.ones(1))
    assert marker.exists()


@pytest.mark.slow
def test_setstate_is_flagged_and_really_runs_at_load(tmp_path: Path) -> None:
    path, marker = setstate_archive(tmp_path)
    problems = _problems(path)
    assert "class SetState defines __setstate__ (torch.jit.load runs it while reading the archive)" in problems
    assert "calls aten::from_file" in problems
    fresh_python(f"import warnings, torch; warnings.simplefilter('ignore'); torch.jit.load({str(path)!r})")
    assert marker.read_bytes() == b"BB"


@pytest.mark.fast
@pytest.mark.parametrize(("line", "match"), [
    ('_0 = ops.aten.from_file("/tmp/x", True, 4)', "calls aten::from_file"),
    ('_0 = torch.autograd.from_file("/tmp/x", True, 4)', "calls aten::from_file"),
    ("_0 = torch.save", "calls aten::save"),  # an alias called later
    ('_0 = (x).save("/tmp/x")', "calls aten::save"),
    ('_0 = getattr(torch, "save")', "getattr on 'torch'"),
    ('_0 = getattr(x, "_load_later")(x)', "calls aten::_load_later, which may do I/O"),
    ("_0 = torch", "torch operator namespace is used as a value"),
    ("_0 = ops.myns.evil(x)", "calls myns::evil, which is in namespace 'myns' (not on the allow-list"),
    ("_0 = ops.profiler._record_function_enter(\"x\")", "namespace 'profiler'"),
    ("_0 = ops.prim.rpc_async(\"worker\", x)", "calls prim::rpc_async, which calls another process"),
    ("_0 = torch._load_everything(x)", "may do I/O (its name contains 'load')"),
    ("_0 = rpc_async(\"worker\", x)", "calls 'rpc_async', which is neither a TorchScript builtin"),
    ("_0 = annotate(__torch__.torch.classes.myns.Evil, None)", "__torch__.torch.classes.myns.Evil, a C++ custom"),
    ("_0 = x  # type: int", "contains comments"),
    ("_0 = x\t", "control characters"),
    ("_0 = x\r_1 = x", "control characters"),
    ("import os", "an import statement"),
    ("_0 = (x", "does not parse"),
])
def test_code_that_reaches_outside_is_flagged(plain: Path, tmp_path: Path, line: str, match: str) -> None:
    path = _with_line(plain, tmp_path / "evil.pt", line)
    assert match in _problems(path)


@pytest.mark.fast
def test_own_methods_named_like_operators_are_not_flagged(plain: Path, tmp_path: Path) -> None:
    # (self).load() inside a class that defines load is the class's method, not an operator.
    def edit(source: str) -> str:
        cls = re.search(r"self: (__torch__\.[\w.]+)", source)
        assert cls
        source = source.replace("    return x\n", "    _0 = (self).load(x, )\n    return x\n")
        return source + f"  def load(self: {cls.group(1)},\n    x: Tensor) -> Tensor:\n    return x\n"

    path = _rezip(plain, tmp_path / "own.pt", _CODE, edit)
    assert programs.vet_torchscript(path, "own").problems == ()
    _jit_load(path)(torch.ones(1))
    # A parameter named self that is not the method's first one is not the instance.
    shadow = _rezip(path, tmp_path / "shadow.pt", _CODE, lambda s: s.replace("(self).load(x, )", "(x).load(x, )"))
    assert "calls aten::load, which may do I/O" not in _problems(shadow)  # load is defined: taken for a method

    def rename(source: str) -> str:  # forward(this, self: Tensor) calls self.save; the class defines save
        source = source.replace("  def load(self:", "  def save(self:")
        source = source.replace("def forward(self:", "def forward(this:")
        return source.replace("    x: Tensor) -> Tensor:\n    _0 = (self).load(x, )",
                              "    self: Tensor) -> Tensor:\n    _0 = (self).save(\"/tmp/x\")")

    hidden = _rezip(path, tmp_path / "hidden.pt", _CODE, rename)
    assert "calls aten::save, which writes a file" in _problems(hidden)


@pytest.mark.fast
def test_custom_class_objects_in_the_pickle_are_flagged(tmp_path: Path) -> None:
    with warnings.catch_warnings():  # quantized tensors are deprecated
        warnings.simplefilter("ignore")
        path = _script(torch.ao.nn.quantized.Linear(4, 4), tmp_path / "q.pt")
    problems = _problems(path)
    assert "holds a __torch__.torch.classes.quantized.LinearPackedParamsBase object" in problems
    assert "namespace 'quantized'" in problems


@pytest.mark.fast
def test_a_file_that_is_not_a_zip_is_a_format_error(tmp_path: Path) -> None:
    path = tmp_path / "junk.pt"
    path.write_bytes(b"not a zip")
    with pytest.raises(FormatError, match="junk is not a readable TorchScript archive"):
        programs.vet_torchscript(path, "junk")


# -- .pt2 programs that write files --------------------------------------------------------------


@pytest.fixture
def linear_pt2(tmp_path: Path) -> Path:
    path = tmp_path / "lin.pt2"
    torch.export.save(torch.export.export(nn.Linear(4, 2), (torch.randn(8, 4),)), path)
    return path


@pytest.mark.fast
@pytest.mark.parametrize(("edit", "match"), [
    (lambda s: s.replace('"torch.ops.aten.linear.default"', '"torch.ops.aten.from_file.default"'),
     r"calls 'torch\.ops\.aten\.from_file\.default', which maps a file"),
    (lambda s: s.replace('"torch.ops.aten.linear.default"', '"torch.ops.aten.save.default"'), "writes a file"),
    (lambda s: s.replace('"torch.ops.aten.linear.default"', '"torch.ops.myns.evil.default"'), "namespace 'myns'"),
    (lambda s: s.replace('"torch.ops.aten.linear.default"', '"torch.ops.higher_order.auto_functionalized"'),
     "namespace 'higher_order'"),
    # An operator passed as an argument is resolved by getattr just like a target.
    (lambda s: s.replace('{"as_tensor": {"name": "p_bias"}}', '{"as_operator": "torch.ops.aten.from_file.default"}'),
     "aten.from_file.default', which maps a file"),
])
def test_pt2_calling_effectful_operators_is_refused(linear_pt2: Path, tmp_path: Path,
                                                    edit: Callable[[str], str], match: str) -> None:
    pt2.vet(linear_pt2, label="lin")
    evil = _rezip(linear_pt2, tmp_path / "evil.pt2", ".*/models/model.json", edit)
    with pytest.raises(FormatError, match=match):
        pt2.vet(evil, label="evil")


@pytest.mark.fast
def test_export_operators_lists_targets_and_operator_arguments(linear_pt2: Path, tmp_path: Path) -> None:
    assert programs.export_operators(linear_pt2) == ("aten::linear.default",)
    edited = _rezip(linear_pt2, tmp_path / "op.pt2", ".*/models/model.json", lambda s: s.replace(
        '{"as_tensor": {"name": "p_bias"}}', '{"as_operator": "torch.ops.aten.from_file.default"}'))
    assert programs.export_operators(edited) == ("aten::from_file.default", "aten::linear.default")


# -- the operator policy --------------------------------------------------------------------------

_PATHLIKE_ARG = re.compile(r"file|path|dir|url|fd$|socket|host|port$|addr")
_IO_NAME = {"save", "load", "file", "filename", "path", "dump", "write", "open", "socket", "rpc", "profile"}


@pytest.mark.fast
def test_every_operator_that_may_touch_files_is_effectful() -> None:
    schemas = torch._C._jit_get_all_schemas()
    missed = []
    for schema in schemas:
        op = f"{schema.name}.{schema.overload_name}" if schema.overload_name else schema.name
        words = set(schema.name.split("::")[1].lower().strip("_").split("_"))
        pathlike = any(str(a.type).startswith("str") and _PATHLIKE_ARG.search(a.name.lower())
                       for a in schema.arguments)
        if (pathlike or words & _IO_NAME) and operators.effectful(op) is None:
            missed.append(str(schema))
    assert missed == []
    for name in torch._C._dispatch_get_all_op_names():
        if set(name.split("::")[1].split(".")[0].lower().strip("_").split("_")) & _IO_NAME:
            assert operators.effectful(name), name


@pytest.mark.fast
def test_policy_lists_name_real_operators() -> None:
    known = {s.name for s in torch._C._jit_get_all_schemas()}
    assert set(operators.DENIED_OPS) <= known
    for name in known:
        if name.split("::")[0] not in operators.ALLOWED_NAMESPACES:
            assert operators.effectful(name), name
    for op in ("aten::linear", "aten::linear.default", "prim::Print", "aten::set_grad_enabled", "aten::warn"):
        assert operators.effectful(op) is None, op
    for op in ("quantized::linear", "c10d::broadcast_", "myns::op", "not an op"):
        assert operators.effectful(op), op


def test_vetting_does_not_import_torch() -> None:
    out = fresh_python("import sys, registry.programs, registry.operators; print('torch' in sys.modules)")
    assert out.strip() == "False"

