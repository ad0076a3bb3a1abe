"""Format safety through the registry: what a push refuses, and what a load never unpickles."""

from __future__ import annotations

import importlib
import os
import sys
import textwrap
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from types import ModuleType

import pytest
import torch
from torch import nn

from registry import (
    Format,
    FormatError,
    ModelVersion,
    NotFound,
    Registry,
    RegistryError,
    SpecError,
    UntrustedPickle,
    UntrustedTarget,
)
from tests.helpers import TUTORIAL_SPEC, registry_snapshot, run_python, run_registry, tutorial_model

ModuleFactory = Callable[[str], ModuleType]

USER_NET = """
    import torch
    from torch import nn

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(3, 2)

        def forward(self, x):
            return torch.tanh(self.fc(x))
"""

# A callable that is not on any deny-list, so only the load-time allow-list stands between it and a marker.
MARKER_MAKER = """
    from pathlib import Path

    def touch(path):
        Path(path).write_text("pwned")
        return {}

    class Payload:
        def __init__(self, path):
            self.path = path

        def __reduce__(self):
            return touch, (self.path,)
"""


class _Evil:
    """Pickles as a call to os.system; only ever pickled here, never unpickled."""

    def __init__(self, command: str) -> None:
        self.command = command

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return os.system, (self.command,)


@pytest.fixture
def user_module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[ModuleFactory]:
    """Write a module under tmp_path (on sys.path) with a unique name; import it; forget it afterwards."""
    made: list[str] = []
    root = tmp_path / "usermods"
    root.mkdir()
    monkeypatch.syspath_prepend(str(root))

    def make(source: str, *, load: bool = True) -> ModuleType:
        name = f"usermod_{uuid.uuid4().hex[:10]}"
        (root / f"{name}.py").write_text(textwrap.dedent(source))
        made.append(name)
        importlib.invalidate_caches()
        return importlib.import_module(name) if load else ModuleType(name)

    yield make  # type: ignore[misc]
    for name in made:
        sys.modules.pop(name, None)


@pytest.fixture
def marker(tmp_path: Path) -> Path:
    return tmp_path / "MARKER"


def _sneak(reg: Registry, name: str, path: Path, fmt: Format, *, spec: dict | None = None) -> ModelVersion:
    """Store an artifact bypassing push's checks, as a compromised or older writer might have."""
    blob = reg.store.put_file(path)
    record = reg._commit_version(name, blob, fmt, spec, [], None, {}, None)
    assert record is not None
    return record


def _evil_archive(path: Path, payload: object) -> Path:
    torch.save({"weight": torch.zeros(2, 2), "bias": torch.zeros(2), "x": payload}, path)
    return path


# --- malicious pickles -----------------------------------------------------------------------


def test_os_system_pickle_is_refused_at_push(registry: Registry, home: Path, tmp_path: Path, marker: Path) -> None:
    evil = _evil_archive(tmp_path / "evil.pt", _Evil(f"touch {marker}"))
    before = registry_snapshot(home)
    for fmt in (None, "full"):
        with pytest.raises(UntrustedPickle, match=r"references posix\.system; no model needs these") as e:
            registry.push("evil", evil, format=fmt)
        assert e.value.globals_ == ("posix.system",)
    assert registry_snapshot(home) == before
    assert not marker.exists()


def test_a_file_rewritten_between_check_and_copy_is_refused(registry: Registry, tmp_path: Path, marker: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    good = tmp_path / "m.pt"
    torch.save(tutorial_model().state_dict(), good)
    evil = _evil_archive(tmp_path / "evil.pt", _Evil(f"touch {marker}"))
    real_put = type(registry.store).put_file

    def swap_then_put(store: object, source: Path, **kw: object) -> object:
        source.write_bytes(evil.read_bytes())  # the bytes change after they were checked
        return real_put(store, source, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(type(registry.store), "put_file", swap_then_put)
    with pytest.raises(FormatError, match="changed while it was being pushed"):
        registry.push("m", good, spec=TUTORIAL_SPEC)
    with pytest.raises(NotFound):
        registry.get("m")
    assert not marker.exists()


def test_os_system_pickle_is_refused_at_push_by_the_cli(cli, home: Path, tmp_path: Path, marker: Path) -> None:
    evil = _evil_archive(tmp_path / "evil.pt", _Evil(f"touch {marker}"))
    cli.fails("push", "evil", str(evil), match="posix.system")
    assert not marker.exists()
    assert registry_snapshot(home)["files"] == {}


def test_os_system_pickle_that_got_in_is_never_executed(
    registry: Registry, tmp_path: Path, marker: Path, cli, monkeypatch: pytest.MonkeyPatch
) -> None:
    evil = _evil_archive(tmp_path / "evil.pt", _Evil(f"touch {marker}"))
    full = _sneak(registry, "evil-full", evil, Format.FULL)
    state = _sneak(registry, "evil-state", evil, Format.STATE_DICT,
                   spec={"target": "torch.nn.Linear", "args": [2, 2]})
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")  # must not turn safety off
    with pytest.raises(UntrustedPickle, match="posix.system"):
        registry.load(full.ref)
    with pytest.raises(UntrustedPickle, match="posix.system"):
        registry.load(full.ref, trust_pickle=False)
    # Bytes that are not what the row records are refused before any unpickling, trust or not.
    with pytest.raises(FormatError, match="recorded as state_dict but its bytes are full"):
        registry.load(state.ref)
    with pytest.raises(FormatError, match="recorded as state_dict but its bytes are full"):
        registry.load(state.ref, trust_pickle=True)  # a state_dict is never unpickled unsafely
    registry.pull(full.ref, dest=tmp_path / "pulled.pt")
    cli.ok("show", full.ref)
    cli.ok("pull", state.ref, "-o", str(tmp_path / "pulled2.pt"))
    assert not marker.exists()


def test_marker_pickle_from_an_untrusted_module(
    registry: Registry, user_module: ModuleFactory, tmp_path: Path, marker: Path, cli,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    mod = user_module(MARKER_MAKER)
    path = _evil_archive(tmp_path / "payload.pt", mod.Payload(str(marker)))
    with pytest.raises(FormatError, match="declared state_dict but its bytes are full"):
        registry.push("payload", path, format="state_dict")
    # Outside the allow-list (torch.nn and the trusted modules): refused at push unless its author is trusted.
    with pytest.raises(UntrustedPickle, match=rf"references {mod.__name__}\.touch; .*--trust-code"):
        registry.push("payload", path)
    assert not marker.exists()
    mv = registry.push("payload", path, trust_code=True)  # not plainly dangerous: accepted, its globals recorded
    assert mv.format is Format.FULL and f"{mod.__name__}.touch" in mv.pickle_globals
    registry.pull("payload", dest=tmp_path / "pulled.pt")
    assert f"{mod.__name__}.touch" in cli.ok("show", "payload").stdout
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    with pytest.raises(UntrustedPickle, match=rf"references {mod.__name__}\.touch; .*--trust-code"):
        registry.load("payload")
    assert not marker.exists()
    # Control: the same artifact does run its code once the caller explicitly trusts it.
    with pytest.raises(FormatError, match="not an nn.Module"):
        registry.load("payload", trust_pickle=True)
    assert marker.read_text() == "pwned"


# --- whole models of user classes ------------------------------------------------------------


def test_full_model_of_an_untrusted_user_class(
    registry: Registry, user_module: ModuleFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    mod = user_module(USER_NET)
    model = mod.Net()
    with pytest.raises(UntrustedPickle, match=f"references {mod.__name__}.Net"):
        registry.push("user", model, format="full")
    mv = registry.push("user", model, format="full", trust_code=True)
    qualified = f"{mod.__name__}.Net"
    assert qualified in mv.pickle_globals
    x = torch.randn(4, 3)

    with pytest.raises(UntrustedPickle, match=rf"references {qualified}; add their module to REGISTRY_TRUSTED") as e:
        registry.load("user")
    assert e.value.globals_ == (qualified,)
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    with pytest.raises(UntrustedPickle):
        registry.load("user")
    monkeypatch.delenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD")

    trusted_load = registry.load("user", trust_pickle=True)
    assert type(trusted_load) is mod.Net and not trusted_load.training
    torch.testing.assert_close(trusted_load(x), model(x))

    with Registry(trusted_modules=[mod.__name__]) as reg:
        loaded = reg.load("user")
    assert type(loaded) is mod.Net and not loaded.training
    torch.testing.assert_close(loaded(x), model(x))

    monkeypatch.setenv("REGISTRY_TRUSTED_MODULES", f"somewhere.else, {mod.__name__}")
    with Registry() as reg:
        assert type(reg.load("user")) is mod.Net


def test_the_tutorial_full_model_loads_without_any_trust_flag(registry: Registry, tmp_path: Path) -> None:
    net = tutorial_model()
    torch.save(net, tmp_path / "sample_model.pt")
    registry.push("tut", tmp_path / "sample_model.pt")
    loaded = registry.load("tut")
    assert type(loaded) is nn.Sequential
    x = torch.randn(2, 128)
    torch.testing.assert_close(loaded(x), net(x))


def test_main_class_in_a_full_pickle_is_refused(
    registry: Registry, home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    main_net = type("MainNet", (nn.Module,), {"__module__": "__main__", "__qualname__": "MainNet"})
    monkeypatch.setattr(sys.modules["__main__"], "MainNet", main_net, raising=False)
    model = main_net()
    model.fc = nn.Linear(2, 2)
    torch.save(model, tmp_path / "main.pt")
    before = registry_snapshot(home)
    message = r"references __main__\.MainNet, defined in a script \(__main__\), which no other process can import"
    with pytest.raises(FormatError, match=message):
        registry.push("main", tmp_path / "main.pt")
    with pytest.raises(FormatError, match=message):
        registry.push("main", model, format="full")
    assert registry_snapshot(home) == before


# --- format and spec checks at push ----------------------------------------------------------


@pytest.mark.parametrize(("saved", "declared"), [
    ("torchscript", "state_dict"), ("full", "state_dict"), ("state_dict", "full"),
    ("torchscript", "full"), ("full", "torchscript"),
])
def test_declared_format_must_match_the_bytes(
    registry: Registry, home: Path, tmp_path: Path, saved: str, declared: str
) -> None:
    model, path = tutorial_model(), tmp_path / "m.pt"
    if saved == "torchscript":
        torch.jit.script(model).save(str(path))
    else:
        torch.save(model if saved == "full" else model.state_dict(), path)
    before = registry_snapshot(home)
    with pytest.raises(FormatError, match=f"declared {declared} but its bytes are {saved}"):
        registry.push("m", path, format=declared, spec=TUTORIAL_SPEC)
    assert registry_snapshot(home) == before


def test_state_dict_without_spec_is_refused_with_the_arch_hint(registry: Registry, home: Path, tmp_path: Path) -> None:
    torch.save(tutorial_model().state_dict(), tmp_path / "m.pt")
    with pytest.raises(SpecError, match=r"needs an architecture spec .*--arch SPEC\.json"):
        registry.push("m", tmp_path / "m.pt")
    assert registry_snapshot(home)["files"] == {}


@pytest.mark.parametrize(("model", "expected"), [
    (nn.Sequential(nn.Linear(128, 8), nn.ReLU(), nn.Linear(8, 1)),
     r"shape mismatch: 0\.weight \(expected \[16, 128\], got \[8, 128\]\), 0\.bias"),
    (nn.Sequential(nn.Linear(128, 16), nn.ReLU()), r"missing keys: 2\.weight, 2\.bias"),
    (nn.Sequential(nn.Linear(128, 16), nn.ReLU(), nn.Linear(16, 1), nn.Linear(1, 1)),
     r"unexpected keys: 3\.weight, 3\.bias"),
])
def test_state_dict_not_matching_the_spec_is_refused(
    registry: Registry, home: Path, tmp_path: Path, model: nn.Module, expected: str
) -> None:
    registry.push("m", tutorial_model())
    torch.save(model.state_dict(), tmp_path / "m.pt")
    before = registry_snapshot(home)
    with pytest.raises(SpecError, match=f"state_dict does not match the architecture: .*{expected}"):
        registry.push("m", tmp_path / "m.pt", spec=TUTORIAL_SPEC)
    assert registry_snapshot(home) == before
    assert not list((home / "artifacts" / "tmp").glob("*"))


@pytest.mark.parametrize("target", ["os.system", "torch.nn_evil.X", "torch.nn.__class__", "builtins.eval"])
def test_untrusted_spec_targets_are_refused(registry: Registry, home: Path, tmp_path: Path, target: str) -> None:
    torch.save(tutorial_model().state_dict(), tmp_path / "m.pt")
    before = registry_snapshot(home)
    for spec in ({"target": target}, {"target": "torch.nn.Sequential", "args": [{"target": target}]}):
        with pytest.raises(UntrustedTarget, match="is not trusted"):
            registry.push("m", tmp_path / "m.pt", spec=spec)
    assert registry_snapshot(home) == before


def test_untrusted_spec_target_is_refused_before_import(
    registry: Registry, user_module: ModuleFactory, tmp_path: Path, marker: Path
) -> None:
    mod = user_module(f"from pathlib import Path\nPath({str(marker)!r}).write_text('imported')\n", load=False)
    torch.save(nn.Linear(2, 2).state_dict(), tmp_path / "m.pt")
    with pytest.raises(UntrustedTarget, match=f"'{mod.__name__}.Net' is not trusted"):
        registry.push("m", tmp_path / "m.pt", spec={"target": f"{mod.__name__}.Net"})
    assert not marker.exists() and mod.__name__ not in sys.modules


def test_legacy_non_zip_torch_save_is_refused(registry: Registry, home: Path, tmp_path: Path) -> None:
    torch.save(tutorial_model().state_dict(), tmp_path / "old.pt", _use_new_zipfile_serialization=False)
    before = registry_snapshot(home)
    with pytest.raises(FormatError, match="legacy non-zip torch.save format"):
        registry.push("old", tmp_path / "old.pt", spec=TUTORIAL_SPEC)
    assert registry_snapshot(home) == before


@pytest.mark.parametrize("content", [b"", b"hello world", b"PK\x03\x04garbage"])
def test_files_that_are_not_models_are_refused(registry: Registry, tmp_path: Path, content: bytes) -> None:
    (tmp_path / "x.pt").write_bytes(content)
    with pytest.raises(FormatError):
        registry.push("x", tmp_path / "x.pt")


def test_every_refusal_is_a_registry_error(registry: Registry, tmp_path: Path) -> None:
    with pytest.raises(RegistryError, match="does not exist"):
        registry.push("x", tmp_path / "missing.pt")
    with pytest.raises(RegistryError, match="cannot push a dict"):
        registry.push("x", {"a": 1})  # type: ignore[arg-type]


# --- TorchScript warnings --------------------------------------------------------------------


def test_torchscript_deprecation_warnings_never_reach_the_user(tmp_path: Path) -> None:
    code = textwrap.dedent("""
        import torch
        from registry import Registry

        model = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.ReLU())
        with Registry() as reg:
            reg.push("s", model, format="torchscript")
            loaded = reg.load("s")
            print(type(loaded).__name__)
        scripted = torch.jit.script(model)  # control: the user's own call does warn
        scripted.save("own.pt")
    """)
    proc = run_python(code, cwd=tmp_path, flags=("-W", "default"))
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "RecursiveScriptModule"
    warnings_seen = [line for line in proc.stderr.splitlines() if "Warning" in line]
    assert len(warnings_seen) == 1 and "torch.jit.script` is deprecated" in warnings_seen[0], proc.stderr

    pushed = run_registry("push", "own", "own.pt", cwd=tmp_path, env={"PYTHONWARNINGS": "default"})
    assert pushed.returncode == 0, pushed.stderr
    assert "own:1  torchscript (detected)" in pushed.stdout
    assert "Warning" not in pushed.stderr, pushed.stderr
