"""End to end: the installed ``registry`` command in subprocesses, and loads in fresh Python processes."""

from __future__ import annotations

import hashlib
import importlib
import json
import os
import shutil
import subprocess
import sys
import textwrap
import uuid
from pathlib import Path

import pytest
import torch
import torch.nn as nn

from registry import IntegrityError, Registry
from registry.db import SCHEMA_HEAD
from tests.helpers import (
    ROOT,
    TUTORIAL_SPEC,
    blob_path,
    flip_byte,
    fresh_python,
    registry_snapshot,
    run_registry,
    tutorial_model,
)

# What the tutorial prints for its model (../shared/reference/pytorch-save-load-tutorial.md).
TUTORIAL_PRINT = """Sequential(
  (0): Linear(in_features=128, out_features=16, bias=True)
  (1): ReLU()
  (2): Linear(in_features=16, out_features=1, bias=True)
)"""

# The tutorial's loading code, run in a fresh process on the files `registry pull` wrote, then the same
# three models through Registry().load. Only change: torch >= 2.6 needs weights_only=False for a whole model.
TUTORIAL_LOADS = """
import os

import torch
import torch.nn as nn

from registry import Registry

root = os.getcwd()
x = torch.load(os.path.join(root, "input.pt"), weights_only=True)
outputs = {}

# 加载整个模型
os.chdir(os.path.join(root, "pulled", "full"))
loaded_model = torch.load('sample_model.pt', weights_only=False)
print(loaded_model)
with torch.no_grad():
    outputs["full"] = loaded_model(x)

# 加载模型参数
os.chdir(os.path.join(root, "pulled", "params"))
loaded_model = nn.Sequential(nn.Linear(128, 16), nn.ReLU(), nn.Linear(16, 1))
loaded_model.load_state_dict(torch.load('sample_model.pt'))
print(loaded_model)
with torch.no_grad():
    outputs["params"] = loaded_model(x)

# 使用jit保存为TorchScript格式: 进行推理的代码
os.chdir(os.path.join(root, "pulled", "script"))
model = torch.jit.load('model_scripted.pt')
model.eval()
with torch.no_grad():
    outputs["script"] = model(x)

os.chdir(root)
with Registry() as reg:
    for name in ("tut-full", "tut-params", "tut-script"):
        loaded = reg.load(name)
        assert not loaded.training, name
        with torch.no_grad():
            outputs["registry " + name] = loaded(x)
torch.save(outputs, "outputs.pt")
"""


def _ok(proc: subprocess.CompletedProcess[str]) -> str:
    assert proc.returncode == 0, f"exit {proc.returncode}\nstdout: {proc.stdout}\nstderr: {proc.stderr}"
    return proc.stdout


def _fails(proc: subprocess.CompletedProcess[str], match: str) -> str:
    assert proc.returncode == 1, f"exit {proc.returncode}\nstdout: {proc.stdout}\nstderr: {proc.stderr}"
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and match in lines[0], proc.stderr
    return lines[0]


def test_the_tutorials_three_examples_exactly(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for folder in ("ex1", "ex2", "ex3", "pulled/full", "pulled/params", "pulled/script"):
        (tmp_path / folder).mkdir(parents=True)

    # Saved exactly as the tutorial saves them.
    monkeypatch.chdir(tmp_path / "ex1")
    net = nn.Sequential(nn.Linear(128, 16), nn.ReLU(), nn.Linear(16, 1))
    assert str(net) == TUTORIAL_PRINT
    torch.save(net, 'sample_model.pt')
    monkeypatch.chdir(tmp_path / "ex2")
    model = nn.Sequential(nn.Linear(128, 16), nn.ReLU(), nn.Linear(16, 1))
    torch.save(model.state_dict(), 'sample_model.pt')
    (tmp_path / "ex2" / "arch.json").write_text(json.dumps(TUTORIAL_SPEC))
    monkeypatch.chdir(tmp_path / "ex3")
    model_scripted = torch.jit.script(model)
    model_scripted.save('model_scripted.pt')
    monkeypatch.chdir(tmp_path)

    out = _ok(run_registry("push", "tut-full", "sample_model.pt", cwd=tmp_path / "ex1"))
    assert out.startswith("tut-full:1  full (detected)")
    out = _ok(run_registry("push", "tut-params", "sample_model.pt", "--arch", "arch.json", cwd=tmp_path / "ex2"))
    assert out.startswith("tut-params:1  state_dict (detected)")
    out = _ok(run_registry("push", "tut-script", "model_scripted.pt", cwd=tmp_path / "ex3"))
    assert out.startswith("tut-script:1  torchscript (detected)")

    for name, dest in (("tut-full", "pulled/full/sample_model.pt"), ("tut-params", "pulled/params/sample_model.pt"),
                       ("tut-script", "pulled/script/model_scripted.pt")):
        assert _ok(run_registry("pull", name, "-o", dest)).strip() == dest
    for src, dest in (("ex1/sample_model.pt", "pulled/full/sample_model.pt"),
                      ("ex2/sample_model.pt", "pulled/params/sample_model.pt"),
                      ("ex3/model_scripted.pt", "pulled/script/model_scripted.pt")):
        assert (tmp_path / src).read_bytes() == (tmp_path / dest).read_bytes()

    x = torch.randn(8, 128)
    torch.save(x, tmp_path / "input.pt")
    stdout = fresh_python(TUTORIAL_LOADS, cwd=tmp_path)
    assert stdout.count(TUTORIAL_PRINT) == 2
    outputs = torch.load(tmp_path / "outputs.pt", weights_only=True)
    with torch.no_grad():
        expected = {"full": net(x), "params": model(x), "script": model(x)}
    expected |= {f"registry tut-{k}": v for k, v in expected.items()}
    assert set(outputs) == set(expected)
    for key, value in expected.items():
        torch.testing.assert_close(outputs[key], value, msg=key)


USER_NET = """
import torch
from torch import nn


class ScaledNet(nn.Module):
    def __init__(self, features: int, scale: float = 1.0) -> None:
        super().__init__()
        self.fc = nn.Linear(features, 2)
        self.scale = scale

    def forward(self, x):
        return torch.tanh(self.fc(x)) * self.scale
"""


def test_state_dict_of_a_user_class_loads_in_a_fresh_process_through_trusted_modules(tmp_path: Path) -> None:
    mod = f"e2e_usernet_{uuid.uuid4().hex[:8]}"
    pkgs = tmp_path / "pkgs"
    pkgs.mkdir()
    (pkgs / f"{mod}.py").write_text(USER_NET)
    spec = {"target": f"{mod}:ScaledNet", "args": [3], "kwargs": {"scale": 2.0}}
    (tmp_path / "arch.json").write_text(json.dumps(spec))
    weights = {"fc.weight": torch.randn(2, 3), "fc.bias": torch.randn(2)}  # built here: the class is never imported
    torch.save(weights, tmp_path / "weights.pt")
    env = {"PYTHONPATH": str(pkgs), "REGISTRY_TRUSTED_MODULES": mod}

    _fails(run_registry("push", "usernet", "weights.pt", "--arch", "arch.json", cwd=tmp_path,
                        env={"PYTHONPATH": str(pkgs)}), match=f"spec target '{mod}:ScaledNet' is not trusted")
    _ok(run_registry("push", "usernet", "weights.pt", "--arch", "arch.json", cwd=tmp_path, env=env))

    x = torch.randn(5, 3)
    torch.save(x, tmp_path / "x.pt")
    code = textwrap.dedent(f"""
        import sys
        import torch
        from registry import Registry, UntrustedTarget

        try:
            Registry(trusted_modules=[]).load("usernet")
        except UntrustedTarget as e:
            print("refused:", e)
        assert {mod!r} not in sys.modules
        model = Registry().load("usernet")
        print(type(model).__module__, type(model).__name__, model.training, model.scale)
        with torch.no_grad():
            torch.save(model(torch.load("x.pt", weights_only=True)), "y.pt")
    """)
    out = fresh_python(code, env=env, cwd=tmp_path)
    assert f"refused: spec target '{mod}:ScaledNet' is not trusted" in out
    assert f"{mod} ScaledNet False 2.0" in out
    expected = torch.tanh(x @ weights["fc.weight"].T + weights["fc.bias"]) * 2.0
    torch.testing.assert_close(torch.load(tmp_path / "y.pt", weights_only=True), expected)
    assert mod not in sys.modules


SCRIPTED_NET = """
import torch
from torch import nn


class Gate(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.fc(x)
        if bool(h.sum() > 0):
            return torch.relu(h) * 3.0
        return h - 1.0
"""


def test_torchscript_loads_in_a_fresh_process_where_the_class_does_not_exist(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    mod = f"e2e_scripted_{uuid.uuid4().hex[:8]}"
    src = tmp_path / "src"
    src.mkdir()
    (src / f"{mod}.py").write_text(SCRIPTED_NET)
    monkeypatch.syspath_prepend(str(src))
    module = importlib.import_module(mod)
    try:
        net = module.Gate()
        torch.jit.script(net).save(str(tmp_path / "gate.pt"))
        x = torch.randn(6, 4)
        with torch.no_grad():
            expected = net(x)
    finally:
        sys.modules.pop(mod, None)
    shutil.rmtree(src)  # the class now exists nowhere

    _ok(run_registry("push", "gate", "gate.pt", cwd=tmp_path))
    _ok(run_registry("pull", "gate", "-o", "pulled.pt", cwd=tmp_path))
    torch.save(x, tmp_path / "x.pt")
    code = textwrap.dedent(f"""
        import importlib.util
        import torch
        from registry import Registry

        assert importlib.util.find_spec({mod!r}) is None
        x = torch.load("x.pt", weights_only=True)
        model = Registry().load("gate")
        assert not model.training
        plain = torch.jit.load("pulled.pt")
        plain.eval()
        with torch.no_grad():
            torch.save({{"registry": model(x), "pulled": plain(x)}}, "y.pt")
    """)
    fresh_python(code, cwd=tmp_path)
    outputs = torch.load(tmp_path / "y.pt", weights_only=True)
    torch.testing.assert_close(outputs["registry"], expected)
    torch.testing.assert_close(outputs["pulled"], expected)


def test_a_corrupted_blob_is_detected_by_pull_load_and_verify(registry: Registry, home: Path, tmp_path: Path) -> None:
    mv = registry.push("m", tutorial_model())
    blob = blob_path(home, mv.sha256)
    flip_byte(blob)
    actual = hashlib.sha256(blob.read_bytes()).hexdigest()
    before = registry_snapshot(home)

    line = _fails(run_registry("pull", "m", "-o", "m.pt", cwd=tmp_path), match="artifact m:1 is corrupt")
    assert f"expected sha256 {mv.sha256}, got {actual}" in line
    assert not (tmp_path / "m.pt").exists()
    with pytest.raises(IntegrityError, match=f"expected sha256 {mv.sha256}, got {actual}"):
        registry.load("m")
    proc = run_registry("verify")
    assert proc.returncode == 1 and proc.stderr == ""
    assert proc.stdout.strip() == f"m:1 corrupt: blob has sha256 {actual}, expected {mv.sha256}"
    assert registry_snapshot(home) == before


def test_every_command_group_through_the_installed_command(home: Path, tmp_path: Path) -> None:
    assert _ok(run_registry("--help")).startswith("Usage: registry")
    assert not home.exists()
    assert _ok(run_registry("db", "current")).strip() == f"none (head is {SCHEMA_HEAD})"
    assert _ok(run_registry("db", "upgrade")).strip() == f"schema at {SCHEMA_HEAD}"
    orphan = tmp_path / "orphan.bin"
    orphan.write_bytes(b"no version uses this")
    with Registry() as registry:
        for seed in range(2):
            registry.push("m", tutorial_model(seed=seed))
        orphan_sha = registry.store.put_file(orphan).sha256

    assert _ok(run_registry("list")).splitlines()[1].split() == ["m", "2", "2"]
    assert json.loads(_ok(run_registry("--json", "show", "m:1")))["version"] == 1
    assert _ok(run_registry("promote", "m", "--version", "1", "--reason", "e2e")).strip() == "m@production -> m:1"
    assert _ok(run_registry("demote", "m", "production")).strip() == "m@production removed (was m:1)"
    history = json.loads(_ok(run_registry("history", "m", "--json")))
    assert [(e["action"], e["reason"]) for e in history] == [("promote", "e2e"), ("demote", None)]
    assert _ok(run_registry("delete", "m:2")).strip() == "deleted m:2"
    assert _ok(run_registry("verify")).strip() == "all artifacts verified"
    assert f"removed blob {orphan_sha}" in _ok(run_registry("gc", "--grace", "0"))
    assert not blob_path(home, orphan_sha).exists()
    _fails(run_registry("show", "m:2"), match="version 'm:2' not found")


def test_quickstart_runs_green(tmp_path: Path) -> None:
    home = tmp_path / "qs-home"
    proc = subprocess.run(["bash", str(ROOT / "examples" / "quickstart.sh")], capture_output=True, text=True,
                          env={**os.environ, "REGISTRY_HOME": str(home), "TMPDIR": str(tmp_path)},
                          timeout=300)
    assert proc.returncode == 0, f"stdout: {proc.stdout}\nstderr: {proc.stderr}"
    assert "quickstart finished" in proc.stdout and "all artifacts verified" in proc.stdout
    assert sum(line.rstrip().endswith("ok") for line in proc.stdout.splitlines()) == 4
    with Registry(db=f"sqlite:///{home / 'registry.db'}", storage=home / "artifacts") as reg:
        assert {m.name for m in reg.models()} == {"tutorial", "tutorial-full", "tutorial-scripted"}
        assert reg.get("tutorial@production").format.value == "state_dict"
