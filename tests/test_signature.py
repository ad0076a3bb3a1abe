"""Signatures: example inputs recorded with a push, shown, checked again later; their blob and migration."""

from __future__ import annotations

import json
import math
import textwrap
import uuid
from pathlib import Path

import pytest
import torch
from sqlalchemy import text
from torch import nn

from registry import FormatError, Registry
from registry import db as dbmod
from registry.signature import MAX_VALUES, compare, flatten, record
from registry.spec import capture
from tests.conftest import Cli
from tests.helpers import blob_path, registry_snapshot, run_registry, tutorial_model

X = torch.linspace(-1, 1, 2 * 128).reshape(2, 128)


def _sig(outputs: object, inputs: tuple[torch.Tensor, ...] = (torch.zeros(1),)) -> dict[str, object]:
    return record(inputs, outputs)


def test_push_with_example_records_and_shows_the_signature(tmp_path: Path, home: Path, cli: Cli) -> None:
    model = tutorial_model()
    torch.save(model.state_dict(), tmp_path / "m.pt")
    (tmp_path / "spec.json").write_text(json.dumps(capture(model)))
    torch.save(X, tmp_path / "x.pt")
    pushed = json.loads(cli.ok("--json", "push", "mlp", str(tmp_path / "m.pt"), "--arch", str(tmp_path / "spec.json"),
                               "--example", str(tmp_path / "x.pt")).stdout)
    sig = pushed["signature"]
    assert sig["inputs"] == [{"shape": [2, 128], "dtype": "float32"}]
    assert sig["outputs"][0]["path"] == "output" and sig["outputs"][0]["shape"] == [2, 1]
    assert sig["outputs"][0]["values"] == pytest.approx(model(X).flatten().tolist())
    assert sig["example"]["sha256"] == pushed["example_sha256"]
    assert blob_path(home, pushed["example_sha256"]).stat().st_size == sig["example"]["size"]
    shown = cli.ok("show", "mlp:1").stdout
    assert "signature:" in shown and "input 0: [2, 128] float32" in shown and "output: [2, 1] float32" in shown
    assert json.loads(cli.ok("--json", "show", "mlp:1").stdout)["signature"] == sig
    checked = cli.ok("check", "mlp:1").stdout
    assert "ok" in checked and "match the signature" in checked
    assert json.loads(cli.ok("--json", "check", "mlp:1").stdout)["ok"] is True
    cli.ok("push", "mlp", str(tmp_path / "m.pt"), "--arch", str(tmp_path / "spec.json"))
    cli.fails("check", "mlp:2", match="has no recorded signature; push it with --example FILE")


def test_check_fails_in_a_new_process_after_the_trusted_class_changed(
    tmp_path: Path, home: Path, cli: Cli, monkeypatch: pytest.MonkeyPatch
) -> None:
    modname = f"usermod_{uuid.uuid4().hex[:8]}"
    src = tmp_path / "src"
    src.mkdir()
    source = textwrap.dedent("""
        import torch
        from torch import nn
        from registry import record_init

        @record_init
        class Net(nn.Module):
            def __init__(self, width: int) -> None:
                super().__init__()
                self.fc = nn.Linear(width, 3)

            def forward(self, x):
                return {"logits": self.fc(x), "norm": x.norm(dim=1)}
    """)
    (src / f"{modname}.py").write_text(source)
    monkeypatch.syspath_prepend(str(src))
    module = __import__(modname)
    torch.manual_seed(0)
    with Registry(trusted_modules=[modname]) as reg:
        mv = reg.push("net", module.Net(5), example_inputs=torch.randn(4, 5))
    assert [o["path"] for o in mv.signature["outputs"]] == ["output['logits']", "output['norm']"]
    env = {"PYTHONPATH": str(src), "REGISTRY_TRUSTED_MODULES": modname}
    monkeypatch.setenv("REGISTRY_TRUSTED_MODULES", modname)
    assert "DRIFT" not in cli.ok("check", "net").stdout  # passes on the fresh version
    # The class's forward changes (a bug fix, a refactor, a new torch): the version no longer behaves as pushed.
    (src / f"{modname}.py").write_text(source.replace("self.fc(x)", "self.fc(x) * 1.01"))
    before = registry_snapshot(home)
    proc = run_registry("check", "net", env=env)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "DRIFT  output['logits']" in proc.stdout and "ok     output['norm']" in proc.stdout
    assert "outputs drifted from the signature" in proc.stdout
    loose = run_registry("--json", "check", "net", "--rtol", "0.05", env=env)
    assert loose.returncode == 0 and json.loads(loose.stdout)["drifted"] == []
    assert registry_snapshot(home) == before


def test_large_outputs_are_fingerprinted_and_compared(registry: Registry) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 40), nn.Tanh())
    x = torch.randn(5, 8)
    mv = registry.push("wide", model, example_inputs=x)
    (entry,) = mv.signature["outputs"]
    assert "values" not in entry and set(entry["fingerprint"]) >= {"sum", "abs_sum", "norm", "samples"}
    assert registry.check("wide").ok
    out = model(x).detach()
    assert compare("w", mv.signature, out * (1 + 1e-6)).ok  # within the default tolerance
    bumped = out.clone()
    bumped[2, 7] += 0.5  # one element, not necessarily a sampled one: the sums still catch it
    report = compare("w", mv.signature, bumped)
    assert not report.ok and report.drifted == ["output"]
    assert "sum" in report.outputs[0].detail


def test_compare_structure_scalars_and_non_finite_values() -> None:
    sig = _sig((torch.tensor([1.0, math.nan, math.inf]), 3, None, {"p": torch.ones(2, dtype=torch.int64)}))
    assert json.loads(json.dumps(sig)) == sig  # plain JSON, NaN/inf as strings
    assert [e["path"] for e in sig["outputs"]] == ["output[0]", "output[1]", "output[2]", "output[3]['p']"]
    same = (torch.tensor([1.0, math.nan, math.inf]), 3, None, {"p": torch.ones(2, dtype=torch.int64)})
    assert compare("m", sig, same).ok
    changed = (torch.tensor([1.0, 0.0, math.inf]), 4, None, {"p": torch.ones(2, dtype=torch.int32)})
    assert compare("m", sig, changed).drifted == ["output[0]", "output[1]", "output[3]['p']"]
    report = compare("m", sig, (torch.tensor([1.0, math.nan, math.inf]), 3))
    assert report.drifted == ["output[2]", "output[3]['p']"]
    assert "missing" in report.outputs[2].detail
    assert [p for p, _ in flatten([{"a": 1}, (2,)])] == ["output[0]['a']", "output[1][0]"]
    big = torch.arange(MAX_VALUES + 1, dtype=torch.float32)
    assert "fingerprint" in _sig(big)["outputs"][0]  # type: ignore[index]


def test_bad_example_files_are_refused(tmp_path: Path, home: Path, cli: Cli) -> None:
    torch.save(tutorial_model().state_dict(), tmp_path / "m.pt")
    torch.save({"x": 1}, tmp_path / "dict.pt")
    torch.save(nn.Linear(2, 2), tmp_path / "module.pt")
    torch.save(torch.zeros(2, 3), tmp_path / "wrong_shape.pt")
    arch = tmp_path / "spec.json"
    arch.write_text(json.dumps(capture(tutorial_model())))
    before = registry_snapshot(home)
    args = ("push", "mlp", str(tmp_path / "m.pt"), "--arch", str(arch), "--example")
    cli.fails(*args, str(tmp_path / "dict.pt"), match="must be a tensor or a non-empty tuple of tensors")
    cli.fails(*args, str(tmp_path / "module.pt"), match="is not a torch.save file of tensors")
    cli.fails(*args, str(tmp_path / "missing.pt"), match="cannot be read")
    cli.fails(*args, str(tmp_path / "wrong_shape.pt"), match="fails on its example inputs")
    assert registry_snapshot(home) == before
    with Registry() as reg, pytest.raises(FormatError, match="must be a tensor"):
        reg.push("mlp", tutorial_model(), example_inputs=[1, 2])


def test_example_blob_is_kept_while_used_and_removed_with_its_last_version(registry: Registry, home: Path) -> None:
    v1 = registry.push("mlp", tutorial_model(1), example_inputs=X)
    v2 = registry.push("mlp", tutorial_model(2), example_inputs=X)
    assert v1.example_sha256 == v2.example_sha256  # content-addressed: stored once
    example = blob_path(home, v1.example_sha256)
    from datetime import timedelta

    assert registry.gc(grace=timedelta(0)) == []
    registry.delete("mlp:1")
    assert example.exists()
    registry.delete("mlp:2")
    assert not example.exists()


def test_migration_0002_keeps_existing_versions(tmp_path: Path) -> None:
    engine = dbmod.make_engine(f"sqlite:///{tmp_path / 'r.db'}")
    dbmod.upgrade(engine, "0001")
    with engine.begin() as conn:
        conn.execute(text("INSERT INTO models (id, name, last_version, created_at) VALUES (1, 'm', 1, '2026-01-01')"))
        conn.execute(text(
            "INSERT INTO versions (id, model_id, version, format, sha256, size, spec, pickle_globals, tags, "
            "created_at, created_by, source) VALUES (1, 1, 1, 'state_dict', :sha, 3, NULL, '[]', '{}', "
            "'2026-01-01', 'u', NULL)"), {"sha": "a" * 64})
        conn.execute(text("INSERT INTO aliases (model_id, name, version_id) VALUES (1, 'production', 1)"))
    dbmod.upgrade(engine, "head")
    with engine.connect() as conn:
        row = conn.execute(text("SELECT sha256, signature, example_sha256 FROM versions")).one()
        assert tuple(row) == ("a" * 64, None, None)
        assert conn.execute(text("SELECT count(*) FROM aliases")).scalar() == 1
    dbmod.downgrade(engine, "0001")
    with engine.connect() as conn:
        assert conn.execute(text("SELECT sha256 FROM versions")).scalar() == "a" * 64
        assert conn.execute(text("SELECT count(*) FROM aliases")).scalar() == 1
    engine.dispose()


def test_registry_check_api_reports_failure_of_the_model(registry: Registry) -> None:
    model = tutorial_model()
    registry.push("mlp", model, example_inputs=X)
    report = registry.check("mlp", rtol=0, atol=0)
    assert report.ok and report.outputs[0].max_abs_diff == 0
    assert registry.example_inputs("mlp")[0].equal(X)
