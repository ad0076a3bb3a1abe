"""Comparing the parameters of two versions: spec differences, tensors added, removed or changed, max |a - b|.

Tensors are read through memory maps (``torch.load(mmap=True, weights_only=True)`` for a state_dict,
``safe_open`` for safetensors), one pair at a time, in chunks; after each pair its pages are handed
back to the kernel (``madvise(MADV_PAGEOUT)`` on Linux), so the resident set stays near one tensor pair
however large the models are. Formats without a mappable tensor file (full, torchscript, export) are
loaded one at a time and written to a temporary safetensors file first.
"""

from __future__ import annotations

import ctypes
import inspect
import json
import math
import mmap
import os
import sys
from collections.abc import Iterator, Mapping, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from registry.errors import FormatError, one_line
from registry.records import Format

if TYPE_CHECKING:
    import torch

#: Elements compared at once (float64 temporaries of this many elements).
CHUNK = 1 << 20
_MADV_DONTNEED = 4  # only ever applied to private mappings of the version's file (see _Mapped)


@dataclass(frozen=True, slots=True)
class TensorChange:
    """One tensor that differs: ``change`` is added, removed, shape, dtype or values."""

    name: str
    change: str
    a: str | None = None  # "[16, 128] float32" on side A (None if absent)
    b: str | None = None
    max_abs_diff: float | None = None

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        if self.max_abs_diff is not None and not math.isfinite(self.max_abs_diff):
            data["max_abs_diff"] = str(self.max_abs_diff)  # JSON has no inf/nan
        return data

    def __str__(self) -> str:
        if self.change == "added":
            return f"+ {self.name}  {self.b}"
        if self.change == "removed":
            return f"- {self.name}  {self.a}"
        if self.change == "values":
            return f"~ {self.name}  max abs diff {self.max_abs_diff:.6g}"
        return f"~ {self.name}  {self.change} {self.a} -> {self.b}"


@dataclass(frozen=True, slots=True)
class DiffReport:
    """What differs between the parameters of versions ``a`` and ``b``."""

    a: str
    b: str
    spec: tuple[str, ...]  # one line per spec difference
    spec_note: str | None  # why specs were not compared, if they were not
    tensors: tuple[TensorChange, ...]
    compared: int  # tensors present in both with the same shape and dtype
    equal: int  # … of which bit-for-bit equal values (max abs diff 0)

    @property
    def identical(self) -> bool:
        return not self.spec and not self.tensors

    def to_json(self) -> dict[str, Any]:
        return {"a": self.a, "b": self.b, "identical": self.identical, "spec": list(self.spec),
                "spec_note": self.spec_note, "tensors": [t.to_json() for t in self.tensors],
                "compared": self.compared, "equal": self.equal}

    def lines(self) -> list[str]:
        differ = sum(1 for t in self.tensors if t.change == "values")
        head = f"{self.a} -> {self.b}: " + ("identical" if self.identical else
                                            f"{len(self.tensors)} tensor change(s), {differ} of {self.compared} "
                                            f"common tensors differ in value, {len(self.spec)} spec change(s)")
        out = [head]
        if self.spec_note:
            out.append(f"spec: {self.spec_note}")
        out += [f"spec {line}" for line in self.spec]
        out += [str(t) for t in self.tensors]
        return out


@dataclass(frozen=True, slots=True)
class Side:
    """One version as diff reads it: a mappable tensor file, its format and its spec (if any)."""

    label: str
    path: Path
    format: Format  # STATE_DICT or SAFETENSORS
    spec: Mapping[str, Any] | None


def compare(a: Side, b: Side, *, trusted: Sequence[str], spec_note: str | None = None) -> DiffReport:
    """Diff two tensor files, one tensor pair in memory at a time."""
    spec_lines: list[str] = []
    if a.spec is not None and b.spec is not None:
        spec_lines = spec_changes(a.spec, b.spec)
        if spec_lines and not spec_changes(canonical_spec(a.spec, trusted), canonical_spec(b.spec, trusted)):
            spec_lines = []  # e.g. a captured spec spells out defaults a hand-written one leaves implicit
            spec_note = spec_note or "the specs are written differently but describe the same architecture"
    elif spec_note is None and (a.spec is not None or b.spec is not None):
        missing = a.label if a.spec is None else b.label
        spec_note = f"not compared: {missing} records no architecture spec"
    with ExitStack() as stack:
        ra = stack.enter_context(_reader(a, trusted))
        rb = stack.enter_context(_reader(b, trusted))
        changes: list[TensorChange] = []
        compared = equal = 0
        names_b = set(rb.names)
        for name in ra.names:
            if name not in names_b:
                changes.append(TensorChange(name, "removed", a=ra.describe(name)))
                continue
            da, db = ra.describe(name), rb.describe(name)
            shape_a, dtype_a = da.rsplit(" ", 1)
            shape_b, dtype_b = db.rsplit(" ", 1)
            if shape_a != shape_b:
                changes.append(TensorChange(name, "shape", a=da, b=db))
                continue
            if dtype_a != dtype_b:
                changes.append(TensorChange(name, "dtype", a=da, b=db))
                continue
            ta, tb = ra.get(name), rb.get(name)
            try:
                diff = max_abs_diff(ta, tb)
            finally:
                ra.pages.release(ta)
                rb.pages.release(tb)
                del ta, tb
            compared += 1
            if diff == 0:
                equal += 1
            else:
                changes.append(TensorChange(name, "values", a=da, b=db, max_abs_diff=diff))
        names_a = set(ra.names)
        changes += [TensorChange(n, "added", b=rb.describe(n)) for n in rb.names if n not in names_a]
    return DiffReport(a.label, b.label, tuple(spec_lines), spec_note, tuple(changes), compared, equal)


def spec_changes(a: Any, b: Any, path: str = "") -> list[str]:
    """Differences between two JSON values, one line each: ``args[0].kwargs.out_features: 16 -> 32``."""
    if isinstance(a, dict) and isinstance(b, dict):
        out: list[str] = []
        for key in sorted(set(a) | set(b)):
            where = f"{path}.{key}" if path else key
            if key not in b:
                out.append(f"{where}: removed (was {_js(a[key])})")
            elif key not in a:
                out.append(f"{where}: added {_js(b[key])}")
            else:
                out += spec_changes(a[key], b[key], where)
        return out
    if isinstance(a, list) and isinstance(b, list):
        out = []
        for i in range(max(len(a), len(b))):
            where = f"{path}[{i}]"
            if i >= len(b):
                out.append(f"{where}: removed (was {_js(a[i])})")
            elif i >= len(a):
                out.append(f"{where}: added {_js(b[i])}")
            else:
                out += spec_changes(a[i], b[i], where)
        return out
    numbers = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (a, b))
    if a != b or (type(a) is not type(b) and not numbers):
        return [f"{path or 'spec'}: {_js(a)} -> {_js(b)}"]
    return []


def canonical_spec(value: Any, trusted: Sequence[str]) -> Any:
    """A spec with each target named by its defining module, and its arguments bound to parameter
    names with those at their default values left out: two ways of writing one architecture agree."""
    from registry import spec as spec_mod

    if isinstance(value, list):
        return [canonical_spec(v, trusted) for v in value]
    if not isinstance(value, dict):
        return value
    if "target" not in value:
        return {k: canonical_spec(v, trusted) for k, v in value.items()}
    cls = spec_mod.resolve(value["target"], trusted)
    args = canonical_spec(value.get("args", []), trusted)
    kwargs = canonical_spec(value.get("kwargs", {}), trusted)
    try:
        signature = inspect.signature(cls.__init__)
        bound = signature.bind_partial(None, *args, **kwargs).arguments  # None stands for self
    except (TypeError, ValueError):
        return {"target": f"{cls.__module__}.{cls.__qualname__}", "args": args, "kwargs": kwargs}
    params = signature.parameters
    kept = {k: v for k, v in list(bound.items())[1:]
            if not (params[k].default is not inspect.Parameter.empty and _same(params[k].default, v))}
    return {"target": f"{cls.__module__}.{cls.__qualname__}", "arguments": kept}


def _same(default: Any, value: Any) -> bool:
    try:
        return bool(default == value) and type(default) in (type(value), int, float)
    except Exception:  # an exotic default that cannot be compared: keep the argument
        return False


def max_abs_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    """Largest |a - b| over all elements, in chunks (NaN against NaN counts as equal, against a number as inf)."""
    import torch

    fa, fb = a.reshape(-1), b.reshape(-1)
    wide = torch.complex128 if a.is_complex() else torch.float64
    n = fa.numel()
    # Two reused buffers: fresh chunk-sized temporaries would be mapped and faulted in again every time.
    bx = torch.empty(min(n, CHUNK), dtype=wide)
    by = torch.empty(min(n, CHUNK), dtype=wide)
    best = 0.0
    for start in range(0, n, CHUNK):
        stop = min(n, start + CHUNK)
        x, y = bx[: stop - start], by[: stop - start]
        x.copy_(fa[start:stop])
        y.copy_(fb[start:stop])
        d = x.sub_(y).abs_() if not x.is_complex() else (x - y).abs()
        peak = float(d.max())  # NaN if any element is: a NaN somewhere, or inf - inf
        if math.isnan(peak):
            x.copy_(fa[start:stop])
            same = (x == y) | (torch.isnan(x) & torch.isnan(y))
            d = (x - y).abs()
            peak = float(torch.nan_to_num(torch.where(same, torch.zeros((), dtype=d.dtype), d), nan=math.inf).max())
        best = max(best, peak)
        if best == math.inf:
            break
    return best


def materialize(module: torch.nn.Module, path: Path) -> None:
    """Write a module's state_dict as safetensors, every name kept (shared tensors saved as copies)."""
    from safetensors.torch import save_file

    seen: set[tuple[int, int]] = set()
    tensors: dict[str, torch.Tensor] = {}
    for name, t in module.state_dict().items():
        key = (t.untyped_storage().data_ptr(), t.storage_offset())
        t = t.detach().to("cpu")
        tensors[name] = t.clone() if key in seen or not t.is_contiguous() else t
        seen.add(key)
    try:
        save_file(tensors, str(path))
    except Exception as e:
        raise FormatError(f"cannot read the tensors of the model for diff: {e}") from e


# -- readers ----------------------------------------------------------------------------------


class _Reader:
    names: list[str]
    pages: _Pages

    def describe(self, name: str) -> str:
        raise NotImplementedError

    def get(self, name: str) -> torch.Tensor:
        raise NotImplementedError


class _StateDictReader(_Reader):
    def __init__(self, tensors: dict[str, torch.Tensor]) -> None:
        self._tensors = tensors
        self.names = list(tensors)

    def describe(self, name: str) -> str:
        t = self._tensors[name]
        return f"{list(t.shape)} {str(t.dtype).removeprefix('torch.')}"

    def get(self, name: str) -> torch.Tensor:
        return self._tensors[name]


class _SafetensorsReader(_Reader):
    def __init__(self, handle: Any, aliases: dict[str, str]) -> None:
        self._f = handle
        self._alias = aliases  # every name -> the name the file stores it under
        self.names = list(aliases)

    def describe(self, name: str) -> str:
        from registry.weights import _DTYPES

        view = self._f.get_slice(self._alias[name])
        code = view.get_dtype()
        return f"{list(view.get_shape())} {_DTYPES.get(code, code)}"

    def get(self, name: str) -> torch.Tensor:
        t: torch.Tensor = self._f.get_tensor(self._alias[name])
        return t


@contextmanager
def _reader(side: Side, trusted: Sequence[str]) -> Iterator[_Reader]:
    import torch

    if side.format is Format.STATE_DICT:
        try:
            obj = torch.load(side.path, map_location="cpu", weights_only=True, mmap=True)
        except Exception as e:
            raise FormatError(f"cannot read {side.label}: {one_line(e)}") from e
        if not isinstance(obj, Mapping) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
            raise FormatError(f"{side.label} is not a state_dict of tensors")
        reader: _Reader = _StateDictReader(dict(obj))
        reader.pages = _Pages(side.path)
        yield reader
        return
    from safetensors import safe_open

    try:
        handle = safe_open(str(side.path), framework="pt")
    except Exception as e:
        raise FormatError(f"cannot read {side.label}: {one_line(e)}") from e
    with handle as f:
        stored = list(f.keys())
        aliases = {n: n for n in stored}
        if side.spec is not None:
            aliases = _tie_aliases(side.spec, trusted, stored)
        reader = _SafetensorsReader(f, aliases)
        reader.pages = _Pages(side.path)
        yield reader


def _tie_aliases(spec: Mapping[str, Any], trusted: Sequence[str], stored: list[str]) -> dict[str, str]:
    """Every state_dict name the file stands for: tied names it stores once map to the stored one."""
    from registry import spec as spec_mod
    from registry import weights

    aliases = {n: n for n in stored}
    for group in weights.tie_groups(spec_mod.skeleton(spec, trusted)):
        present = [n for n in group if n in aliases]
        if present:
            for name in group:
                aliases.setdefault(name, present[0])
    return dict(sorted(aliases.items(), key=lambda item: (item[0] not in stored, item[0])))


class _Pages:
    """Hands the pages of one file's memory maps back to the kernel once a tensor is done (Linux only).

    ``madvise(MADV_DONTNEED)`` is applied only to address ranges that ``/proc/self/maps`` shows as a
    mapping of this very file: there it drops clean file pages (read again from the file if touched),
    never anonymous memory. Nothing here writes to the mapped tensors.
    """

    def __init__(self, path: Path) -> None:
        self._path = os.path.realpath(path)
        self._enabled = sys.platform.startswith("linux")

    def release(self, t: torch.Tensor) -> None:
        if not self._enabled or t.device.type != "cpu":
            return
        storage = t.untyped_storage()
        start, end = storage.data_ptr(), storage.data_ptr() + storage.nbytes()
        if end - start < (1 << 20):
            return  # small tensors: not worth the system calls
        page = mmap.PAGESIZE
        for lo, hi in self._ranges():
            a, b = max(lo, start + (-start) % page), min(hi, end - end % page)
            if a < b:
                try:
                    _libc().madvise(ctypes.c_void_p(a), ctypes.c_size_t(b - a), ctypes.c_int(_MADV_DONTNEED))
                except (OSError, AttributeError):  # pragma: no cover - no madvise in this libc
                    self._enabled = False

    def _ranges(self) -> list[tuple[int, int]]:
        found: list[tuple[int, int]] = []
        try:
            with open("/proc/self/maps", encoding="utf-8", errors="replace") as maps:
                for line in maps:
                    fields = line.rstrip("\n").split(maxsplit=5)
                    if len(fields) == 6 and fields[5] == self._path:
                        lo, _, hi = fields[0].partition("-")
                        found.append((int(lo, 16), int(hi, 16)))
        except OSError:
            self._enabled = False
        return found


_LIBC: Any = None


def _libc() -> Any:
    global _LIBC
    if _LIBC is None:
        _LIBC = ctypes.CDLL(None, use_errno=True)
    return _LIBC


def _js(value: Any) -> str:
    return json.dumps(value, sort_keys=True)
