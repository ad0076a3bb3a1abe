"""The export format (torch.export .pt2): push, pull, load without the class, and archives that are refused."""

from __future__ import annotations

import json
import re
import sys
import textwrap
import uuid
import zipfile
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from torch import nn

from registry import FormatError, Registry, UntrustedPickle
from registry.records import Format
from tests.conftest import Cli
from tests.helpers import fresh_python, registry_snapshot, tutorial_model

X = torch.linspace(-1, 1, 2 * 128).reshape(2, 128)


def load_export(path: Path, *, map_location: str | None, artifact: str) -> torch.nn.Module:
    """What a load of a planted ``export`` version does: vet the bytes, then load (registry.formats)."""
    from registry import formats
    from registry.records import Format

    return formats.load(path, Format.EXPORT, spec=None, trusted=("torch.nn",), map_location=map_location,
                        artifact=artifact)


@pytest.fixture(scope="module")
def dynamic_pt2(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny program with a dynamic batch dimension: its JSON carries symbolic expressions."""
    torch.manual_seed(0)
    program = torch.export.export(nn.Linear(4, 2), (torch.randn(8, 4),),
                                  dynamic_shapes=({0: torch.export.Dim("batch", min=2, max=64)},))
    path = tmp_path_factory.mktemp("pt2") / "lin.pt2"
    with open(path, "wb") as f:
        torch.export.save(program, f)
    return path


def _rewrite(src: Path, dst: Path, *, edit: dict[str, Callable[[bytes], bytes]] | None = None,
             add: dict[str, bytes] | None = None) -> Path:
    """Copy a .pt2, editing members (named below the root folder) and adding new ones."""
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w") as zout:
        root = zin.namelist()[0].split("/", 1)[0]
        for info in zin.infolist():
            rel = info.filename.split("/", 1)[1]
            data = zin.read(info)
            if edit and rel in edit:
                data = edit[rel](data)
            zout.writestr(info, data)
        for rel, data in (add or {}).items():
            zout.writestr(f"{root}/{rel}", data)
    return dst


def _edit_program(fn: Callable[[str], str]) -> dict[str, Callable[[bytes], bytes]]:
    return {"models/model.json": lambda b: fn(b.decode()).encode()}


def test_push_module_with_example_inputs_and_dynamic_shapes(registry: Registry) -> None:
    model = tutorial_model()
    batch = torch.export.Dim("batch", min=1, max=64)
    mv = registry.push("mlp", model, format="export", example_inputs=(X,), dynamic_shapes=({0: batch},))
    assert mv.format is Format.EXPORT and mv.spec is None and mv.signature is not None
    assert model.training  # exported in eval mode, the caller's module left as it was
    loaded = registry.load("mlp")
    assert isinstance(loaded, torch.fx.GraphModule)
    assert torch.equal(loaded(X), model.eval()(X))
    x7 = torch.randn(7, 128)
    assert torch.allclose(loaded(x7), model(x7))
    # Documented: the module ExportedProgram.module() returns refuses eval()/train(); load never calls it.
    with pytest.raises(NotImplementedError):
        loaded.eval()
    assert registry.check("mlp").ok
    assert torch.equal(registry.load("mlp", map_location="cpu")(X), loaded(X))


def test_push_exported_program_object(registry: Registry) -> None:
    model = tutorial_model(2).eval()
    program = torch.export.export(model, (X,))
    mv = registry.push("mlp", program)
    assert mv.format is Format.EXPORT
    assert torch.equal(registry.load("mlp")(X), model(X))
    with pytest.raises(FormatError, match="only be pushed as export"):
        registry.push("mlp", program, format="state_dict")


def test_export_needs_example_inputs_and_fails_in_one_line(registry: Registry, home: Path) -> None:
    before = registry_snapshot(home)
    with pytest.raises(FormatError, match="needs example inputs"):
        registry.push("mlp", tutorial_model(), format="export")

    class DataDependent(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            if x.sum() > 0:  # control flow on a value: torch.export cannot trace it
                return x * 2
            return x

    with pytest.raises(FormatError) as info:
        registry.push("dd", DataDependent(), format="export", example_inputs=torch.randn(3))
    assert str(info.value).startswith("cannot save the model as export: ") and "\n" not in str(info.value)
    assert registry_snapshot(home) == before


def test_pt2_file_is_detected_pulled_byte_equal_and_loads_without_its_class(
    tmp_path: Path, home: Path, cli: Cli, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The model class lives in a module that exists only while the program is exported.
    modname = f"gone_{uuid.uuid4().hex[:8]}"
    moddir = tmp_path / "src"
    moddir.mkdir()
    (moddir / f"{modname}.py").write_text(textwrap.dedent("""
        import torch
        from torch import nn

        class Net(nn.Module):
            def __init__(self):
                super().__init__()
                self.conv = nn.Conv2d(1, 2, 3)
                self.fc = nn.Linear(2 * 4 * 4, 3)

            def forward(self, x):
                return self.fc(torch.relu(self.conv(x)).flatten(1))
    """))
    monkeypatch.syspath_prepend(str(moddir))
    module = __import__(modname)
    torch.manual_seed(0)
    net = module.Net().eval()
    x = torch.randn(2, 1, 6, 6)
    path = tmp_path / "net.pt2"
    torch.export.save(torch.export.export(net, (x,)), path)
    torch.save(x, tmp_path / "x.pt")
    expected = net(x).flatten().tolist()
    (moddir / f"{modname}.py").unlink()
    del sys.modules[modname]

    out = cli.ok("push", "net", str(path), "--example", str(tmp_path / "x.pt")).stdout
    assert "export (detected)" in out
    pulled = tmp_path / "pulled.pt2"
    cli.ok("pull", "net", "-o", str(pulled))
    assert pulled.read_bytes() == path.read_bytes()
    code = textwrap.dedent(f"""
        import importlib.util, json, torch
        from registry import Registry
        assert importlib.util.find_spec({modname!r}) is None
        reg = Registry()
        m = reg.load("net")
        x = reg.example_inputs("net")[0]
        print(json.dumps(m(x).flatten().tolist()))
    """)
    assert json.loads(fresh_python(code)) == expected
    assert "DRIFT" not in cli.ok("check", "net").stdout


# -- archives torch.export.load must never see ------------------------------------------------


def _refused(path: Path, registry: Registry, home: Path, match: str,
             error: type[Exception] = FormatError) -> None:
    before = registry_snapshot(home)
    with pytest.raises(error, match=match):
        registry.push("evil", path)
    with pytest.raises(error, match=match):
        load_export(path, map_location=None, artifact="evil:1")
    assert registry_snapshot(home) == before


def test_symbolic_expression_code_is_refused(dynamic_pt2: Path, tmp_path: Path, registry: Registry,
                                             home: Path) -> None:
    marker = tmp_path / "MARKER"
    payload = f"__import__('pathlib').Path({str(marker)!r}).touch() or Symbol"
    evil = _rewrite(dynamic_pt2, tmp_path / "evil.pt2",
                    edit=_edit_program(lambda s: s.replace('"Symbol(', json.dumps(payload)[:-1] + "(", 1)))
    # What the vetting prevents: torch.export.load hands expr_str to sympy.sympify, which evaluates it.
    torch.export.load(evil)
    assert marker.exists()
    marker.unlink()
    _refused(evil, registry, home, "outside the expression grammar")
    assert not marker.exists()


@pytest.mark.parametrize(("name", "edit", "match"), [
    ("guards", lambda s: s.replace('"guards_code": []', '"guards_code": ["__import__(\'os\')"]'), "guard code"),
    ("import_module", lambda s: s.replace('"torch.ops.aten.linear.default"', '"torch.ops.import_module"'),
     "not a torch operator"),
    ("os", lambda s: s.replace('"torch.ops.aten.linear.default"', '"torch.os.system"'), "not a torch operator"),
    ("operator", lambda s: s.replace('"torch.ops.aten.linear.default"', '"_operator.attrgetter"'),
     "not a torch operator"),
    ("carriage_return", lambda s: re.sub(r'"stack_trace": "', r'"stack_trace": "x\\rimport os; ', s, count=1),
     "control characters"),
    ("input_name", lambda s: s.replace('"name": "input"', '"name": "x\\"); import os; (\\""'), "plain identifier"),
    ("sympy_builtin", lambda s: s.replace("Symbol(", "eval(", 1), "outside the expression grammar"),
])
def test_program_json_that_would_run_code_is_refused(
    dynamic_pt2: Path, tmp_path: Path, registry: Registry, home: Path,
    name: str, edit: Callable[[str], str], match: str,
) -> None:
    with zipfile.ZipFile(dynamic_pt2) as zf:
        text = zf.read(next(n for n in zf.namelist() if n.endswith("/models/model.json"))).decode()
    assert edit(text) != text, "the edit must change the program"
    evil = _rewrite(dynamic_pt2, tmp_path / f"{name}.pt2", edit=_edit_program(edit))
    _refused(evil, registry, home, match)


def test_custom_object_hidden_from_the_pickle_scan_is_refused(dynamic_pt2: Path, tmp_path: Path,
                                                              registry: Registry, home: Path) -> None:
    # torch.export.load unpickles opaque_obj_* members by name, whatever use_pickle says.
    config = {"config": {"c": {"path_name": "opaque_obj_0", "is_param": False, "use_pickle": False,
                               "tensor_meta": None}}}
    evil = _rewrite(dynamic_pt2, tmp_path / "opaque.pt2",
                    edit={"data/constants/model_constants_config.json": lambda _: json.dumps(config).encode()},
                    add={"data/constants/opaque_obj_0": b"cos\nsystem\n(S'true'\ntR."})
    _refused(evil, registry, home, "custom or opaque objects")


def test_pickled_weight_beyond_tensors_is_refused(dynamic_pt2: Path, tmp_path: Path, registry: Registry,
                                                  home: Path) -> None:
    # use_pickle weights go through torch.load(weights_only=False): only tensors may be in them.
    module_pickle = tmp_path / "module.pt"
    torch.save(nn.Identity(), module_pickle)

    def pickled(data: bytes) -> bytes:
        config = json.loads(data)
        config["config"]["weight"]["use_pickle"] = True
        return json.dumps(config).encode()

    evil = _rewrite(dynamic_pt2, tmp_path / "pickled.pt2",
                    edit={"data/weights/model_weights_config.json": pickled,
                          "data/weights/weight_0": lambda _: module_pickle.read_bytes()})
    _refused(evil, registry, home, "torch.nn.modules.linear.Identity|Identity", UntrustedPickle)


def test_unexpected_members_and_old_layouts_are_refused(dynamic_pt2: Path, tmp_path: Path, registry: Registry,
                                                        home: Path) -> None:
    # A valid pickle, so that the layout check is what refuses it.
    extra = _rewrite(dynamic_pt2, tmp_path / "extra.pt2", add={"data/mtia/blob": b"N."})
    _refused(extra, registry, home, "does not write for a plain program")
    legacy = tmp_path / "legacy.pt2"
    with zipfile.ZipFile(legacy, "w") as zf:
        zf.writestr("serialized_exported_program.json", "{}")
        zf.writestr("version", "8.0")
    _refused(legacy, registry, home, "pre-torch-2.8 .pt2 layout")


@pytest.mark.parametrize("payload", [
    b"cposix\nsystem\n(S'touch MARKER'\ntR.",  # protocol 0: no 0x80 byte, no .pkl name
    b"cbuiltins\neval\n(S'1'\ntR.",
    b"cmymod\nthing\n)R.",  # harmless-looking, but torch retries a failed weights_only load unrestricted
    b"not a pickle at all",
])
def test_sample_inputs_that_are_not_a_torch_save_zip_are_scanned_and_refused(
        dynamic_pt2: Path, tmp_path: Path, registry: Registry, home: Path, payload: bytes,
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    bad = _rewrite(dynamic_pt2, tmp_path / "inputs.pt2", edit={"data/sample_inputs/model.pt": lambda _: payload})
    before = registry_snapshot(home)
    with pytest.raises((FormatError, UntrustedPickle)):
        registry.push("evil", bad)
    assert registry_snapshot(home) == before
    with pytest.raises((FormatError, UntrustedPickle)):
        load_export(bad, map_location=None, artifact="evil:1")
    assert not (tmp_path / "MARKER").exists()
