"""The Python API: every Registry method, on SQLite and local storage in tmp_path."""

from __future__ import annotations

import dataclasses
import hashlib
import inspect
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from torch import nn

import registry as registry_pkg
from registry import (
    AliasConflict,
    AliasInUse,
    AlreadyExists,
    Format,
    IntegrityError,
    InvalidName,
    InvalidReference,
    ModelVersion,
    NotFound,
    Registry,
    RegistryError,
    SpecError,
    StorageError,
)
from registry import errors as errors_mod
from registry import records as records_mod
from tests.helpers import TUTORIAL_SPEC, blob_path, flip_byte, registry_snapshot, tutorial_model
from tests.specmods import nets

X = torch.randn(4, 128, generator=torch.Generator().manual_seed(1))
SPECMODS = ["tests.specmods"]


def _out(model: nn.Module, x: torch.Tensor = X) -> torch.Tensor:
    with torch.no_grad():
        return model(x)


def _blobs(home: Path) -> list[Path]:
    return sorted(p for p in (home / "artifacts" / "blobs").rglob("*") if p.is_file())


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture
def trusting(home: Path) -> Iterator[Registry]:
    reg = Registry(trusted_modules=SPECMODS)
    yield reg
    reg.close()


# --- push ------------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["state_dict", "full", "torchscript"])
def test_push_module_in_each_format_round_trips(registry: Registry, home: Path, fmt: str) -> None:
    model = tutorial_model()
    mv = registry.push("tut", model, format=fmt, description="the tutorial", tags={"lr": "0.1"})
    assert (mv.name, mv.version, mv.format, mv.ref) == ("tut", 1, Format(fmt), "tut:1")
    stored = blob_path(home, mv.sha256)
    assert _sha(stored) == mv.sha256 and stored.stat().st_size == mv.size
    assert mv.description == "the tutorial" and mv.tags == {"lr": "0.1"}
    assert mv.created_by == "tester" and mv.torch_version and mv.python_version
    loaded = registry.load("tut")
    assert not any(m.training for m in loaded.modules()), "load must return the module in eval() mode"
    torch.testing.assert_close(_out(loaded), _out(model), rtol=0, atol=0)


def test_a_module_defaults_to_state_dict_with_its_spec_captured(registry: Registry) -> None:
    mv = registry.push("tut", tutorial_model())
    assert mv.format is Format.STATE_DICT
    assert mv.spec is not None and mv.spec["target"] == "torch.nn.Sequential"
    linear1, relu, linear2 = mv.spec["args"]
    assert linear1 == TUTORIAL_SPEC["args"][0] and linear2 == TUTORIAL_SPEC["args"][2]
    assert relu["target"] == "torch.nn.ReLU"


def test_full_push_records_the_pickle_globals(registry: Registry) -> None:
    mv = registry.push("tut", tutorial_model(), format="full")
    assert mv.spec is None
    assert {"torch.nn.modules.container.Sequential", "torch.nn.modules.linear.Linear",
            "torch.nn.modules.activation.ReLU"} <= set(mv.pickle_globals)


def test_push_files_detects_each_format(registry: Registry, tmp_path: Path) -> None:
    model = tutorial_model()
    torch.save(model, tmp_path / "whole.pt")
    torch.save(model.state_dict(), tmp_path / "params.pt")
    torch.jit.script(model).save(str(tmp_path / "scripted.pt"))
    full = registry.push("whole", tmp_path / "whole.pt")
    state = registry.push("params", str(tmp_path / "params.pt"), spec=TUTORIAL_SPEC)
    script = registry.push("scripted", tmp_path / "scripted.pt")
    assert (full.format, state.format, script.format) == (Format.FULL, Format.STATE_DICT, Format.TORCHSCRIPT)
    assert state.spec == TUTORIAL_SPEC
    assert full.sha256 == _sha(tmp_path / "whole.pt")
    for ref in ("whole", "params", "scripted"):
        torch.testing.assert_close(_out(registry.load(ref)), _out(model), rtol=0, atol=0)


def test_explicit_spec_for_a_user_class(trusting: Registry) -> None:
    model = nets.Plain()
    with pytest.raises(SpecError, match="spec="):  # undecorated: cannot be captured, never pickled instead
        trusting.push("plain", model)
    mv = trusting.push("plain", model, spec={"target": "tests.specmods.nets.Plain"})
    assert mv.spec == {"target": "tests.specmods.nets.Plain"} and mv.version == 1
    loaded = trusting.load("plain")
    assert type(loaded) is nets.Plain and not loaded.training
    x = torch.randn(3, 2)
    torch.testing.assert_close(loaded.fc(x), model.fc(x))


def test_record_init_class_from_a_trusted_module(trusting: Registry) -> None:
    assert registry_pkg.record_init is nets.record_init  # the documented entry point
    model = nets.TinyNet([4, 8, 2], nn.ReLU(), dropout=0.25)
    mv = trusting.push("tiny", model)
    assert mv.spec is not None and mv.spec["target"] == "tests.specmods.nets:TinyNet"
    assert mv.spec["kwargs"]["dropout"] == 0.25
    loaded = trusting.load("tiny")
    assert type(loaded) is nets.TinyNet
    assert not loaded.body[2].training  # Dropout off: eval() mode
    x = torch.randn(5, 4)
    torch.testing.assert_close(_out(loaded, x), _out(model.eval(), x))


def test_record_init_class_is_not_loaded_from_an_untrusted_module(trusting: Registry, home: Path) -> None:
    trusting.push("tiny", nets.TinyNet([2, 3, 1], nn.Tanh()))
    with Registry() as plain, pytest.raises(SpecError, match="tests.specmods.nets:TinyNet' is not trusted"):
        plain.load("tiny")


def test_push_with_alias_promotes_in_the_same_call(registry: Registry) -> None:
    mv = registry.push("tut", tutorial_model(), alias="staging")
    assert mv.aliases == ("staging",)
    (event,) = registry.history("tut")
    assert (event.alias, event.version, event.previous) == ("staging", 1, None)


@pytest.mark.parametrize("name", ["../x", "", "a b", "a/b", "x\n", "-x", "a" * 129, "é"])
def test_bad_names_are_refused_and_nothing_is_stored(registry: Registry, home: Path, name: str) -> None:
    before = registry_snapshot(home)
    with pytest.raises(InvalidName, match="invalid model name"):
        registry.push(name, tutorial_model())
    assert registry_snapshot(home) == before


def test_a_name_of_128_characters_is_fine(registry: Registry) -> None:
    assert registry.push("a" * 128, tutorial_model()).name == "a" * 128


# --- reading ---------------------------------------------------------------------------------


def test_get_models_versions_and_paging(registry: Registry) -> None:
    for _ in range(5):
        registry.push("a", tutorial_model())
    registry.push("b", tutorial_model(seed=1))
    registry.promote("a", 2)
    assert registry.get("a").version == 5
    assert registry.get("a:latest").version == 5
    assert registry.get("a:3").version == 3
    assert registry.get("a", version=4).version == 4
    assert registry.get("a@production").version == 2
    assert registry.get("a", alias="production").aliases == ("production",)

    summaries = registry.models()
    assert [(m.name, m.latest_version, m.version_count, m.aliases) for m in summaries] == [
        ("a", 5, 5, {"production": 2}), ("b", 1, 1, {})]

    assert [v.version for v in registry.versions("a")] == [5, 4, 3, 2, 1]
    assert [v.version for v in registry.versions("a", limit=2)] == [5, 4]
    assert [v.version for v in registry.versions("a", limit=2, before=4)] == [3, 2]
    assert [v.version for v in registry.versions("a", limit=2, before=2)] == [1]
    assert registry.versions("a", before=1) == []
    assert [v.aliases for v in registry.versions("a", before=3)] == [("production",), ()]


@pytest.mark.parametrize(
    ("ref", "kwargs", "error", "match"),
    [
        ("nope", {}, NotFound, "model 'nope' not found"),
        ("a:9", {}, NotFound, "version 'a:9' not found"),
        ("a", {"version": 9}, NotFound, "version 'a:9' not found"),
        ("a@staging", {}, NotFound, "alias 'a@staging' not found"),
        ("a:0", {}, InvalidReference, "must be a number >= 1"),
        ("a:x", {}, InvalidReference, "must be a number >= 1"),
        ("a:1", {"version": 1}, InvalidReference, "more than once"),
        ("a@bad alias", {}, InvalidName, "invalid alias"),
    ],
)
def test_get_errors(registry: Registry, ref: str, kwargs: dict[str, int], error: type, match: str) -> None:
    registry.push("a", tutorial_model())
    with pytest.raises(error, match=match):
        registry.get(ref, **kwargs)


def test_versions_of_an_unknown_model(registry: Registry) -> None:
    with pytest.raises(NotFound, match="model 'ghost' not found"):
        registry.versions("ghost")


def test_model_version_is_a_frozen_dataclass_usable_after_close(home: Path) -> None:
    reg = Registry()
    pushed = reg.push("tut", tutorial_model(), tags={"k": "v"})
    got = reg.get("tut")
    listed = reg.versions("tut")
    summaries = reg.models()
    reg.close()
    assert dataclasses.is_dataclass(ModelVersion) and isinstance(got, ModelVersion)
    assert got == pushed == listed[0]
    assert got.ref == "tut:1" and got.tags == {"k": "v"} and got.spec is not None
    data = got.to_json()
    assert data["name"] == "tut" and data["format"] == "state_dict" and data["version"] == 1
    assert summaries[0].to_json()["latest_version"] == 1
    with pytest.raises(dataclasses.FrozenInstanceError):
        got.version = 2  # type: ignore[misc]


# --- pull and load ---------------------------------------------------------------------------


def test_pull_default_name_to_a_dir_refuse_overwrite_and_force(
    registry: Registry, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    mv = registry.push("tut", tutorial_model(), format="full")
    monkeypatch.chdir(tmp_path)
    path = registry.pull("tut")
    assert path == tmp_path / "tut-v1.pt" and _sha(path) == mv.sha256

    out = tmp_path / "out"
    out.mkdir()
    assert registry.pull("tut:1", dest=out) == out / "tut-v1.pt"
    assert _sha(out / "tut-v1.pt") == mv.sha256

    target = tmp_path / "mine.pt"
    target.write_bytes(b"keep me")
    with pytest.raises(AlreadyExists, match="already exists; use --force"):
        registry.pull("tut", dest=target)
    assert target.read_bytes() == b"keep me"
    assert registry.pull("tut", dest=target, force=True) == target
    assert _sha(target) == mv.sha256
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.endswith(".part")) == []


def test_pull_by_alias_and_version(registry: Registry, tmp_path: Path) -> None:
    first = registry.push("tut", tutorial_model(seed=1))
    second = registry.push("tut", tutorial_model(seed=2))
    registry.promote("tut", 1)
    assert _sha(registry.pull("tut", alias="production", dest=tmp_path / "p.pt")) == first.sha256
    assert _sha(registry.pull("tut", version=2, dest=tmp_path / "v.pt")) == second.sha256


@pytest.mark.parametrize("fmt", ["state_dict", "full", "torchscript"])
def test_load_honours_map_location(registry: Registry, fmt: str) -> None:
    registry.push("tut", tutorial_model(), format=fmt)
    for location in ("cpu", torch.device("cpu")):
        loaded = registry.load("tut", map_location=location)
        assert {p.device.type for p in loaded.parameters()} == {"cpu"}
    on_meta = registry.load("tut", map_location="meta")
    assert {p.device.type for p in on_meta.parameters()} == {"meta"}
    assert not on_meta.training


def test_load_returns_eval_mode_even_if_pushed_in_training_mode(registry: Registry) -> None:
    model = nn.Sequential(nn.Linear(4, 4), nn.Dropout(0.5), nn.BatchNorm1d(4)).train()
    for fmt in ("state_dict", "full", "torchscript"):
        registry.push(f"m-{fmt}", model, format=fmt)
        loaded = registry.load(f"m-{fmt}")
        assert not any(m.training for m in loaded.modules()), fmt


# --- aliases ---------------------------------------------------------------------------------


def test_promote_demote_and_history(registry: Registry) -> None:
    for seed in range(3):
        registry.push("m", tutorial_model(seed=seed))
    first = registry.promote("m", 1, reason="initial")
    assert (first.alias, first.version, first.previous, first.user, first.reason) == (
        "production", 1, None, "tester", "initial")
    second = registry.promote("m", 2, reason="better")
    assert (second.version, second.previous, second.action) == (2, 1, "promote")
    registry.promote("m", 3, to="staging")
    assert registry.get("m@production").version == 2 and registry.get("m@staging").version == 3
    gone = registry.demote("m", "staging", reason="bad")
    assert (gone.version, gone.previous, gone.action, gone.reason) == (None, 3, "demote", "bad")
    with pytest.raises(NotFound, match="alias 'm@staging' not found"):
        registry.get("m@staging")
    with pytest.raises(NotFound, match="alias 'm@staging' not found"):
        registry.demote("m", "staging")

    events = registry.history("m")
    assert [(e.action, e.alias, e.version, e.previous, e.reason) for e in events] == [
        ("promote", "production", 1, None, "initial"),
        ("promote", "production", 2, 1, "better"),
        ("promote", "staging", 3, None, None),
        ("demote", "staging", None, 3, "bad"),
    ]
    assert all(e.user == "tester" and e.at.tzinfo is not None for e in events)
    assert [e.at for e in events] == sorted(e.at for e in events)


def test_user_is_overridable(home: Path) -> None:
    with Registry(user="alice") as reg:
        mv = reg.push("m", tutorial_model())
        assert mv.created_by == "alice"
        assert reg.promote("m", 1).user == "alice"


def test_promote_with_expect(registry: Registry, home: Path) -> None:
    for seed in range(3):
        registry.push("m", tutorial_model(seed=seed))
    assert registry.promote("m", 1, expect=None).previous is None  # nothing there yet: ok
    assert registry.promote("m", 2, expect=1).previous == 1

    before = registry_snapshot(home)
    with pytest.raises(AliasConflict, match=r"alias 'm@production' points at version 2, not nothing") as e:
        registry.promote("m", 3, expect=None)
    assert (e.value.expected, e.value.actual) == (None, 2)
    with pytest.raises(AliasConflict, match="points at version 2, not version 1; nothing changed") as e:
        registry.promote("m", 3, expect=1)
    assert (e.value.expected, e.value.actual) == (1, 2)
    with pytest.raises(AliasConflict, match="points at nothing, not version 1"):
        registry.promote("m", 3, to="staging", expect=1)
    assert registry_snapshot(home) == before
    assert registry.get("m@production").version == 2


def test_promote_errors(registry: Registry) -> None:
    registry.push("m", tutorial_model())
    with pytest.raises(NotFound, match="version 'm:2' not found"):
        registry.promote("m", 2)
    with pytest.raises(NotFound, match="model 'x' not found"):
        registry.promote("x", 1)
    with pytest.raises(InvalidName, match="invalid alias"):
        registry.promote("m", 1, to="../prod")
    assert registry.history("m") == []


# --- delete, verify, dedup -------------------------------------------------------------------


def test_delete_refuses_an_aliased_version_unless_forced(registry: Registry, home: Path) -> None:
    registry.push("m", tutorial_model(seed=1))
    registry.push("m", tutorial_model(seed=2))
    registry.promote("m", 1)
    registry.promote("m", 1, to="staging")
    before = registry_snapshot(home)
    with pytest.raises(AliasInUse, match="'m:1' is the target of alias production, staging"):
        registry.delete("m:1")
    assert registry_snapshot(home) == before

    deleted = registry.delete("m:1", force=True)
    assert deleted.version == 1 and deleted.aliases == ("production", "staging")
    assert not blob_path(home, deleted.sha256).exists()
    assert [v.version for v in registry.versions("m")] == [2]
    demotions = [e for e in registry.history("m") if e.action == "demote"]
    assert sorted((e.alias, e.previous, e.reason) for e in demotions) == [
        ("production", 1, "version 1 deleted"), ("staging", 1, "version 1 deleted")]
    with pytest.raises(NotFound):
        registry.get("m@production")


def test_delete_keeps_a_blob_another_version_uses(registry: Registry, home: Path, tmp_path: Path) -> None:
    model = tutorial_model()
    torch.save(model.state_dict(), tmp_path / "m.pt")
    a = registry.push("a", tmp_path / "m.pt", spec=TUTORIAL_SPEC)
    b = registry.push("b", tmp_path / "m.pt", spec=TUTORIAL_SPEC)  # identical bytes under another name
    assert a.sha256 == b.sha256 and len(_blobs(home)) == 1
    registry.delete("a")
    assert blob_path(home, b.sha256).exists()
    torch.testing.assert_close(_out(registry.load("b")), _out(model))
    registry.delete("b:1")
    assert _blobs(home) == []


def test_delete_unknown(registry: Registry) -> None:
    registry.push("m", tutorial_model())
    with pytest.raises(NotFound, match="version 'm:2' not found"):
        registry.delete("m:2")


def test_versions_are_never_reused(registry: Registry) -> None:
    for seed in range(3):
        registry.push("m", tutorial_model(seed=seed))
    registry.delete("m:3")
    assert registry.push("m", tutorial_model(seed=9)).version == 4
    for v in (1, 2, 4):
        registry.delete(f"m:{v}")
    assert registry.push("m", tutorial_model()).version == 5


def test_identical_bytes_are_stored_once(registry: Registry, home: Path, tmp_path: Path) -> None:
    path = tmp_path / "m.pt"
    torch.save(tutorial_model(), path)
    first = registry.push("m", path)
    second = registry.push("m", path)
    other = registry.push("other", path)
    assert first.sha256 == second.sha256 == other.sha256
    assert (first.version, second.version, other.version) == (1, 2, 1)
    assert _blobs(home) == [blob_path(home, first.sha256)]


def test_verify_finds_missing_and_corrupt_blobs(registry: Registry, home: Path) -> None:
    good = registry.push("good", tutorial_model(seed=1))
    lost = registry.push("lost", tutorial_model(seed=2))
    bad = registry.push("bad", tutorial_model(seed=3))
    assert registry.verify() == []
    blob_path(home, lost.sha256).unlink()
    flip_byte(blob_path(home, bad.sha256))
    problems = sorted(registry.verify(), key=lambda p: p.name)
    assert [(p.name, p.version, p.kind) for p in problems] == [("bad", 1, "corrupt"), ("lost", 1, "missing")]
    assert bad.sha256 in problems[0].detail and lost.sha256 in problems[1].detail
    assert registry.verify("good") == [] and good.version == 1
    assert [p.kind for p in registry.verify("bad")] == ["corrupt"]
    with pytest.raises(NotFound):
        registry.verify("nope")


def test_corrupt_and_missing_blobs_are_refused_on_pull_and_load(
    registry: Registry, home: Path, tmp_path: Path
) -> None:
    mv = registry.push("m", tutorial_model())
    blob = blob_path(home, mv.sha256)
    flip_byte(blob)
    actual = _sha(blob)
    for call in (lambda: registry.pull("m", dest=tmp_path / "x.pt"), lambda: registry.load("m")):
        with pytest.raises(IntegrityError, match=f"expected sha256 {mv.sha256}, got {actual}"):
            call()
    assert not (tmp_path / "x.pt").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []
    blob.unlink()
    with pytest.raises(StorageError, match="artifact m:1 is missing"):
        registry.load("m")


# --- configuration and public surface ----------------------------------------------------------


def test_constructor_arguments_override_the_environment(tmp_path: Path, home: Path) -> None:
    db, storage = tmp_path / "elsewhere" / "r.db", tmp_path / "store"
    with Registry(db=f"sqlite:///{db}", storage=storage) as reg:
        mv = reg.push("m", tutorial_model())
    assert db.exists() and (storage / "blobs" / "sha256" / mv.sha256[:2] / mv.sha256).exists()
    assert not home.exists()


def test_every_error_is_a_registry_error() -> None:
    classes = [c for _, c in inspect.getmembers(errors_mod, inspect.isclass) if c.__module__ == errors_mod.__name__]
    assert classes and all(issubclass(c, RegistryError) for c in classes)


def test_public_surface_is_sorted_and_complete() -> None:
    exported = registry_pkg.__all__
    assert exported == sorted(exported)
    for name in exported:
        assert getattr(registry_pkg, name) is not None
    errors = {n for n, c in inspect.getmembers(errors_mod, inspect.isclass) if c.__module__ == errors_mod.__name__}
    records = {n for n, c in inspect.getmembers(records_mod, inspect.isclass)
               if c.__module__ == records_mod.__name__ and not n.startswith("_")}
    assert errors | records | {"Registry", "record_init"} <= set(exported)
    namespace: dict[str, object] = {}
    exec("from registry import *", namespace)
    assert set(exported) <= set(namespace)
