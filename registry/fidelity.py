"""What a spec rebuilds beyond the constructor: recording it from a live module, restoring it, and checking the result.

A spec says how to construct a module; a pushed model may differ from a fresh construction in ways
its weights file does not carry: parameters tied after ``__init__`` (``seq[2].weight = seq[0].weight``),
``requires_grad`` flags (``Embedding.from_pretrained(freeze=True)``) and non-persistent buffers changed
after ``__init__``. :func:`seal` records those in the spec's ``state`` at push and then verifies, on
meta, that the spec rebuilds the live module: structure, dtypes, flags, ties and the constructor-level
attributes of every submodule. Whatever it cannot keep is refused, naming the property, the
submodule and the way out.
"""

from __future__ import annotations

import types
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from registry.errors import SpecError
from registry.spec import dtype_name

if TYPE_CHECKING:
    from collections.abc import Sequence

    import torch

    from registry.records import Format

#: Largest non-persistent buffer whose value a spec keeps inline (raw bytes, before base64).
MAX_INLINE_BUFFER = 4096
_STATE_KEYS = ("ties", "requires_grad", "buffers")
#: Keys every nn.Module has in its __dict__: torch's bookkeeping, not constructor-level attributes.
_MODULE_KEYS = frozenset((
    "training", "_parameters", "_buffers", "_non_persistent_buffers_set", "_backward_pre_hooks",
    "_backward_hooks", "_is_full_backward_hook", "_forward_hooks", "_forward_hooks_with_kwargs",
    "_forward_hooks_always_called", "_forward_pre_hooks", "_forward_pre_hooks_with_kwargs", "_state_dict_hooks",
    "_state_dict_pre_hooks", "_load_state_dict_pre_hooks", "_load_state_dict_post_hooks", "_modules",
    "_registry_init", "_compiled_call_impl",
))


def clean_state(state: object, path: str) -> dict[str, Any]:
    if not isinstance(state, Mapping):
        raise SpecError(f"{path}: expected an object, got {type(state).__name__}")
    unknown = [k for k in state if k not in _STATE_KEYS]
    if unknown:
        raise SpecError(f"{path}: unknown key(s) {', '.join(map(repr, unknown))}; it has only {', '.join(_STATE_KEYS)}")
    out: dict[str, Any] = {}
    ties = state.get("ties", [])
    if not isinstance(ties, list) or not all(
        isinstance(g, list) and len(g) > 1 and all(isinstance(n, str) for n in g) for g in ties
    ):
        raise SpecError(f"{path}.ties: expected a list of lists of two or more state_dict names")
    if ties:
        out["ties"] = [[str.__str__(n) for n in g] for g in ties]
    flags = state.get("requires_grad", {})
    if not isinstance(flags, Mapping) or not all(isinstance(k, str) and isinstance(v, bool) for k, v in flags.items()):
        raise SpecError(f"{path}.requires_grad: expected an object of parameter names to true/false")
    if flags:
        out["requires_grad"] = {str.__str__(k): bool(v) for k, v in flags.items()}
    buffers = state.get("buffers", {})
    if not isinstance(buffers, Mapping):
        raise SpecError(f"{path}.buffers: expected an object of buffer names")
    clean_buffers: dict[str, Any] = {}
    for name, entry in buffers.items():
        where = f"{path}.buffers[{name!r}]"
        ok = isinstance(name, str) and isinstance(entry, Mapping) and set(entry) == {"dtype", "shape", "data"}
        if not ok or not isinstance(entry["data"], str) or not isinstance(entry["shape"], list) \
                or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in entry["shape"]):
            raise SpecError(f"{where}: expected {{'dtype': name, 'shape': [sizes], 'data': base64}}")
        dtype_name(entry["dtype"], f"{where}.dtype")
        clean_buffers[str.__str__(name)] = {"dtype": entry["dtype"], "shape": list(entry["shape"]),
                                            "data": str.__str__(entry["data"])}
    if clean_buffers:
        out["buffers"] = clean_buffers
    return out


def apply_state(module: torch.nn.Module, state: Mapping[str, Any]) -> None:
    """Restore what a spec's ``state`` records: ties, ``requires_grad`` flags, non-persistent buffers.

    Raises:
        SpecError: a recorded name is not in the module, or a tie joins tensors of different shapes.
    """
    import torch

    for group in state.get("ties", []):
        shared = _tensor(module, group[0], "state.ties")
        for name in group[1:]:
            other = _tensor(module, name, "state.ties")
            if other.shape != shared.shape or isinstance(other, torch.nn.Parameter) != isinstance(
                    shared, torch.nn.Parameter):
                raise SpecError(f"state.ties: {name} cannot share {group[0]}: they differ in shape or kind")
            owner, _, leaf = name.rpartition(".")
            setattr(module.get_submodule(owner), leaf, shared)
    for name, flag in state.get("requires_grad", {}).items():
        param = _tensor(module, name, "state.requires_grad")
        if not isinstance(param, torch.nn.Parameter):
            raise SpecError(f"state.requires_grad: {name} is not a parameter of the architecture")
        param.requires_grad_(flag)
    for name, entry in state.get("buffers", {}).items():
        old = _tensor(module, name, "state.buffers")
        owner, _, leaf = name.rpartition(".")
        setattr(module.get_submodule(owner), leaf, decode_tensor(entry, device=old.device, where=name))


def _tensor(module: torch.nn.Module, name: str, where: str) -> torch.Tensor:
    import torch

    owner, _, leaf = name.rpartition(".")
    try:
        value = getattr(module.get_submodule(owner), leaf)
    except AttributeError as e:
        raise SpecError(f"{where}: {name} is not in the architecture") from e
    if not isinstance(value, torch.Tensor):
        raise SpecError(f"{where}: {name} is not a tensor of the architecture")
    return value


def encode_tensor(t: torch.Tensor) -> dict[str, Any]:
    """A small tensor as ``{"dtype", "shape", "data": base64 of its raw bytes}``: exact for every dtype."""
    import base64

    return {"dtype": str(t.dtype).removeprefix("torch."), "shape": list(t.shape),
            "data": base64.b64encode(raw_bytes(t)).decode("ascii")}


def decode_tensor(entry: Mapping[str, Any], *, device: torch.device, where: str) -> torch.Tensor:
    """The tensor :func:`encode_tensor` wrote; on meta only its dtype and shape."""
    import base64
    import binascii

    import torch

    dtype = getattr(torch, entry["dtype"])
    if device.type == "meta":
        return torch.empty(entry["shape"], dtype=dtype, device="meta")
    try:
        data = bytearray(base64.b64decode(entry["data"], validate=True))
    except binascii.Error as e:
        raise SpecError(f"state.buffers[{where!r}].data: not base64 ({e})") from e
    empty = torch.empty(entry["shape"], dtype=dtype)
    if len(data) != empty.numel() * empty.element_size():
        raise SpecError(f"state.buffers[{where!r}]: {len(data)} bytes do not fill shape {entry['shape']}")
    if not data:
        return empty.to(device)
    flat = torch.frombuffer(data, dtype=torch.uint8).view(dtype)
    return flat.reshape(entry["shape"]).clone().to(device)


def raw_bytes(t: torch.Tensor) -> bytes:
    """A tensor's elements as bytes (native order): what "equal bit for bit" compares."""
    import torch

    flat = t.detach().to("cpu").contiguous().reshape(-1)
    return bytes(flat.view(torch.uint8).numpy().tobytes()) if flat.numel() else b""




def seal(module: torch.nn.Module, spec: Mapping[str, Any], trusted: Sequence[str], fmt: Format) -> dict[str, Any]:
    """The spec to store with a live module: its ``state`` recorded, checked to rebuild the module.

    Raises:
        SpecError: a property of the module cannot be kept in ``fmt`` through this spec; the message
            names the property, the submodule and the way out.
        UntrustedTarget: a target of the spec is not trusted.
    """
    import torch

    from registry import spec as spec_mod

    if isinstance(module, (torch.jit.ScriptModule, torch.fx.GraphModule)):
        # A loaded TorchScript or export module (a conversion's source) has no Python structure to compare.
        return spec_mod.validate(spec, trusted)
    clean = spec_mod.validate({k: v for k, v in spec.items() if k != "state"}, trusted)
    held_twice(module)
    plain = spec_mod.build_on_meta(clean, trusted) or spec_mod.build_clean(clean, trusted, "cpu")
    state = _record_state(module, plain, clean, trusted, fmt)
    sealed = spec_mod.validate({**clean, "state": state} if state else clean, trusted)
    rebuilt = spec_mod.build_on_meta(sealed, trusted) or spec_mod.build_clean(sealed, trusted, "cpu")
    try:
        assign_meta(rebuilt, module)
    except SpecError as e:
        raise SpecError(f"cannot push the model as {fmt.value}: {e}; pass a spec= that builds it") from e
    problem = difference(module, rebuilt)
    if problem:
        raise SpecError(f"cannot push the model as {fmt.value}: {problem}; pass a spec= that builds it, or push "
                        "as full or torchscript, which keep the module itself")
    return sealed


def held_twice(module: torch.nn.Module) -> None:
    """Refuse a module object held under two names: a spec builds each name its own module."""
    seen: dict[int, str] = {}
    for name, sub in module.named_modules(remove_duplicate=False):
        first = seen.setdefault(id(sub), name)
        if first != name:
            raise SpecError(
                f"{_where(name)} is the same module object as {_where(first)} (held twice); a spec builds a "
                f"separate module for each name: hold two modules and tie their weights "
                f"({_where(name)}.weight = {_where(first)}.weight), or push as full or torchscript"
            )


def check_format(module: object, fmt: Format) -> None:
    """Refuse a live module whose properties ``fmt`` would lose (export unties shared parameters).

    Raises:
        SpecError: naming the property, the tensors and the formats that keep it.
    """
    import torch

    from registry.records import Format
    from registry.weights import tie_groups

    if fmt is Format.EXPORT and isinstance(module, torch.nn.Module):
        groups = tie_groups(module)
        if groups:
            raise SpecError(
                f"cannot push the model as export: {' and '.join(groups[0])} are one shared tensor, and "
                "ExportedProgram.module() gives them back as separate copies; push as state_dict, safetensors, "
                "full or torchscript, which keep ties"
            )


def _record_state(module: torch.nn.Module, plain: torch.nn.Module, clean: dict[str, Any],
                  trusted: Sequence[str], fmt: Format) -> dict[str, Any]:
    from registry import spec as spec_mod
    from registry.weights import tie_groups

    state: dict[str, Any] = {}
    live_ties, built_ties = tie_groups(module), tie_groups(plain)
    for group in built_ties:
        if group not in live_ties:
            raise SpecError(f"cannot push the model as {fmt.value}: the architecture ties {' and '.join(group)}, "
                            "but the model holds them as separate tensors; push as full or torchscript")
    if extra := [g for g in live_ties if g not in built_ties]:
        state["ties"] = extra
    built_params = dict(plain.named_parameters())
    flags = {n: p.requires_grad for n, p in module.named_parameters()
             if n in built_params and built_params[n].requires_grad != p.requires_grad}
    if flags:
        state["requires_grad"] = flags
    keys = set(module.state_dict(keep_vars=True))
    transient = [(n, b) for n, b in module.named_buffers() if n not in keys]
    if transient:
        # Their values come from the constructor: compare with a real construction.
        real = plain if not spec_mod.has_meta_tensors(plain) else spec_mod.build_clean(clean, trusted, "cpu")
        buffers: dict[str, Any] = {}
        for name, live in transient:
            made = real.get_buffer(name)
            same = made is not None and made.dtype == live.dtype and made.shape == live.shape and \
                raw_bytes(made) == raw_bytes(live)
            if same:
                continue
            size = live.numel() * live.element_size()
            if size > MAX_INLINE_BUFFER:
                raise SpecError(
                    f"cannot push the model as {fmt.value}: the non-persistent buffer {name} "
                    f"({list(live.shape)} {str(live.dtype).removeprefix('torch.')}) differs from "
                    f"what its constructor makes and has {size} bytes, more than the {MAX_INLINE_BUFFER} a spec "
                    "keeps; register it with persistent=True, or push as full or torchscript")
            buffers[name] = encode_tensor(live)
        if buffers:
            state["buffers"] = buffers
    return state


def assign_meta(rebuilt: torch.nn.Module, module: torch.nn.Module) -> None:
    """Put meta stand-ins of the live tensors into the rebuilt module, as loading puts the file's in."""
    import torch

    from registry import spec as spec_mod
    from registry.weights import retie, tie_groups

    live = module.state_dict()
    stand_ins = {k: torch.empty_like(v, device="meta") if isinstance(v, torch.Tensor) else v for k, v in live.items()}
    groups = tie_groups(rebuilt)
    spec_mod.check_state_dict(rebuilt, stand_ins)
    spec_mod.load_weights(rebuilt, stand_ins, assign=True)
    retie(rebuilt, groups)


def difference(live: torch.nn.Module, rebuilt: torch.nn.Module) -> str | None:
    """The first property in which ``rebuilt`` differs from ``live``, in words; None if none does."""
    from registry.weights import tie_groups

    found = structure_difference(live, rebuilt)
    if found is not None:
        return found[1]
    built = rebuilt.state_dict(keep_vars=True)
    for name, tensor in live.state_dict(keep_vars=True).items():
        other = built[name]
        if hasattr(tensor, "dtype") and getattr(other, "dtype", None) != tensor.dtype:
            return f"{name} would come back as {other.dtype}, not {tensor.dtype}"
    built_params = dict(rebuilt.named_parameters())
    for name, param in live.named_parameters():
        if name in built_params and built_params[name].requires_grad != param.requires_grad:
            return f"{name} would come back with requires_grad={built_params[name].requires_grad}"
    if tie_groups(live) != tie_groups(rebuilt):
        return f"tied tensors would come back as {tie_groups(rebuilt) or 'untied'}, not {tie_groups(live)}"
    built_buffers = dict(rebuilt.named_buffers())
    for name, buf in live.named_buffers():
        other = built_buffers.get(name)
        if other is None or other.dtype != buf.dtype or other.shape != buf.shape:
            got = "missing" if other is None else f"{list(other.shape)} {other.dtype}"
            return f"the buffer {name} would come back {got}, not {list(buf.shape)} {buf.dtype}"
    return None


def structure_difference(live: torch.nn.Module, rebuilt: torch.nn.Module) -> tuple[str, str] | None:
    """The first submodule whose type, state_dict entries or attributes the rebuilt module does not
    reproduce: its name and the difference in words."""
    from registry import spec as spec_mod

    ours = [(n, type(m)) for n, m in rebuilt.named_modules()]
    theirs = [(n, type(m)) for n, m in live.named_modules()]
    for (a, ta), (b, tb) in zip(ours, theirs, strict=False):
        if a != b or ta is not tb:
            return b, (f"the spec builds {_where(a)} as {ta.__qualname__} where the model has {_where(b)} "
                       f"as {tb.__qualname__}")
    if len(ours) != len(theirs):
        extra = (ours if len(ours) > len(theirs) else theirs)[min(len(ours), len(theirs))][0]
        side = "the spec builds" if len(ours) > len(theirs) else "the model has"
        return "", f"{side} a submodule {_where(extra)} that the other lacks"
    try:
        spec_mod.check_state_dict(live, rebuilt.state_dict())
    except SpecError as e:
        return "", str(e)
    for (name, sub), (_, made) in zip(live.named_modules(), rebuilt.named_modules(), strict=True):
        mine, yours = attributes(sub), attributes(made)
        for key in sorted(set(mine) | set(yours)):
            if mine.get(key, "<absent>") != yours.get(key, "<absent>"):
                return name, (f"{_where(name)} ({type(sub).__qualname__}) has {key} = "
                              f"{_show(mine.get(key, '<absent>'))}, but its spec builds it with "
                              f"{_show(yours.get(key, '<absent>'))}")
    return None


def attributes(module: torch.nn.Module) -> dict[str, Any]:
    """A module's own attributes besides torch's bookkeeping, in comparable form (tensors by dtype and shape)."""
    return {k: _comparable(v) for k, v in vars(module).items() if k not in _MODULE_KEYS}


def _comparable(value: Any) -> Any:
    import torch

    if isinstance(value, torch.Tensor):
        return ("tensor", str(value.dtype), tuple(value.shape))
    if isinstance(value, float):
        return ("float", repr(value))  # nan == nan, and 0.0 != -0.0
    if isinstance(value, (list, tuple)):  # JSON has one sequence type; constructors take either
        return ("seq", tuple(_comparable(v) for v in value))
    if isinstance(value, Mapping):
        return ("map", tuple((repr(k), _comparable(v)) for k, v in value.items()))
    if value is None or isinstance(value, (bool, int, str, torch.dtype, torch.device, type, types.FunctionType,
                                           types.BuiltinFunctionType)):
        return value
    if isinstance(value, torch.nn.Module):
        return ("module", type(value).__qualname__)  # compared on its own as a submodule
    return ("object", type(value).__qualname__)


def _show(value: Any) -> str:
    if isinstance(value, tuple) and len(value) == 2 and value[0] == "float":
        return str(value[1])
    if isinstance(value, tuple) and len(value) == 2 and value[0] == "seq":
        return repr(value[1])
    text = getattr(value, "__qualname__", None) if callable(value) else None
    return text or f"{value!r:.80}"


def _where(name: str) -> str:
    return f"model.{name}" if name else "model"
