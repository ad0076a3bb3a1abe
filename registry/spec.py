"""Architecture specs: validate JSON, check trusted targets, build on meta, capture from live modules."""

from __future__ import annotations

import functools
import importlib
import inspect
import itertools
import json
import math
import types
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, TypeVar

from registry.errors import SpecError, UntrustedTarget, one_line
from registry.trust import components, has_dunder, is_trusted

if TYPE_CHECKING:
    import torch

M = TypeVar("M", bound="torch.nn.Module")

#: Upper bound on the compact UTF-8 JSON encoding of a spec.
MAX_SPEC_BYTES = 64 * 1024
#: Upper bound on JSON nesting: every object or array, spec objects included, is one level.
MAX_DEPTH = 32

_CONTAINERS = ("Sequential", "ModuleList", "ModuleDict")
_INIT_ATTR = "_registry_init"
_LISTED = 5
_HOWTO = (
    "pass spec= explicitly, or decorate the class with @registry.record_init and keep it in an "
    "importable module that is listed in REGISTRY_TRUSTED_MODULES / trusted_modules="
)

# (class, args, kwargs, names left to their defaults). A plain tuple, so that pickling a decorated
# model (format "full") references no registry class.
_InitRecord = tuple[type, tuple[Any, ...], dict[str, Any], tuple[str, ...]]


def validate(spec: object, trusted: Sequence[str]) -> dict[str, Any]:
    """Check an architecture spec without importing anything.

    Args:
        spec: A decoded JSON object ``{"target": "pkg.mod.Class", "args": [...], "kwargs": {...}}``;
            any value inside may itself be a spec (an object with a ``"target"`` key).
        trusted: Module prefixes whose classes may be targets, matched on whole components.

    Returns:
        A normalized deep copy of plain JSON types, with empty ``args``/``kwargs`` left out.

    Raises:
        SpecError: The spec is malformed, too deep or too big; the message names the place
            (``spec.args[0].kwargs.bias``).
        UntrustedTarget: A target lies outside ``trusted`` or has a ``__dunder__`` component.
    """
    if not isinstance(spec, Mapping):
        raise SpecError(f"spec: expected a JSON object, got {type(spec).__name__}")
    if "target" not in spec:
        raise SpecError("spec: the object has no 'target' key")
    clean = _clean_spec(spec, "spec", 1, trusted)
    try:
        size = len(json.dumps(clean, separators=(",", ":"), ensure_ascii=False).encode())
    except UnicodeEncodeError as e:
        raise SpecError(f"spec: a string is not valid Unicode ({e.reason})") from e
    if size > MAX_SPEC_BYTES:
        raise SpecError(f"spec: its JSON is {size} bytes, more than the limit of {MAX_SPEC_BYTES}")
    return clean


def _clean(value: object, path: str, depth: int, trusted: Sequence[str]) -> Any:
    if value is None or isinstance(value, bool):
        return value
    if isinstance(value, int):
        if not -(2**63) <= value < 2**63:
            raise SpecError(f"{path}: integer outside the 64-bit range")
        return int(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            raise SpecError(f"{path}: {value!r} is not valid JSON (numbers must be finite)")
        return float(value)
    if isinstance(value, str):
        return str.__str__(value)
    if not isinstance(value, (list, tuple, Mapping)):
        raise SpecError(f"{path}: a {type(value).__name__} is not a JSON value")
    if isinstance(value, Mapping):
        return (_clean_spec if "target" in value else _clean_items)(value, path, depth, trusted)
    # Bounding depth here bounds the recursion of every later walk over the spec, too.
    if depth > MAX_DEPTH:
        raise SpecError(f"{path}: nested deeper than {MAX_DEPTH} levels")
    return [_clean(v, f"{path}[{i}]", depth + 1, trusted) for i, v in enumerate(value)]


def _clean_items(items: Mapping[Any, Any], path: str, depth: int, trusted: Sequence[str]) -> dict[str, Any]:
    if depth > MAX_DEPTH:
        raise SpecError(f"{path}: nested deeper than {MAX_DEPTH} levels")
    out: dict[str, Any] = {}
    for key, item in items.items():
        if not isinstance(key, str):
            raise SpecError(f"{path}: key {key!r} is not a string")
        where = f"{path}.{key}" if key.isidentifier() else f"{path}[{key!r}]"
        out[str.__str__(key)] = _clean(item, where, depth + 1, trusted)
    return out


def _clean_spec(spec: Mapping[Any, Any], path: str, depth: int, trusted: Sequence[str]) -> dict[str, Any]:
    if depth > MAX_DEPTH:
        raise SpecError(f"{path}: nested deeper than {MAX_DEPTH} levels")
    unknown = [k for k in spec if k not in ("target", "args", "kwargs")]
    if unknown:
        raise SpecError(f"{path}: unknown key(s) {', '.join(map(repr, unknown))}; a spec has only target, args, kwargs")
    target, args, kwargs = spec["target"], spec.get("args", []), spec.get("kwargs", {})
    if not isinstance(target, str):
        raise SpecError(f"{path}.target: expected a dotted path string, got {type(target).__name__}")
    _check_target(target, trusted, f"{path}.target")
    if not isinstance(args, (list, tuple)):
        raise SpecError(f"{path}.args: expected a list, got {type(args).__name__}")
    if not isinstance(kwargs, Mapping):
        raise SpecError(f"{path}.kwargs: expected an object, got {type(kwargs).__name__}")
    for key in kwargs:
        if not isinstance(key, str) or not key.isidentifier():
            raise SpecError(f"{path}.kwargs: key {key!r} is not a Python identifier")
    out: dict[str, Any] = {"target": str.__str__(target)}
    if args:
        out["args"] = _clean(args, f"{path}.args", depth + 1, trusted)
    if kwargs:
        out["kwargs"] = _clean_items(kwargs, f"{path}.kwargs", depth + 1, trusted)
    return out


def _check_target(target: str, trusted: Sequence[str], where: str) -> None:
    if len(components(target)) < 2:
        raise SpecError(f"{where}: {target!r} is not a dotted path such as 'torch.nn.Linear' or 'pkg.mod:Class'")
    if has_dunder(target) or not is_trusted(target, trusted):
        raise UntrustedTarget(target, trusted)


def resolve(target: str, trusted: Sequence[str]) -> type[torch.nn.Module]:
    """Import the ``nn.Module`` subclass that a trusted dotted path names.

    Trust is checked before anything is imported, then again for every module and class reached,
    so a trusted module cannot hand out what it merely imported (``torch.nn.modules.module.torch``).

    Args:
        target: ``pkg.mod.Class`` (the module is its longest importable prefix) or ``pkg.mod:Class``.
        trusted: Module prefixes that may be imported.

    Returns:
        The class.

    Raises:
        UntrustedTarget: The path, or a module or class on the way, is not trusted.
        SpecError: The path is malformed, cannot be imported, or is not an ``nn.Module`` subclass.
    """
    _check_target(target, trusted, "target")
    import torch

    parts = target.replace(":", ".", 1).split(".")
    obj, n = _import_prefix(target, parts, trusted)
    where = ".".join(parts[:n])
    for name in parts[n:]:
        try:
            obj = getattr(obj, name)
        except AttributeError as e:
            raise SpecError(f"cannot resolve {target!r}: {where!r} has no attribute {name!r}") from e
        where = f"{where}.{name}"
        if isinstance(obj, types.ModuleType | type):
            origin = obj.__name__ if isinstance(obj, types.ModuleType) else obj.__module__
            if not is_trusted(origin, trusted):
                raise UntrustedTarget(target, trusted)
    if not isinstance(obj, type) or not issubclass(obj, torch.nn.Module):
        raise SpecError(f"spec target {target!r} is not an nn.Module subclass")
    return obj


def _import_prefix(target: str, parts: list[str], trusted: Sequence[str]) -> tuple[object, int]:
    # "pkg.mod:Class" names its module; for "pkg.mod.Class" try the longest prefixes first.
    lengths = [target.count(".", 0, target.index(":")) + 1] if ":" in target else []
    missing: ImportError | None = None
    for n in lengths or range(len(parts) - 1, 0, -1):
        name = ".".join(parts[:n])
        if not is_trusted(name, trusted):
            break  # never import a module outside the trusted prefixes, not even to look
        try:
            return importlib.import_module(name), n
        except ImportError as e:
            # Only "this prefix is no module" means "try a shorter one"; any other failure is real.
            absent = isinstance(e, ModuleNotFoundError) and e.name and f"{name}.".startswith(f"{e.name}.")
            if not absent or lengths:
                raise SpecError(f"cannot import spec target {target!r}: {e}") from e
            missing = e
    if missing is None:
        raise UntrustedTarget(target, trusted)
    raise SpecError(f"cannot import spec target {target!r}: {missing}") from missing


def build(spec: Mapping[str, Any], trusted: Sequence[str], *, device: str | torch.device = "meta") -> torch.nn.Module:
    """Validate a spec and construct the module it describes.

    Args:
        spec: The architecture spec.
        trusted: Module prefixes whose classes may be targets.
        device: Where parameters are created; on ``"meta"`` no memory is allocated for them.

    Returns:
        The new module, in the mode its constructor left it.

    Raises:
        SpecError: The spec is invalid, or a constructor refused its arguments.
        UntrustedTarget: A target is not trusted.
    """
    clean = validate(spec, trusted)
    try:
        return _build(clean, trusted, device)
    except RuntimeError as e:  # on meta: a constructor read tensor values
        raise SpecError(f"spec: cannot construct {clean['target']} on {device}: {one_line(e)}") from e


def skeleton(spec: Mapping[str, Any], trusted: Sequence[str]) -> torch.nn.Module:
    """The module a spec describes, for checking names and shapes: on meta if its constructor allows."""
    clean = validate(spec, trusted)
    return _build_on_meta(clean, trusted) or _build(clean, trusted, "cpu")


def _build(clean: dict[str, Any], trusted: Sequence[str], device: str | torch.device) -> torch.nn.Module:
    import torch

    try:
        with torch.device(device):
            module: torch.nn.Module = _construct(clean, "spec", trusted)
    except RuntimeError as e:
        if str(device) == "meta":
            raise  # _build_on_meta falls back to a real device
        raise SpecError(f"spec: cannot construct {clean['target']}: {one_line(e)}") from e
    return module


def _build_on_meta(clean: dict[str, Any], trusted: Sequence[str]) -> torch.nn.Module | None:
    try:
        return _build(clean, trusted, "meta")
    except RuntimeError:
        return None  # a constructor read tensor values (.item(), .tolist()), which meta tensors lack


def _construct(value: Any, path: str, trusted: Sequence[str]) -> Any:
    if isinstance(value, list):
        return [_construct(v, f"{path}[{i}]", trusted) for i, v in enumerate(value)]
    if not isinstance(value, dict):
        return value
    if "target" not in value:
        return OrderedDict((k, _construct(v, f"{path}.{k}", trusted)) for k, v in value.items())
    target = value["target"]
    cls = resolve(target, trusted)
    args = _construct(value.get("args", []), f"{path}.args", trusted)
    kwargs = {k: _construct(v, f"{path}.kwargs.{k}", trusted) for k, v in value.get("kwargs", {}).items()}
    try:
        return cls(*args, **kwargs)
    except RuntimeError:
        raise  # _build decides: retry off meta, or report
    except Exception as e:  # constructors assert, index and overflow on bad arguments, not only TypeError
        raise SpecError(f"{path}: cannot construct {target}: {one_line(e) or type(e).__name__}") from e


def check_state_dict(module: torch.nn.Module, state_dict: Mapping[str, torch.Tensor]) -> None:
    """Compare the keys and shapes of a module's state_dict with the given tensors; meta ones do.

    Raises:
        SpecError: Keys are missing or unexpected, or shapes differ; the message lists them.
    """
    expected = module.state_dict()
    shapes = {k: (_shape(v), _shape(state_dict[k])) for k, v in expected.items() if k in state_dict}
    problems = {
        "missing keys": [k for k in expected if k not in state_dict],
        "unexpected keys": [k for k in state_dict if k not in expected],
        "shape mismatch": [f"{k} (expected {a}, got {b})" for k, (a, b) in shapes.items() if a != b],
    }
    found = [f"{label}: {_listing(keys)}" for label, keys in problems.items() if keys]
    if found:
        raise SpecError("state_dict does not match the architecture: " + "; ".join(found))


def _shape(value: object) -> str:
    shape = getattr(value, "shape", None)  # get_extra_state() may put any object in a state_dict
    return f"a {type(value).__name__}" if shape is None else str(list(shape))


def _listing(items: list[str]) -> str:
    shown = ", ".join(items[:_LISTED])
    return shown if len(items) <= _LISTED else f"{shown}, … and {len(items) - _LISTED} more"


def build_with_weights(
    spec: Mapping[str, Any],
    state_dict: Mapping[str, torch.Tensor],
    trusted: Sequence[str],
    *,
    device: str | torch.device | None = None,
) -> torch.nn.Module:
    """Build a module from its spec and load its weights without allocating them twice.

    The module is built on meta and the given tensors are assigned into it. A module that needs a
    real construction (state computed in ``__init__`` that is not in the state_dict, tied weights, a
    constructor that cannot run on meta) is rebuilt on ``device`` (cpu if None) and loaded by copy.

    Args:
        spec: The architecture spec.
        state_dict: The weights; their tensors are used in place where possible.
        trusted: Module prefixes whose classes may be targets.
        device: Where to move the module; None leaves the weights where they are.

    Returns:
        The module, in eval mode.

    Raises:
        SpecError: The spec is invalid or the weights do not fit it.
        UntrustedTarget: A target is not trusted.
    """
    clean = validate(spec, trusted)
    module = _build_on_meta(clean, trusted)
    if module is not None:
        check_state_dict(module, state_dict)
        # Assigning name by name would untie a tensor that several names share.
        if not _has_shared_tensors(module):
            load_weights(module, state_dict, assign=True)
            if not has_meta_tensors(module):
                return (module if device is None else module.to(device)).eval()
    real = _build(clean, trusted, "cpu" if device is None else device)
    if module is None:
        check_state_dict(real, state_dict)
    load_weights(real, state_dict, assign=False)
    return real.eval()


def load_weights(module: torch.nn.Module, state_dict: Mapping[str, torch.Tensor], *, assign: bool) -> None:
    """``load_state_dict(strict=True)``, its mismatch reported as a one-line :class:`SpecError`."""
    try:
        module.load_state_dict(state_dict, strict=True, assign=assign)
    except RuntimeError as e:
        # torch's message lists the keys over several lines: fold it into the one-line error.
        raise SpecError(f"the weights do not match the architecture: {' '.join(str(e).split())}") from e


def _has_shared_tensors(module: torch.nn.Module) -> bool:
    params = module.named_parameters(remove_duplicate=False)
    tensors = [t for _, t in itertools.chain(params, module.named_buffers(remove_duplicate=False))]
    return len({id(t) for t in tensors}) != len(tensors)


def has_meta_tensors(module: torch.nn.Module) -> bool:
    """True if any parameter, buffer or tensor attribute was left on the meta device."""
    import torch

    # Plain attributes count too: RNNs keep _flat_weights, user modules may cache tensors.
    for sub in module.modules():
        for value in itertools.chain(sub.parameters(False), sub.buffers(False), vars(sub).values()):
            items = value if isinstance(value, (list, tuple)) else (value,)
            if any(isinstance(t, torch.Tensor) and t.is_meta for t in items):
                return True
    return False


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
    never falls back to pickling. Trust is checked later, where the spec is used.

    Returns:
        The normalized spec.

    Raises:
        SpecError: The module cannot be described, or its spec rebuilds something else (state_dict
            keys or shapes, submodule types or settings); the message says how to supply a spec.
    """
    spec = _capture(module, "model")
    name, trusted = type(module).__qualname__, sorted(_target_modules(spec))
    try:
        clean = validate(spec, trusted)
        rebuilt = _build_on_meta(clean, trusted)
        if rebuilt is None:
            rebuilt = _build(clean, trusted, "cpu")
        # The live module is the architecture here: "missing" keys are those the spec fails to rebuild.
        check_state_dict(module, rebuilt.state_dict())
    except SpecError as e:
        raise SpecError(f"cannot capture a spec for {name}: {e}; {_HOWTO}") from e
    for ours, live in itertools.zip_longest(_tree(rebuilt), _tree(module), fillvalue="nothing"):
        if ours != live:
            raise SpecError(f"cannot capture a spec for {name}: it rebuilds {ours}, not {live}; {_HOWTO}")
    return clean


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
    kwargs = {k: _to_json(v, f"{path}.{k}") for k, v in (override(module) if override else {}).items()}
    for p in list(inspect.signature(cls.__init__).parameters.values())[1:]:
        skip = p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD) or p.name in ("device", "dtype")
        if skip or p.name.startswith("_") or p.name in kwargs or not hasattr(module, p.name):
            continue
        value = getattr(module, p.name)
        if p.name == "bias" and (value is None or isinstance(value, torch.Tensor)):
            value = value is not None  # the constructor takes a flag, the attribute holds the tensor
        try:
            kwargs[p.name] = _to_json(value, f"{path}.{p.name}")
        except SpecError:
            if value is not p.default:
                raise
    return _spec(target, [], kwargs)


def _is_builtin(cls: type) -> bool:
    import torch

    return cls.__module__.startswith("torch.nn.modules.") and getattr(torch.nn, cls.__name__, None) is cls


def _attrs(*names: str) -> Callable[[Any], dict[str, Any]]:
    return lambda m: {n: getattr(m, n) for n in names}


_RNN = ("input_size", "hidden_size", "num_layers", "bias", "batch_first", "dropout", "bidirectional")
_MHA = ("embed_dim", "num_heads", "dropout", "add_zero_attn", "kdim", "vdim", "batch_first")

# Built-ins whose constructor arguments are not all kept under their own names. The signature walk
# in _capture_builtin covers the rest, and turns a ``bias`` tensor attribute back into a flag.
_OVERRIDES: dict[str, Callable[[Any], dict[str, Any]]] = {
    "RNN": _attrs(*_RNN, "nonlinearity"),
    "LSTM": _attrs(*_RNN, "proj_size"),
    "GRU": _attrs(*_RNN),
    "MultiheadAttention": lambda m: {
        **_attrs(*_MHA)(m),
        "bias": m.in_proj_bias is not None,
        "add_bias_kv": m.bias_k is not None,
    },
}


def _to_json(value: Any, path: str) -> Any:
    import torch

    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, int):
        return int(value)
    if isinstance(value, float) and math.isfinite(value):
        return float(value)
    if isinstance(value, torch.nn.Module):
        return _capture(value, path)
    if isinstance(value, (list, tuple)):
        return [_to_json(v, f"{path}[{i}]") for i, v in enumerate(value)]
    if isinstance(value, Mapping) and "target" not in value and all(isinstance(k, str) for k in value):
        return {k: _to_json(v, f"{path}.{k}") for k, v in value.items()}
    raise SpecError(f"cannot capture {path}: the {type(value).__name__} value {value!r:.60} is not JSON-able; {_HOWTO}")


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


def _tree(module: torch.nn.Module) -> list[str]:
    # Built-ins are also compared by the arguments read back from them, which catches settings
    # changed after construction inside a @record_init class (``model.drop.p = 0.5``).
    return [f"{name or '<root>'} = {type(sub).__qualname__}{_settings(sub)}" for name, sub in module.named_modules()]


def _settings(module: torch.nn.Module) -> str:
    if not _is_builtin(type(module)) or type(module).__name__ in _CONTAINERS:
        return ""
    try:
        return json.dumps(_capture_builtin(module, "").get("kwargs", {}))
    except SpecError:
        return ""
