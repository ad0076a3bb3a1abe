"""Parameters without pickle: safetensors files, their tensors' metadata, and tie-aware rebuilding from a spec.

safetensors stores every tensor once and refuses tensors that share memory, so a module whose parameters
are tied (an embedding and an output projection sharing one weight) is written with one name per shared
tensor (``safetensors.torch.save_model``). Which names are tied is a property of the architecture, so on
load it is read from the module the spec rebuilds, never from the file's free-form metadata: every name
of a tied group receives the one tensor the file holds, and the tie is restored as the same
``nn.Parameter`` object, so the weight is in memory once.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from registry.errors import FormatError, SpecError, one_line

if TYPE_CHECKING:
    import torch

#: safetensors dtype codes (the header's ``dtype``) and the torch dtype names they stand for.
_DTYPES = {
    "F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16", "I64": "int64", "I32": "int32",
    "I16": "int16", "I8": "int8", "U64": "uint64", "U32": "uint32", "U16": "uint16", "U8": "uint8",
    "BOOL": "bool", "C64": "complex64", "F8_E4M3": "float8_e4m3fn", "F8_E4M3FNUZ": "float8_e4m3fnuz",
    "F8_E5M2": "float8_e5m2", "F8_E5M2FNUZ": "float8_e5m2fnuz", "F8_E8M0": "float8_e8m0fnu",
}


def save(module: torch.nn.Module, path: Path) -> None:
    """Write ``module.state_dict()`` as safetensors, each shared tensor once under one of its names."""
    from safetensors.torch import save_model

    save_model(module, str(path), metadata={"format": "pt"})


def meta_tensors(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file as meta tensors, read from its header by safetensors itself.

    Raises:
        FormatError: the file is not a valid safetensors file or uses a dtype torch lacks.
    """
    import torch
    from safetensors import safe_open

    out: dict[str, torch.Tensor] = {}
    try:
        with safe_open(str(path), framework="pt") as f:
            for name in f.keys():
                view = f.get_slice(name)
                out[name] = torch.empty(view.get_shape(), dtype=_dtype(view.get_dtype(), name), device="meta")
    except FormatError:
        raise
    except Exception as e:  # safetensors raises its own SafetensorError for a bad header
        raise FormatError(f"{path.name} is not a loadable safetensors file: {one_line(e)}") from e
    return out


def tie_groups(module: torch.nn.Module) -> list[list[str]]:
    """Names of the state_dict entries that are one tensor in ``module`` (each group sorted, 2+ names)."""
    keys = set(module.state_dict(keep_vars=True))
    by_id: dict[int, list[str]] = {}
    named = [*module.named_parameters(remove_duplicate=False), *module.named_buffers(remove_duplicate=False)]
    for name, tensor in named:
        if name in keys:
            by_id.setdefault(id(tensor), []).append(name)
    return [sorted(set(names)) for names in by_id.values() if len(set(names)) > 1]


def expand_ties(
    tensors: Mapping[str, torch.Tensor], groups: Sequence[Sequence[str]], *, what: str
) -> dict[str, torch.Tensor]:
    """Give every name of a tied group the tensor the file holds for the group.

    A file may hold several names of a group (written without deduplication); they must then agree.

    Raises:
        SpecError: two names of one tied group hold different tensors.
    """
    import torch

    out = dict(tensors)
    for group in groups:
        present = [n for n in group if n in tensors]
        if not present:
            continue  # reported as missing keys by check_state_dict
        first = tensors[present[0]]
        for name in present[1:]:
            other = tensors[name]
            if other is first:
                continue
            same = other.shape == first.shape and other.dtype == first.dtype
            if same and not (first.is_meta or other.is_meta):
                same = torch.equal(other, first)
            if not same:
                raise SpecError(
                    f"{what}: {present[0]} and {name} are one shared tensor in the architecture, "
                    "but the file holds different values for them"
                )
        for name in group:
            out[name] = first
    return out


def check_ties(path: Path, groups: Sequence[Sequence[str]], *, what: str) -> None:
    """Where a file holds several names of one tied group, read just those tensors and require them equal.

    Raises:
        SpecError: they differ (the architecture would silently keep only one of them).
    """
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        stored = set(f.keys())
        for group in groups:
            present = [n for n in group if n in stored]
            if len(present) > 1:
                expand_ties({n: f.get_tensor(n) for n in present}, [present], what=what)


def load(
    path: Path,
    spec: Mapping[str, Any],
    trusted: Sequence[str],
    *,
    device: str | torch.device | None = None,
    artifact: str,
) -> torch.nn.Module:
    """Rebuild the module from its spec on meta and assign the file's tensors to it, ties restored.

    The tensors come from ``safetensors.torch.load_file``, which maps the file: on CPU, parameters are
    views of the mapped file (copy-on-write) and no second copy is made.

    Raises:
        SpecError: the spec is invalid or the tensors do not fit it.
        FormatError: the file is not valid safetensors.
    """
    from safetensors.torch import load_file

    from registry import spec as spec_mod

    module = spec_mod.skeleton(spec, trusted)
    groups = tie_groups(module)
    try:
        tensors = load_file(str(path), device=str(device) if device is not None else "cpu")
    except Exception as e:
        raise FormatError(f"cannot load {artifact}: {one_line(e)}") from e
    full = expand_ties(tensors, groups, what=artifact)
    spec_mod.check_state_dict(module, full)
    spec_mod.load_weights(module, full, assign=True)
    _retie(module, groups)
    if spec_mod.has_meta_tensors(module):
        # State the constructor computes outside the state_dict (non-persistent buffers, cached tensors)
        # was left on meta: build for real and copy the weights in instead.
        module = spec_mod.build(spec, trusted, device=device if device is not None else "cpu")
        spec_mod.load_weights(module, full, assign=False)
    return module.eval()


def _retie(module: torch.nn.Module, groups: Sequence[Sequence[str]]) -> None:
    """Make every name of a group refer to the same Parameter (or buffer) object again."""
    for group in groups:
        owner, _, leaf = group[0].rpartition(".")
        shared = getattr(module.get_submodule(owner), leaf)
        for name in group[1:]:
            owner, _, leaf = name.rpartition(".")
            setattr(module.get_submodule(owner), leaf, shared)


def _dtype(code: str, name: str) -> torch.dtype:
    import torch

    dtype = getattr(torch, _DTYPES.get(code, ""), None)
    if not isinstance(dtype, torch.dtype):
        raise FormatError(f"tensor {name!r} has dtype {code}, which this torch does not support")
    return dtype
