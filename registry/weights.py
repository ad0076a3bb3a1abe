"""Parameters without pickle: safetensors files, their tensors' metadata, and the one rebuild path from a spec.

safetensors stores every tensor once and refuses tensors that share memory, so a module whose parameters
are tied (an embedding and an output projection sharing one weight) is written with one name per shared
tensor (``safetensors.torch.save_model``). Which names are tied is a property of the architecture, so on
load it is read from the module the spec rebuilds, never from the file's free-form metadata: every name
of a tied group receives the one tensor the file holds, and the tie is restored as the same
``nn.Parameter`` object, so the weight is in memory once.

:func:`rebuild` is how both state_dict and safetensors versions come back: built on meta where the
constructors allow, the file's tensors *assigned* (never copied into a fresh default-dtype module, which
would cast them), ties restored, and every tensor 64-byte aligned: MKL picks its kernels by alignment,
so a misaligned weight can give results that differ in the last bits from the live model's.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from registry.errors import FormatError, SpecError, translated

if TYPE_CHECKING:
    import torch

#: Byte alignment of every tensor a rebuilt module holds (the CPU allocator's; what MKL expects).
ALIGNMENT = 64
#: safetensors dtype codes (the header's ``dtype``) and the torch dtype names they stand for.
_DTYPES = {
    "F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16", "I64": "int64", "I32": "int32",
    "I16": "int16", "I8": "int8", "U64": "uint64", "U32": "uint32", "U16": "uint16", "U8": "uint8",
    "BOOL": "bool", "C64": "complex64", "F8_E4M3": "float8_e4m3fn", "F8_E4M3FNUZ": "float8_e4m3fnuz",
    "F8_E5M2": "float8_e5m2", "F8_E5M2FNUZ": "float8_e5m2fnuz", "F8_E8M0": "float8_e8m0fnu",
}


def save(module: torch.nn.Module, path: Path) -> None:
    """Write ``module.state_dict()`` as safetensors, each shared tensor once, laid out for alignment.

    The header is padded (JSON allows trailing spaces) so the data section starts 64-byte aligned, and
    tensors whose sizes are multiples of 64 bytes come first, so they start aligned too; the format
    allows no gaps between tensors, so only the odd-sized ones at the end may start unaligned.
    """
    from safetensors.torch import save_model

    plain = path.with_name(path.name + ".plain")
    try:
        save_model(module, str(plain), metadata={"format": "pt"})
        _realign(plain, path)
    finally:
        plain.unlink(missing_ok=True)


def _realign(source: Path, target: Path) -> None:
    import json
    import shutil
    import struct

    with open(source, "rb") as f:
        (size,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(size))
        start = 8 + size
        entries = [(k, v) for k, v in header.items() if k != "__metadata__"]
        width = {"F64": 8, "I64": 8, "U64": 8, "C64": 8, "F32": 4, "I32": 4, "U32": 4, "F16": 2, "BF16": 2,
                 "I16": 2, "U16": 2}

        def order(item: tuple[str, Any]) -> tuple[bool, int, int]:
            begin, end = item[1]["data_offsets"]
            return ((end - begin) % ALIGNMENT != 0, -width.get(item[1]["dtype"], 1), begin)

        entries.sort(key=order)
        layout: dict[str, Any] = {"__metadata__": header["__metadata__"]} if "__metadata__" in header else {}
        offset, spans = 0, []
        for name, info in entries:
            begin, end = info["data_offsets"]
            layout[name] = {**info, "data_offsets": [offset, offset + end - begin]}
            spans.append((begin, end))
            offset += end - begin
        text = json.dumps(layout, separators=(",", ":")).encode()
        text += b" " * (-(8 + len(text)) % ALIGNMENT)
        with open(target, "wb") as out:
            out.write(struct.pack("<Q", len(text)) + text)
            for begin, end in spans:
                f.seek(start + begin)
                shutil.copyfileobj(_Limited(f, end - begin), out)


class _Limited:
    """A file object that reads at most ``left`` more bytes (for copyfileobj)."""

    def __init__(self, f: Any, left: int) -> None:
        self.f, self.left = f, left

    def read(self, n: int = -1) -> bytes:
        n = self.left if n < 0 else min(n, self.left)
        data: bytes = self.f.read(n)
        self.left -= len(data)
        return data


def meta_tensors(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file as meta tensors, read from its header by safetensors itself.

    Raises:
        FormatError: the file is not a valid safetensors file or uses a dtype torch lacks.
    """
    import torch
    from safetensors import safe_open

    out: dict[str, torch.Tensor] = {}
    # safetensors raises its own SafetensorError for a bad header
    with translated(FormatError, f"{path.name} is not a loadable safetensors file", passthrough=(FormatError,)):
        with safe_open(str(path), framework="pt") as f:
            for name in f.keys():
                view = f.get_slice(name)
                out[name] = torch.empty(view.get_shape(), dtype=_dtype(view.get_dtype(), name), device="meta")
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
            if other is first or _same_memory(other, first):
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


def _same_memory(a: torch.Tensor, b: torch.Tensor) -> bool:
    # torch.load gives tied names separate tensors over one storage: equal without reading them.
    return not a.is_meta and a.device == b.device and a.dtype == b.dtype and a.shape == b.shape and \
        a.stride() == b.stride() and a.data_ptr() == b.data_ptr()


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
    """A safetensors file's module: its tensors mapped by ``safetensors.torch.load_file``, then :func:`rebuild`.

    On CPU, aligned parameters are views of the mapped file (copy-on-write): no second copy is made.

    Raises:
        SpecError: the spec is invalid or the tensors do not fit it.
        FormatError: the file is not valid safetensors.
    """
    from safetensors.torch import load_file

    with translated(FormatError, f"cannot load {artifact}"):
        tensors = load_file(str(path), device=str(device) if device is not None else "cpu")
    return rebuild(spec, tensors, trusted, device=device, what=artifact)


def rebuild(
    spec: Mapping[str, Any],
    tensors: Mapping[str, torch.Tensor],
    trusted: Sequence[str],
    *,
    device: str | torch.device | None = None,
    what: str,
) -> torch.nn.Module:
    """Build the module a spec describes and assign ``tensors`` to it: the one rebuild path.

    Built on meta and the tensors assigned, so dtypes are the file's and nothing is allocated twice. A
    module that needs a real construction (a constructor that reads tensor values, or state it computes
    outside the state_dict, such as non-persistent buffers) is built on ``device`` (cpu if None) and
    the tensors are still assigned, never copied in. Ties (the architecture's and those the spec's
    ``state`` records) are restored as one Parameter object; the spec's ``state`` restores flags and
    buffers; misaligned CPU tensors are copied to aligned memory.

    Args:
        device: where the module ends up; None leaves the tensors where they are.
        what: names the artifact in errors.

    Returns:
        The module, in eval mode.

    Raises:
        SpecError: the spec is invalid, or the tensors do not fit it.
        UntrustedTarget: a target is not trusted.
    """
    from registry import spec as spec_mod

    clean = spec_mod.validate(spec, trusted)
    real = device if device is not None else "cpu"
    module = spec_mod.build_on_meta(clean, trusted)
    on_meta = module is not None
    if module is None:
        module = spec_mod.build_clean(clean, trusted, real)
    groups = tie_groups(module)
    full = expand_ties(aligned(tensors), groups, what=what)
    spec_mod.check_state_dict(module, full)
    _assign(module, full, groups)
    if on_meta and spec_mod.has_meta_tensors(module):
        # State the constructor computes outside the state_dict was left on meta: construct for real.
        module = spec_mod.build_clean(clean, trusted, real)
        _assign(module, full, tie_groups(module))
    return (module if device is None else module.to(device)).eval()


def _assign(module: torch.nn.Module, tensors: Mapping[str, torch.Tensor], groups: Sequence[Sequence[str]]) -> None:
    from registry import spec as spec_mod

    spec_mod.load_weights(module, tensors, assign=True)
    retie(module, groups)


def aligned(tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The tensors, each CPU one that starts off a 64-byte boundary copied to aligned memory (once per tensor)."""
    import torch

    copies: dict[int, torch.Tensor] = {}
    out: dict[str, torch.Tensor] = {}
    for name, t in tensors.items():
        if isinstance(t, torch.Tensor) and t.device.type == "cpu" and t.numel() and t.data_ptr() % ALIGNMENT:
            if id(t) not in copies:
                copies[id(t)] = t.clone()  # the CPU allocator aligns to 64 bytes
            t = copies[id(t)]
        out[name] = t
    return out


def retie(module: torch.nn.Module, groups: Sequence[Sequence[str]]) -> None:
    """Make every name of a group refer to the same Parameter (or buffer) object again."""
    for group in groups:
        owner, _, leaf = group[0].rpartition(".")
        shared = getattr(module.get_submodule(owner), leaf)
        for name in group[1:]:
            owner, _, leaf = name.rpartition(".")
            setattr(module.get_submodule(owner), leaf, shared)


_retie = retie


def _dtype(code: str, name: str) -> torch.dtype:
    import torch

    dtype = getattr(torch, _DTYPES.get(code, ""), None)
    if not isinstance(dtype, torch.dtype):
        raise FormatError(f"tensor {name!r} has dtype {code}, which this torch does not support")
    return dtype
