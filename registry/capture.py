"""Capture: describe a live module as a spec, and check that the spec rebuilds the same module.

Built-ins are read back from their attributes: the signature walk covers those kept under their
constructor parameter's name, :data:`_OVERRIDES` the rest. User classes are described by the
arguments :func:`record_init` recorded. Either way the spec is rebuilt and compared, submodule by
submodule and attribute by attribute, so a wrong reading is refused instead of stored.
"""

from __future__ import annotations

import functools
import inspect
import json
import math
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any, TypeVar

from registry.errors import SpecError
from registry.spec import build_clean, build_on_meta, check_state_dict, validate

if TYPE_CHECKING:
    import torch

M = TypeVar("M", bound="torch.nn.Module")

_CONTAINERS = ("Sequential", "ModuleList", "ModuleDict")
_INIT_ATTR = "_registry_init"
_HOWTO = (
    "pass spec= explicitly, or decorate the class with @registry.record_init and keep it in an "
    "importable module that is listed in REGISTRY_TRUSTED_MODULES / trusted_modules="
)

# (class, args, kwargs, names left to their defaults). A plain tuple, so that pickling a decorated
# model (format "full") references no registry class.
_InitRecord = tuple[type, tuple[Any, ...], dict[str, Any], tuple[str, ...]]


def record_init(cls: type[M]) -> type[M]:
    """Class decorator: record the arguments each instance is constructed with, for :func:`capture`.

    Only the outermost ``__init__`` call of an instance is recorded, so a decorated subclass of a
    decorated class records its own arguments. ``__init__`` keeps its signature and docstring.
    """
    import torch

    if not isinstance(cls, type) or not issubclass(cls, torch.nn.Module):
        raise TypeError(f"record_init decorates nn.Module subclasses, not {cls!r}")
    init = cls.__init__
    signature = inspect.signature(init)

    @functools.wraps(init)
    def __init__(self: Any, *args: Any, **kwargs: Any) -> None:
        if _INIT_ATTR not in self.__dict__:
            record = _bind(cls, signature, self, args, kwargs)
            if record is not None:
                # Module.__setattr__ would need Module.__init__ to have run already.
                object.__setattr__(self, _INIT_ATTR, record)
        init(self, *args, **kwargs)

    cls.__init__ = __init__  # type: ignore[method-assign]
    return cls


def _bind(
    cls: type, sig: inspect.Signature, self: object, args: tuple[Any, ...], kwargs: dict[str, Any]
) -> _InitRecord | None:
    try:
        bound = sig.bind(self, *args, **kwargs)
    except TypeError:
        return None  # __init__ itself raises the better error
    given = set(bound.arguments)
    bound.apply_defaults()
    params = list(sig.parameters.values())[1:]
    star = any(p.kind is p.VAR_POSITIONAL and bound.arguments[p.name] for p in params)
    positional: list[Any] = []
    keywords: dict[str, Any] = {}
    for p in params:
        value = bound.arguments[p.name]
        # Once *args holds values, the parameters before it can only be passed by position.
        if p.kind is p.POSITIONAL_ONLY or (p.kind is p.POSITIONAL_OR_KEYWORD and star):
            positional.append(value)
        elif p.kind is p.VAR_POSITIONAL:
            positional.extend(value)
        elif p.kind is p.VAR_KEYWORD:
            keywords.update(value)
        else:
            keywords[p.name] = value
    return cls, tuple(positional), keywords, tuple(p.name for p in params if p.name not in given)


def capture(module: torch.nn.Module) -> dict[str, Any]:
    """Describe a live module as a spec, and check that the spec rebuilds the same architecture.

    Works for ``torch.nn`` built-ins and containers and for classes decorated with :func:`record_init`;
    never falls back to pickling. Trust is checked later, where the spec is used. What the constructor
    cannot express (ties, flags, changed buffers) is recorded at push by :func:`registry.fidelity.seal`.

    Returns:
        The normalized spec.

    Raises:
        SpecError: The module cannot be described, or its spec rebuilds something else (state_dict
            keys or shapes, submodule types or attributes); the message names the submodule and the
            argument, and says how to supply a spec.
    """
    from registry import fidelity

    name = type(module).__qualname__
    try:
        fidelity.held_twice(module)
    except SpecError as e:
        raise SpecError(f"cannot capture a spec for {name}: {e}") from e
    _refuse_parametrized(module)
    spec = _capture(module, "model")
    trusted = sorted(_target_modules(spec))
    try:
        clean = validate(spec, trusted)
        rebuilt = build_on_meta(clean, trusted) or build_clean(clean, trusted, "cpu")
        # The live module is the architecture here: "missing" keys are those the spec fails to rebuild.
        check_state_dict(module, rebuilt.state_dict())
        fidelity.assign_meta(rebuilt, module)
    except SpecError as e:
        raise SpecError(f"cannot capture a spec for {name}: {e}; {_HOWTO}") from e
    found = fidelity.structure_difference(module, rebuilt)
    if found is not None:
        where, problem = found
        sub = module.get_submodule(where) if where else module
        raise SpecError(f"cannot capture a spec for {name}: {problem}; {_advice(sub, where)}")
    return clean


def _advice(sub: torch.nn.Module, where: str) -> str:
    if not _is_builtin(type(sub)):
        return _HOWTO
    # A template of the submodule's spec: what was read back, "?" where nothing reads the argument back.
    kwargs: dict[str, Any] = {}
    try:
        kwargs = dict(_capture_builtin(sub, "").get("kwargs", {}))
    except SpecError:
        pass
    for p in list(inspect.signature(type(sub).__init__).parameters.values())[1:]:
        if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD) and p.name not in ("device", "dtype") \
                and not p.name.startswith("_"):
            kwargs.setdefault(p.name, "?")
    template = json.dumps({"target": f"torch.nn.{type(sub).__name__}", "kwargs": kwargs})
    place = f"model.{where}" if where else "the model"
    return f"pass spec= with {place} written out with the arguments it was built with, e.g. {template}"


def _refuse_parametrized(module: torch.nn.Module) -> None:
    from torch.nn.utils import parametrize

    for name, sub in module.named_modules():
        if parametrize.is_parametrized(sub):
            tensors = ", ".join(sorted(getattr(sub, "parametrizations", {})))
            where = f"model.{name}" if name else "model"
            raise SpecError(
                f"cannot capture {where}: it is parametrized (torch.nn.utils.parametrize on {tensors}), which a "
                f"spec cannot rebuild; call torch.nn.utils.parametrize.remove_parametrizations({where}, "
                f"{tensors.split(', ')[0]!r}) before pushing, or push as export"
            )


def _capture(module: torch.nn.Module, path: str) -> dict[str, Any]:
    cls = type(module)
    if _is_builtin(cls):
        return _capture_builtin(module, path)
    if cls.__module__ == "__main__" or "<locals>" in cls.__qualname__:
        where = "in __main__" if cls.__module__ == "__main__" else "inside a function"
        raise _cannot(path, cls, f"the class is defined {where}, so it cannot be imported when loading")
    record = module.__dict__.get(_INIT_ATTR)
    # A subclass that is not decorated itself carries its base's record, which does not describe it.
    if not isinstance(record, tuple) or len(record) != 4 or record[0] is not cls:
        raise _cannot(path, cls, "it is neither a torch.nn built-in nor decorated with @registry.record_init")
    _, recorded_args, recorded_kwargs, defaulted = record
    args = [_to_json(v, f"{path}[{i}]") for i, v in enumerate(recorded_args)]
    kwargs: dict[str, Any] = {}
    for key, value in recorded_kwargs.items():
        try:
            kwargs[key] = _to_json(value, f"{path}.{key}")
        except SpecError:
            if key not in defaulted:
                raise  # a default left out is applied again by the constructor
    return _spec(f"{cls.__module__}:{cls.__qualname__}", args, kwargs)


def _capture_builtin(module: torch.nn.Module, path: str) -> dict[str, Any]:
    import torch

    cls = type(module)
    target = f"torch.nn.{cls.__name__}"
    if cls.__name__ in _CONTAINERS:
        # _modules, not named_children(): a module held twice must appear twice (and fail the check).
        children = {n: _capture(m, f"{path}.{n}") for n, m in module._modules.items() if m is not None}
        if cls is torch.nn.ModuleList:
            return _spec(target, [list(children.values())], {})
        if cls is torch.nn.Sequential and list(children) == [str(i) for i in range(len(children))]:
            return _spec(target, list(children.values()), {})
        return _spec(target, [children], {})
    override = _OVERRIDES.get(cls.__name__)
    kwargs = {k: _to_json(v, f"{path}.{k}") for k, v in (override(module, path) if override else {}).items()}
    for p in list(inspect.signature(cls.__init__).parameters.values())[1:]:
        skip = p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD) or p.name in ("device", "dtype")
        if skip or p.name.startswith("_") or p.name in kwargs or not hasattr(module, p.name):
            continue
        value = getattr(module, p.name)
        if p.name == "bias" and (value is None or isinstance(value, torch.Tensor)):
            value = value is not None  # the constructor takes a flag, the attribute holds the tensor
        elif isinstance(value, torch.Tensor) and any(value is t for t in _own_tensors(module)):
            # A tensor argument kept as a buffer or parameter: the weights file carries its values.
            kwargs[p.name] = {"tensor": {"dtype": str(value.dtype).removeprefix("torch."), "shape": list(value.shape)}}
            continue
        try:
            kwargs[p.name] = _to_json(value, f"{path}.{p.name}")
        except SpecError:
            if value is not p.default:
                raise
    return _spec(target, [], kwargs)


def _own_tensors(module: torch.nn.Module) -> list[torch.Tensor]:
    keys = set(module.state_dict(keep_vars=True))
    own = [*module.named_parameters(recurse=False), *module.named_buffers(recurse=False)]
    return [t for n, t in own if n in keys]


def _is_builtin(cls: type) -> bool:
    import torch

    return cls.__module__.startswith("torch.nn.modules.") and getattr(torch.nn, cls.__name__, None) is cls


def _attrs(*names: str) -> Callable[[Any, str], dict[str, Any]]:
    return lambda m, path: {n: getattr(m, n) for n in names}


def _layer(m: Any, path: str) -> dict[str, Any]:
    # TransformerEncoderLayer / TransformerDecoderLayer keep their arguments inside their submodules.
    return {"d_model": m.linear1.in_features, "nhead": m.self_attn.num_heads,
            "dim_feedforward": m.linear1.out_features, "dropout": m.dropout.p, "activation": m.activation,
            "layer_norm_eps": m.norm1.eps, "batch_first": m.self_attn.batch_first, "norm_first": m.norm_first,
            "bias": m.linear1.bias is not None}


def _stack(layer: str) -> Callable[[Any, str], dict[str, Any]]:
    # The constructor deep-copies one layer num_layers times; the rebuilt stack is compared layer by layer.
    def read(m: Any, path: str) -> dict[str, Any]:
        out = {layer: m.layers[0], "num_layers": len(m.layers), "norm": m.norm}
        if hasattr(m, "enable_nested_tensor"):
            out.update(enable_nested_tensor=m.enable_nested_tensor, mask_check=m.mask_check)
        return out
    return read


def _fractional(m: Any, path: str) -> dict[str, Any]:
    if m._random_samples is not None:
        raise SpecError(
            f"cannot capture {path} ({type(m).__name__}): its _random_samples tensor fixes the pooling regions, "
            f"and a spec cannot pass a tensor to the constructor; set {path}._random_samples = None to sample "
            "them on each call, or push as full or torchscript"
        )
    return {}


def _triplet(m: Any, path: str) -> dict[str, Any]:
    import torch

    fn = m.distance_function
    default = fn is torch.nn.functional.pairwise_distance  # what the constructor puts for None
    return {"distance_function": None if default else fn, "margin": m.margin, "swap": m.swap,
            "reduction": m.reduction}


_RNN = ("input_size", "hidden_size", "num_layers", "bias", "batch_first", "dropout", "bidirectional")
_MHA = ("embed_dim", "num_heads", "dropout", "add_zero_attn", "kdim", "vdim", "batch_first")

# Built-ins whose constructor arguments are not all kept under their own names. The signature walk
# in _capture_builtin covers the rest, and turns a ``bias`` tensor attribute back into a flag.
_OVERRIDES: dict[str, Callable[[Any, str], dict[str, Any]]] = {
    "RNN": _attrs(*_RNN, "nonlinearity"),
    "LSTM": _attrs(*_RNN, "proj_size"),
    "GRU": _attrs(*_RNN),
    "MultiheadAttention": lambda m, path: {
        **_attrs(*_MHA)(m, path),
        "bias": m.in_proj_bias is not None,
        "add_bias_kv": m.bias_k is not None,
    },
    "PairwiseDistance": lambda m, path: {"p": m.norm, "eps": m.eps, "keepdim": m.keepdim},
    "TripletMarginWithDistanceLoss": _triplet,
    "AdaptiveLogSoftmaxWithLoss": lambda m, path: {
        "in_features": m.in_features, "n_classes": m.n_classes, "cutoffs": m.cutoffs[:-1],  # n_classes is appended
        "div_value": m.div_value, "head_bias": m.head_bias,
    },
    "Transformer": lambda m, path: {"d_model": m.d_model, "nhead": m.nhead, "batch_first": m.batch_first,
                                    "custom_encoder": m.encoder, "custom_decoder": m.decoder},
    "TransformerEncoder": _stack("encoder_layer"),
    "TransformerDecoder": _stack("decoder_layer"),
    "TransformerEncoderLayer": _layer,
    "TransformerDecoderLayer": _layer,
    "FractionalMaxPool2d": _fractional,
    "FractionalMaxPool3d": _fractional,
}


def _to_json(value: Any, path: str) -> Any:
    import torch

    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, int):
        return int(value)
    if isinstance(value, float) and math.isfinite(value):
        return float(value)
    if isinstance(value, torch.dtype):
        return {"dtype": str(value).removeprefix("torch.")}
    if isinstance(value, torch.nn.Module):
        return _capture(value, path)
    if isinstance(value, (list, tuple)):
        return [_to_json(v, f"{path}[{i}]") for i, v in enumerate(value)]
    if isinstance(value, Mapping) and "target" not in value and all(isinstance(k, str) for k in value):
        return {k: _to_json(v, f"{path}.{k}") for k, v in value.items()}
    if callable(value) and (target := _function_target(value)) is not None:
        return {"target": target}
    raise SpecError(f"cannot capture {path}: the {type(value).__name__} value {value!r:.60} is not JSON-able; {_HOWTO}")


def _function_target(fn: Any) -> str | None:
    """The dotted path of a function a spec can name: torch.nn.functional's, or a module-level one."""
    import torch

    name = getattr(fn, "__name__", "")
    if name and not name.startswith("_") and getattr(torch.nn.functional, name, None) is fn:
        return f"torch.nn.functional.{name}"
    if inspect.isfunction(fn) and "<" not in fn.__qualname__ and fn.__module__ != "__main__":
        return f"{fn.__module__}:{fn.__qualname__}"
    return None  # a lambda, a closure, a bound method: nothing to import


def _cannot(path: str, cls: type, reason: str) -> SpecError:
    return SpecError(f"cannot capture {path} ({cls.__module__}.{cls.__qualname__}): {reason}; {_HOWTO}")


def _spec(target: str, args: list[Any], kwargs: dict[str, Any]) -> dict[str, Any]:
    return {"target": target, **({"args": args} if args else {}), **({"kwargs": kwargs} if kwargs else {})}


def _target_modules(value: Any) -> set[str]:
    if isinstance(value, dict) and "target" in value:
        target = value["target"]
        found = {target.partition(":")[0] if ":" in target else target.rpartition(".")[0]}
        return found | _target_modules(value.get("args", [])) | _target_modules(list(value.get("kwargs", {}).values()))
    items = value.values() if isinstance(value, dict) else value if isinstance(value, list) else []
    return set().union(*map(_target_modules, items))
