"""Writing and loading each model format; the only module besides ``spec`` that imports torch."""

from __future__ import annotations

import importlib
import inspect
import pickle
import warnings
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from registry import pickles
from registry.errors import FormatError, UntrustedCode, UntrustedPickle, one_line, translated
from registry.records import Format
from registry.trust import components, has_dunder, is_trusted

if TYPE_CHECKING:
    import torch

#: File suffix of each format, for default pull destinations.
SUFFIX = {
    Format.STATE_DICT: ".pt",
    Format.FULL: ".pt",
    Format.TORCHSCRIPT: ".pt",
    Format.EXPORT: ".pt2",
    Format.SAFETENSORS: ".safetensors",
}


@contextmanager
def quiet_torchscript() -> Iterator[None]:
    """Hide TorchScript's deprecation warnings (PyTorch >= 2.10) for the calls we make on purpose."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=DeprecationWarning, message=r".*torch\.jit")
        warnings.filterwarnings("ignore", category=FutureWarning, message=r".*torch\.jit")
        warnings.filterwarnings("ignore", category=UserWarning, message=r".*TorchScript")
        yield


def save(
    model: Any,
    fmt: Format,
    path: Path,
    *,
    example_inputs: tuple[torch.Tensor, ...] | None = None,
    dynamic_shapes: Any = None,
) -> None:
    """Serialise a live module (or, for ``export``, an ExportedProgram) in ``fmt`` to ``path``.

    Args:
        example_inputs: what ``torch.export.export`` traces the module with (``export`` only).
        dynamic_shapes: passed to ``torch.export.export``.

    Raises:
        FormatError: the module cannot be written in that format (PyTorch's reason, one line).
    """
    import torch

    # torch raises many kinds here; the user needs its reason, not a trace
    with translated(FormatError, f"cannot save the model as {fmt.value}", passthrough=(FormatError,)):
        if fmt is Format.STATE_DICT:
            torch.save(model.state_dict(), path)
        elif fmt is Format.FULL:
            torch.save(model, path)
        elif fmt is Format.TORCHSCRIPT:
            with quiet_torchscript():
                scripted = model if isinstance(model, torch.jit.ScriptModule) else torch.jit.script(model)
                scripted.save(str(path))
        elif fmt is Format.EXPORT:
            from registry import exporting

            exporting.save(model, path, example_inputs, dynamic_shapes)
        elif fmt is Format.SAFETENSORS:
            from registry import weights

            weights.save(model, path)
        else:
            raise FormatError(f"pushing a live model as {fmt.value!r} is not supported")


def meta_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of a state_dict file as meta tensors: names, shapes and dtypes, no data read."""
    import torch

    with translated(FormatError, f"{path.name} is not a loadable state_dict"):
        obj = torch.load(path, map_location="meta", weights_only=True, mmap=True)
    return _as_state_dict(obj, path.name)


def meta_tensors(path: Path, fmt: Format) -> dict[str, torch.Tensor]:
    """Names, shapes and dtypes of the tensors of a state_dict or safetensors file, as meta tensors."""
    if fmt is Format.SAFETENSORS:
        from registry import weights

        return weights.meta_tensors(path)
    return meta_state_dict(path)


def vet(path: Path, fmt: Format, *, artifact: str, trust_code: bool = False) -> pickles.Detected:
    """Check, from the bytes alone, that what is about to be deserialised is the recorded format and runs nothing.

    Run on the very file the loader reads (see :mod:`registry.blobfile`), at every load: the archive
    must be unambiguous (one reading for every zip reader), its pickles are scanned again, a
    TorchScript program must be data-only unless ``trust_code``, and a ``.pt2`` must pass
    :func:`registry.pt2.vet` (no flag lifts that: ``torch.export.load`` unpickles without restriction).

    Raises:
        FormatError, UntrustedPickle, UntrustedCode.
    """
    detected = pickles.detect(path, label=artifact)
    if detected.format is not fmt:
        raise FormatError(f"{artifact} is recorded as {fmt.value} but its bytes are {detected.format.value}; "
                          "refused (the stored artifact does not match its record)")
    if fmt is Format.TORCHSCRIPT and not trust_code:
        from registry import programs

        report = programs.vet_torchscript(path, artifact)
        if report.problems:
            raise UntrustedCode(artifact, report.problems)
    elif fmt is Format.EXPORT:
        from registry import pt2

        pt2.vet(path, label=artifact, detected=detected)
    return detected


def load(
    path: Path,
    fmt: Format,
    *,
    spec: Mapping[str, Any] | None,
    trusted: Sequence[str],
    map_location: str | torch.device | None = None,
    trust_code: bool = False,
    artifact: str,
) -> torch.nn.Module:
    """Vet, then deserialise verified bytes into a module in eval() mode.

    Nothing here runs code from the artifact: state_dicts load with ``weights_only=True``; whole
    models load with ``weights_only=True`` plus the trusted globals they reference; TorchScript only
    when its program is data-only (see :func:`vet`) -- unless ``trust_code`` is given explicitly. A
    failed safe load never falls back to an unsafe one.
    """
    import torch

    vet(path, fmt, artifact=artifact, trust_code=trust_code)
    location = map_location if map_location is not None else "cpu"
    if fmt is Format.EXPORT:
        from registry import exporting

        # ExportedProgram.module() refuses .eval() and .train() (NotImplementedError in torch 2.13):
        # its train/eval behaviour was fixed when the program was exported.
        return exporting.load(path, map_location=map_location, artifact=artifact)
    if fmt is Format.SAFETENSORS:
        from registry import weights

        if spec is None:
            raise FormatError(f"{artifact} is a safetensors file without an architecture spec")
        return weights.load(path, spec, trusted, device=map_location, artifact=artifact)
    if fmt is Format.STATE_DICT:
        if spec is None:
            raise FormatError(f"{artifact} is a state_dict without an architecture spec")
        try:
            with translated(FormatError, f"cannot load {artifact}", passthrough=(pickle.UnpicklingError,)):
                obj = torch.load(path, map_location=location, weights_only=True, mmap=True)
        except pickle.UnpicklingError as e:  # weights_only refused a global: name it, never retry unsafely
            raise UntrustedPickle(f"{artifact} is a state_dict whose pickle", _unsafe_globals(path),
                                  hint="a state_dict holds only tensors; push it again from a trusted copy") from e
        from registry import weights

        module = weights.rebuild(spec, _as_state_dict(obj, artifact), trusted, device=map_location, what=artifact)
    elif fmt is Format.FULL:
        module = _load_full(path, trusted, location, trust_code, artifact)
    elif fmt is Format.TORCHSCRIPT:
        # a bad device or damaged code: torch's reason, in one line
        with translated(FormatError, f"cannot load {artifact}"), quiet_torchscript():
            module = torch.jit.load(str(path), map_location=location)  # type: ignore[no-untyped-call]
    else:
        raise FormatError(f"{artifact} has format {fmt.value!r}, which this version cannot load")
    return module.eval()


def _load_full(
    path: Path, trusted: Sequence[str], location: Any, trust_code: bool, artifact: str
) -> torch.nn.Module:
    import torch

    # The globals outside what weights_only already allows (tensor rebuilds, containers).
    needed = torch.serialization.get_unsafe_globals_in_checkpoint(path)
    allowed: list[Any] = []
    untrusted: list[str] = []
    for name in needed:
        obj = _trusted_global(name, trusted)
        if obj is None:
            untrusted.append(name)
        else:
            allowed.append(obj)
    if untrusted and not trust_code:
        raise UntrustedPickle(
            f"{artifact} is a whole-model pickle that",
            untrusted,
            hint="add their module to REGISTRY_TRUSTED_MODULES, or pass --trust-code "
            "(trust_code=True) only if you trust whoever pushed it",
        )
    with translated(FormatError, f"cannot load {artifact}"):
        if untrusted:  # the caller said, explicitly, that this pickle may run code
            obj = torch.load(path, map_location=location, weights_only=False)
        else:
            with torch.serialization.safe_globals(allowed):
                obj = torch.load(path, map_location=location, weights_only=True, mmap=True)
    if not isinstance(obj, torch.nn.Module):
        raise FormatError(f"{artifact} holds a {type(obj).__name__}, not an nn.Module")
    return obj


def _trusted_global(name: str, trusted: Sequence[str]) -> Any:
    """Resolve a pickle global to a class or function defined under a trusted prefix; None if it is not one.

    Only trusted modules are imported. Besides classes, functions count (``activation=F.relu``), and the
    pure tensor functions of :data:`pickles.TORCH_C_FUNCTIONS`, which torch defines in C.
    """
    if name in pickles.TORCH_C_FUNCTIONS:
        import torch

        obj: Any = torch
        for attr in name.split(".")[1:]:
            obj = getattr(obj, attr, None)
        return obj if callable(obj) else None
    parts = components(name)
    if not parts or has_dunder(name) or not is_trusted(name, trusted):
        return None
    for cut in range(len(parts) - 1, 0, -1):
        module_name = ".".join(parts[:cut])
        if not is_trusted(module_name, trusted):
            return None
        try:
            obj = importlib.import_module(module_name)
        except ModuleNotFoundError as e:
            if e.name is not None and module_name.startswith(e.name) and cut > 1:
                continue  # maybe the name continues into the module: try a shorter prefix
            raise FormatError(f"{name} is trusted but its module cannot be imported here ({one_line(e)}); "
                              "install it or put it on PYTHONPATH") from e
        except ImportError as e:
            raise FormatError(f"{name} is trusted but its module fails to import ({one_line(e)})") from e
        try:
            for attr in parts[cut:]:
                obj = getattr(obj, attr)
        except AttributeError:
            return None
        # Only classes and functions defined in trusted code: blocks trusted modules re-exporting e.g. os or eval.
        if (isinstance(obj, type) or inspect.isfunction(obj)) and \
                is_trusted(f"{obj.__module__}.{obj.__qualname__}", trusted):
            return obj
        return None
    return None


def _as_state_dict(obj: object, what: str) -> dict[str, torch.Tensor]:
    import torch

    if not isinstance(obj, Mapping) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()
    ):
        raise FormatError(f"{what} is not a state_dict (a mapping of names to tensors)")
    return dict(obj)


def _unsafe_globals(path: Path) -> list[str]:
    import torch

    try:
        return torch.serialization.get_unsafe_globals_in_checkpoint(path) or ["an unknown global"]
    except Exception:  # the opcode walk failed too: still refuse, just without the names
        return ["an unknown global"]
