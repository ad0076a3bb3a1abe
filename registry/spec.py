"""Architecture specs: validate JSON, check trusted targets, build on meta (capture lives in :mod:`registry.capture`).

Besides plain JSON, a spec value may be a nested spec (``{"target": "torch.nn.ReLU"}``), a trusted
function, which is passed uncalled (``{"target": "torch.nn.functional.gelu"}``, no args or kwargs),
a dtype (``{"dtype": "bfloat16"}``), or a tensor whose values come from the weights
(``{"tensor": {"dtype": "float32", "shape": [4]}}``: a loss's ``weight``, kept as a buffer). The root
spec may carry a ``"state"`` object: what the constructor does not make but the pushed model had,
restored on every build (see :func:`registry.fidelity.apply_state`)::

    "state": {"ties": [["0.weight", "2.weight"]], "requires_grad": {"emb.weight": false},
              "buffers": {"rope.cache": {"dtype": "bfloat16", "shape": [4], "data": "<base64>"}}}
"""

from __future__ import annotations

import importlib
import inspect
import itertools
import json
import math
import types
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, TypeVar

from registry.errors import SpecError, UntrustedTarget, one_line
from registry.trust import components, has_dunder, is_trusted

if TYPE_CHECKING:
    from registry.capture import capture as capture
    from registry.capture import record_init as record_init

if TYPE_CHECKING:
    import torch

M = TypeVar("M", bound="torch.nn.Module")

#: Upper bound on the compact UTF-8 JSON encoding of a spec.
MAX_SPEC_BYTES = 64 * 1024
#: Upper bound on JSON nesting: every object or array, spec objects included, is one level.
MAX_DEPTH = 32

_LISTED = 5


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
    if is_dtype_value(value):
        assert isinstance(value, Mapping)
        return {"dtype": dtype_name(value["dtype"], f"{path}.dtype")}
    if isinstance(value, Mapping) and list(value) == ["tensor"]:
        return {"tensor": _clean_placeholder(value["tensor"], f"{path}.tensor")}
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
    allowed = ("target", "args", "kwargs", "state") if depth == 1 else ("target", "args", "kwargs")
    unknown = [k for k in spec if k not in allowed]
    if unknown:
        raise SpecError(f"{path}: unknown key(s) {', '.join(map(repr, unknown))}; a spec has only "
                        f"{', '.join(allowed)}")
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
    if spec.get("state"):
        from registry import fidelity

        out["state"] = fidelity.clean_state(spec["state"], f"{path}.state")
    return out


def dtype_name(name: object, where: str) -> str:
    # Checked against torch's own names without importing torch: validate() must stay import-free.
    if not isinstance(name, str) or not name.isidentifier() or name.startswith("_") or name not in _DTYPE_NAMES:
        raise SpecError(f"{where}: {name!r} is not a torch dtype name such as 'float32' or 'bfloat16'")
    return name


_DTYPE_NAMES = frozenset((
    "float64", "float32", "float16", "bfloat16", "complex128", "complex64", "complex32", "int64", "int32", "int16",
    "int8", "uint64", "uint32", "uint16", "uint8", "bool", "float8_e4m3fn", "float8_e4m3fnuz", "float8_e5m2",
    "float8_e5m2fnuz", "float8_e8m0fnu", "double", "float", "half", "long", "int", "short", "cfloat", "cdouble",
))


def _clean_placeholder(value: object, path: str) -> dict[str, Any]:
    shape = value.get("shape") if isinstance(value, Mapping) else None
    if not isinstance(value, Mapping) or set(value) != {"dtype", "shape"} or not isinstance(shape, list) or \
            not all(isinstance(d, int) and not isinstance(d, bool) and 0 <= d < 2**31 for d in shape):
        raise SpecError(f"{path}: expected {{'dtype': name, 'shape': [sizes]}}")
    return {"dtype": dtype_name(value["dtype"], f"{path}.dtype"), "shape": [int(d) for d in shape]}


def is_dtype_value(value: object) -> bool:
    """True for the spec encoding of a dtype, ``{"dtype": "bfloat16"}``."""
    return isinstance(value, Mapping) and len(value) == 1 and isinstance(value.get("dtype"), str)


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
    import torch

    obj = _reach(target, trusted)
    if not isinstance(obj, type) or not issubclass(obj, torch.nn.Module):
        raise SpecError(f"spec target {target!r} is not an nn.Module subclass")
    return obj


def resolve_value(target: str, trusted: Sequence[str]) -> Any:
    """An ``nn.Module`` subclass, or a trusted function (``torch.nn.functional.gelu``), named by a target.

    A function must be defined in trusted code, not merely imported into a trusted module; torch's
    C functions count when reached through a trusted path and listed as pure (``pickles.TORCH_C_FUNCTIONS``).

    Raises:
        UntrustedTarget, SpecError: as :func:`resolve`; also for anything that is neither.
    """
    import torch

    from registry.pickles import TORCH_C_FUNCTIONS

    obj = _reach(target, trusted)
    if isinstance(obj, type) and issubclass(obj, torch.nn.Module):
        return obj
    if inspect.isfunction(obj) and is_trusted(f"{obj.__module__}.{obj.__qualname__}", trusted):
        return obj
    if inspect.isbuiltin(obj) and (f"{obj.__module__}.{obj.__name__}" in TORCH_C_FUNCTIONS or (
            str(obj.__module__).partition(".")[0] == "torch" and not obj.__name__.startswith("_"))):
        return obj  # torch's own C functions (F.gelu is torch._C._nn.gelu), reached through a trusted path
    if inspect.isfunction(obj) or inspect.isbuiltin(obj):
        raise UntrustedTarget(target, trusted)
    raise SpecError(f"spec target {target!r} is neither an nn.Module subclass nor a function")


def _reach(target: str, trusted: Sequence[str]) -> object:
    _check_target(target, trusted, "target")
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
    """Validate a spec and construct the module it describes, its recorded ``state`` applied.

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
        return build_clean(clean, trusted, device)
    except RuntimeError as e:  # on meta: a constructor read tensor values
        raise SpecError(f"spec: cannot construct {clean['target']} on {device}: {one_line(e)}") from e


def skeleton(spec: Mapping[str, Any], trusted: Sequence[str]) -> torch.nn.Module:
    """The module a spec describes, for checking names, shapes and ties: on meta if its constructor allows."""
    clean = validate(spec, trusted)
    return build_on_meta(clean, trusted) or build_clean(clean, trusted, "cpu")


def build_clean(clean: dict[str, Any], trusted: Sequence[str], device: str | torch.device) -> torch.nn.Module:
    """Construct an already validated spec on ``device`` and apply its state (RuntimeError on meta: retry)."""
    import warnings

    import torch

    try:
        # The constructors' warnings were shown when the model was first built; a rebuild repeats them only.
        with torch.device(device), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            module: torch.nn.Module = _construct(clean, "spec", trusted)
    except RuntimeError as e:
        if str(device) == "meta":
            raise  # build_on_meta falls back to a real device
        raise SpecError(f"spec: cannot construct {clean['target']}: {one_line(e)}") from e
    if not isinstance(module, torch.nn.Module):
        raise SpecError(f"spec: the root target {clean['target']} is a function, not an nn.Module")
    if "state" in clean:
        from registry import fidelity

        fidelity.apply_state(module, clean["state"])
    return module


def build_on_meta(clean: dict[str, Any], trusted: Sequence[str]) -> torch.nn.Module | None:
    """:func:`build_clean` on meta, or None if a constructor needs real tensor values."""
    try:
        return build_clean(clean, trusted, "meta")
    except RuntimeError:
        return None  # a constructor read tensor values (.item(), .tolist()), which meta tensors lack


def _construct(value: Any, path: str, trusted: Sequence[str]) -> Any:
    if isinstance(value, list):
        return [_construct(v, f"{path}[{i}]", trusted) for i, v in enumerate(value)]
    if not isinstance(value, dict):
        return value
    if is_dtype_value(value) or list(value) == ["tensor"]:
        import torch

        name = value["dtype"] if "dtype" in value else value["tensor"]["dtype"]
        dtype = getattr(torch, name, None)
        if not isinstance(dtype, torch.dtype):
            raise SpecError(f"{path}: this torch has no dtype {name!r}")
        if "tensor" in value:
            # A constructor argument that becomes a parameter or buffer: its values are the weights file's.
            return torch.empty(value["tensor"]["shape"], dtype=dtype)
        return dtype
    if "target" not in value:
        return OrderedDict((k, _construct(v, f"{path}.{k}", trusted)) for k, v in value.items())
    target = value["target"]
    obj = resolve_value(target, trusted)
    if not isinstance(obj, type):
        if value.get("args") or value.get("kwargs"):
            raise SpecError(f"{path}: {target} is a function, passed as a value: it takes no args or kwargs")
        return obj
    args = _construct(value.get("args", []), f"{path}.args", trusted)
    kwargs = {k: _construct(v, f"{path}.kwargs.{k}", trusted) for k, v in value.get("kwargs", {}).items()}
    try:
        return obj(*args, **kwargs)
    except RuntimeError:
        raise  # build_clean decides: retry off meta, or report
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
    """Build a module from its spec and assign its weights: :func:`registry.weights.rebuild`."""
    from registry import weights

    return weights.rebuild(spec, state_dict, trusted, device=device, what="the weights")


def load_weights(module: torch.nn.Module, state_dict: Mapping[str, torch.Tensor], *, assign: bool) -> None:
    """``load_state_dict(strict=True)``, its mismatch reported as a one-line :class:`SpecError`."""
    try:
        module.load_state_dict(state_dict, strict=True, assign=assign)
    except RuntimeError as e:
        # torch's message lists the keys over several lines: fold it into the one-line error.
        raise SpecError(f"the weights do not match the architecture: {' '.join(str(e).split())}") from e


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


def __getattr__(name: str) -> Any:
    # capture() and record_init moved to registry.capture; old imports from here keep working.
    if name in ("capture", "record_init"):
        from registry import capture as capture_mod

        return getattr(capture_mod, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
