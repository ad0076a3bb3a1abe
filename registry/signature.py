"""Signatures: a version's example inputs, the outputs it gave when pushed, and comparing them later.

A signature is plain JSON, stored with the version (``versions.signature``)::

    {"inputs":  [{"shape": [2, 128], "dtype": "float32"}],
     "outputs": [{"path": "output", "shape": [2, 1], "dtype": "float32", "values": [0.12, -0.3]},
                 {"path": "output[1]", "shape": [64, 1000], "dtype": "float32",
                  "fingerprint": {"sum": …, "abs_sum": …, "norm": …, "min": …, "max": …,
                                  "nan": 0, "posinf": 0, "neginf": 0, "samples": [[0, 0.1], …]}}],
     "example": {"sha256": "…", "size": 1234}}

Outputs of at most :data:`MAX_VALUES` elements are kept whole; larger ones as a fingerprint whose
statistics are compared with bounds derived from the elementwise tolerance (``|a - b| <= atol +
rtol * |b|`` for every element implies each bound), so a fingerprint mismatch always means a real
mismatch. Non-finite floats are written as the strings ``"nan"``, ``"inf"``, ``"-inf"`` (JSON has none).
The example inputs themselves are a ``torch.save``-d tuple of tensors stored as a content-addressed
blob, loaded back with ``weights_only=True``.
"""

from __future__ import annotations

import io
import math
import os
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from registry.errors import FormatError, one_line, translated

if TYPE_CHECKING:
    import torch

#: Outputs with at most this many elements are recorded value by value.
MAX_VALUES = 64
#: Values sampled at evenly spaced positions of a larger output.
SAMPLES = 16
#: Largest example-inputs blob accepted (it is meant to be a small batch).
MAX_EXAMPLE_BYTES = 64 * 1024 * 1024
DEFAULT_RTOL = 1e-4
DEFAULT_ATOL = 1e-5

Inputs = tuple["torch.Tensor", ...]


@dataclass(frozen=True, slots=True)
class OutputCheck:
    """How one recorded output compares with what the model gives now."""

    path: str  # "output", "output[0]", "output['logits']"
    ok: bool
    detail: str
    max_abs_diff: float | None = None

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True, slots=True)
class CheckReport:
    """The result of running a version's recorded example again."""

    ref: str
    ok: bool
    rtol: float
    atol: float
    outputs: tuple[OutputCheck, ...]

    @property
    def drifted(self) -> list[str]:
        """Paths of the outputs that no longer match."""
        return [o.path for o in self.outputs if not o.ok]

    def to_json(self) -> dict[str, Any]:
        return {"ref": self.ref, "ok": self.ok, "rtol": self.rtol, "atol": self.atol,
                "drifted": self.drifted, "outputs": [o.to_json() for o in self.outputs]}

    def summary(self) -> str:
        """One line: what matched, or which outputs drifted and by how much."""
        tolerance = f"rtol {self.rtol:g}, atol {self.atol:g}"
        if self.ok:
            return f"{self.ref}: {len(self.outputs)} output(s) match the signature ({tolerance})"
        bad = "; ".join(f"{o.path}: {o.detail}" for o in self.outputs if not o.ok)
        return f"{self.ref}: outputs drifted from the signature ({tolerance}): {bad}"


def as_inputs(value: object, *, what: str = "example_inputs") -> Inputs:
    """A tensor or a tuple/list of tensors, as a tuple.

    Raises:
        FormatError: anything else.
    """
    import torch

    items = (value,) if isinstance(value, torch.Tensor) else value
    if not isinstance(items, (tuple, list)) or not items or not all(isinstance(t, torch.Tensor) for t in items):
        raise FormatError(f"{what} must be a tensor or a non-empty tuple of tensors, not {_kind(value)}")
    return tuple(items)


def read_example(path: Path) -> Inputs:
    """Example inputs saved with ``torch.save`` (a tensor or a tuple of tensors), loaded with weights_only.

    Raises:
        FormatError: the file is missing, too big, not loadable with weights_only, or not tensors.
    """
    import stat

    import torch

    from registry import blobfile

    try:
        with open(path, "rb") as f:
            st = os.fstat(f.fileno())
            if not stat.S_ISREG(st.st_mode):
                raise FormatError(f"example file {str(path)!r} is not a regular file")
            if st.st_size > MAX_EXAMPLE_BYTES:
                raise FormatError(f"example file {path.name} has {st.st_size} bytes; example inputs are limited to "
                                  f"{MAX_EXAMPLE_BYTES} bytes (a small batch is enough)")
            vet_example(blobfile.fd_path(f.fileno()), what=f"example file {path.name}")
            data = f.read()  # the bytes just vetted, through the same descriptor
    except OSError as e:
        raise FormatError(f"example file {str(path)!r} cannot be read: {e.strerror or e}") from e
    try:
        obj = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as e:
        # Not torch's own advice ("re-run with weights_only=False"): example files are never unpickled unsafely.
        reason = one_line(e)
        if reason.startswith("Weights only load failed"):
            reason = "it is not a torch.save file, or it holds something other than tensors"
        raise FormatError(f"example file {path.name} is not a torch.save file of tensors: {reason}") from e
    return as_inputs(obj, what=f"example file {path.name}")


def example_bytes(inputs: Inputs) -> bytes:
    """The canonical blob for example inputs: a ``torch.save``-d tuple of contiguous CPU tensors."""
    import torch

    # clone(): a view would otherwise drag its whole base storage into the blob.
    plain = tuple(t.detach().to("cpu").contiguous().clone() for t in inputs)
    buffer = io.BytesIO()
    torch.save(plain, buffer)
    data = buffer.getvalue()
    if len(data) > MAX_EXAMPLE_BYTES:
        raise FormatError(f"example inputs take {len(data)} bytes; they are limited to {MAX_EXAMPLE_BYTES} "
                          "bytes (a small batch is enough)")
    return data


def vet_example(path: Path, *, what: str) -> None:
    """Refuse example bytes that are anything but a torch.save archive of tensors (scanned, never unpickled).

    Raises:
        FormatError: an ambiguous archive, a pickle that references more than tensors and containers,
            or one that would allocate sizes its bytes merely state.
    """
    from registry import pickles
    from registry.records import Format

    try:
        detected = pickles.detect(path, label=what)
    except FormatError as e:
        raise FormatError(f"{what} is not a torch.save file of tensors: {e}") from e
    if detected.format is not Format.STATE_DICT:
        raise FormatError(f"{what} is not a torch.save file of tensors (its bytes are {detected.format.value})")


def load_example(data: bytes, *, what: str) -> Inputs:
    """Example inputs back from their blob's bytes (weights_only)."""
    import torch

    with translated(FormatError, f"the example inputs of {what} cannot be loaded"):
        obj = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    return as_inputs(obj, what=f"the example inputs of {what}")


def run(module: Any, inputs: Inputs, *, what: str) -> Any:
    """Call the module on the inputs without autograd.

    Raises:
        FormatError: the call failed (PyTorch's reason, one line).
    """
    import torch

    # the model's own code: any exception is possible
    with translated(FormatError, f"{what} fails on its example inputs"), torch.no_grad():
        outputs = module(*inputs)
    return outputs


def run_live(model: Any, inputs: Inputs, *, what: str) -> Any:
    """Run a live model as a loaded version runs: in eval mode, without autograd; its modes are restored.

    An ``ExportedProgram`` runs as its ``.module()``, which is what loading one gives.

    Raises:
        FormatError: the call failed.
    """
    import torch

    if isinstance(model, torch.export.ExportedProgram):
        return run(model.module(), inputs, what=what)
    modes = [(m, m.training) for m in model.modules()] if isinstance(model, torch.nn.Module) else []
    try:
        if modes:
            try:
                model.eval()
            except NotImplementedError:  # an ExportedProgram's module: its mode was fixed at export
                modes = []
        return run(model, inputs, what=what)
    finally:
        for m, training in modes:
            m.training = training


def record(inputs: Inputs, outputs: Any) -> dict[str, Any]:
    """Describe the example inputs and the outputs a model gave for them (no ``example`` key yet)."""
    return {"inputs": [_describe(t) for t in inputs],
            "outputs": [_record_output(p, v) for p, v in flatten(outputs)]}


def flatten(value: Any, path: str = "output") -> list[tuple[str, Any]]:
    """Leaves of a nested output (tensors, numbers, None) with their paths."""
    if isinstance(value, (tuple, list)):
        return [leaf for i, v in enumerate(value) for leaf in flatten(v, f"{path}[{i}]")]
    if isinstance(value, Mapping):
        return [leaf for k, v in value.items() for leaf in flatten(v, f"{path}[{k!r}]")]
    return [(path, value)]


def compare(
    ref: str, signature: Mapping[str, Any], outputs: Any, *, rtol: float = DEFAULT_RTOL, atol: float = DEFAULT_ATOL
) -> CheckReport:
    """Compare a model's outputs now with those recorded in ``signature``."""
    actual = dict(flatten(outputs))
    checks: list[OutputCheck] = []
    recorded = list(signature.get("outputs", []))
    for entry in recorded:
        path = entry["path"]
        if path not in actual:
            checks.append(OutputCheck(path, False, "missing from the outputs now"))
        else:
            checks.append(_compare_one(entry, actual.pop(path), rtol, atol))
    checks += [OutputCheck(path, False, "is a new output, not in the signature") for path in actual]
    return CheckReport(ref, all(c.ok for c in checks), rtol, atol, tuple(checks))


def describe(signature: Mapping[str, Any]) -> list[str]:
    """Human-readable lines for ``registry show``."""
    lines = [f"input {i}: {_shape(e)} {e.get('dtype')}" for i, e in enumerate(signature.get("inputs", []))]
    for entry in signature.get("outputs", []):
        if "shape" in entry:
            kept = "values" if "values" in entry else "fingerprint"
            lines.append(f"{entry['path']}: {_shape(entry)} {entry.get('dtype')} ({kept} recorded)")
        else:
            lines.append(f"{entry['path']}: {entry.get('value')!r}")
    example = signature.get("example") or {}
    if example:
        lines.append(f"example inputs: sha256:{example.get('sha256')} ({example.get('size')} bytes)")
    return lines


# -- recording --------------------------------------------------------------------------------


def _describe(t: torch.Tensor) -> dict[str, Any]:
    return {"shape": list(t.shape), "dtype": _dtype_name(t)}


def _record_output(path: str, value: Any) -> dict[str, Any]:
    import torch

    if isinstance(value, torch.Tensor):
        entry: dict[str, Any] = {"path": path, **_describe(value)}
        flat = _as_real(value).reshape(-1)
        if value.numel() <= MAX_VALUES:
            entry["values"] = [_num(v) for v in flat.tolist()]
        else:
            entry["fingerprint"] = _fingerprint(flat)
        return entry
    if value is None or isinstance(value, (bool, int, float)):
        return {"path": path, "value": _num(value)}
    raise FormatError(f"cannot record {path}: a {_kind(value)} is not a tensor or a number")


def _fingerprint(flat: torch.Tensor) -> dict[str, Any]:
    import torch

    x = flat.double()
    finite = torch.isfinite(x)
    y = torch.where(finite, x, torch.zeros((), dtype=x.dtype))
    n = x.numel()
    idx = sorted({round(i * (n - 1) / (SAMPLES - 1)) for i in range(SAMPLES)})
    # Statistics of huge values can overflow to inf: stored as strings like every non-finite float.
    return {
        "sum": _num(float(y.sum())), "abs_sum": _num(float(y.abs().sum())),
        "norm": _num(float(torch.linalg.vector_norm(y))), "min": _num(float(y.min())), "max": _num(float(y.max())),
        "nan": int(torch.isnan(x).sum()), "posinf": int((x == math.inf).sum()), "neginf": int((x == -math.inf).sum()),
        "samples": [[i, _num(float(x[i]))] for i in idx],
    }


# -- comparing --------------------------------------------------------------------------------


def _compare_one(entry: Mapping[str, Any], value: Any, rtol: float, atol: float) -> OutputCheck:
    import torch

    path = entry["path"]
    if "shape" not in entry:
        return _compare_scalar(path, entry.get("value"), value, rtol, atol)
    if not isinstance(value, torch.Tensor):
        return OutputCheck(path, False, f"was a tensor, is now a {_kind(value)}")
    if list(value.shape) != entry["shape"] or _dtype_name(value) != entry["dtype"]:
        return OutputCheck(path, False, f"was {_shape(entry)} {entry['dtype']}, is now "
                                        f"{list(value.shape)} {_dtype_name(value)}")
    flat = _as_real(value.detach().to("cpu")).reshape(-1).double()
    if "values" in entry:
        expected = torch.tensor([_unnum(v) for v in entry["values"]], dtype=torch.float64)
        diff = _max_diff(flat, expected)
        ok = bool(torch.allclose(flat, expected, rtol=rtol, atol=atol, equal_nan=True))
        return OutputCheck(path, ok, f"max abs diff {diff:.3g}", diff)
    return _compare_fingerprint(path, entry["fingerprint"], flat, rtol, atol)


def _compare_fingerprint(path: str, fp: Mapping[str, Any], flat: torch.Tensor, rtol: float, atol: float) -> OutputCheck:
    import torch

    now = _fingerprint(flat)
    n = flat.numel()
    positions = [int(i) for i, _ in fp["samples"]]
    expected = torch.tensor([_unnum(v) for _, v in fp["samples"]], dtype=torch.float64)
    got = flat[positions]
    diff = _max_diff(got, expected)
    problems: list[str] = []
    if not torch.allclose(got, expected, rtol=rtol, atol=atol, equal_nan=True):
        problems.append(f"sampled values differ by up to {diff:.3g}")
    for key in ("nan", "posinf", "neginf"):
        if now[key] != fp[key]:
            problems.append(f"{key} count {fp[key]} -> {now[key]}")
    was = {k: _unnum(fp[k]) for k in ("sum", "abs_sum", "norm", "min", "max")}
    is_ = {k: _unnum(now[k]) for k in was}
    peak = max(abs(was["min"]), abs(was["max"]))
    bounds = {"sum": atol * n + rtol * was["abs_sum"], "abs_sum": atol * n + rtol * was["abs_sum"],
              "norm": atol * math.sqrt(n) + rtol * was["norm"], "min": atol + rtol * peak, "max": atol + rtol * peak}
    for key, bound in bounds.items():
        same = was[key] == is_[key]  # also inf == inf, where the difference would be nan
        if not same and not abs(is_[key] - was[key]) <= bound * (1 + 1e-9) + 1e-12:
            problems.append(f"{key} {was[key]:.6g} -> {is_[key]:.6g}")
    if problems:
        return OutputCheck(path, False, "; ".join(problems), diff)
    return OutputCheck(path, True, f"fingerprint matches (sampled max abs diff {diff:.3g})", diff)


def _compare_scalar(path: str, expected: Any, value: Any, rtol: float, atol: float) -> OutputCheck:
    import torch

    if isinstance(value, torch.Tensor) and value.numel() == 1:
        value = value.item()
    was = _unnum(expected) if isinstance(expected, str) else expected
    if was is None or isinstance(was, bool) or isinstance(value, bool) or value is None:
        ok = was == value and type(was) is type(value)
        return OutputCheck(path, ok, f"was {expected!r}, is now {value!r}")
    if not isinstance(value, (int, float)):
        return OutputCheck(path, False, f"was a number, is now a {_kind(value)}")
    both_nan = math.isnan(was) and math.isnan(value)
    diff = 0.0 if both_nan or was == value else abs(float(value) - float(was))
    ok = both_nan or diff <= atol + rtol * abs(was)
    return OutputCheck(path, ok, f"was {expected!r}, is now {_num(value)!r}", diff)


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    import torch

    if a.numel() == 0:
        return 0.0
    d = (a - b).abs()
    d = torch.where((a == b) | (torch.isnan(a) & torch.isnan(b)), torch.zeros((), dtype=d.dtype), d)
    return float(torch.nan_to_num(d, nan=math.inf).max())


# -- helpers ----------------------------------------------------------------------------------


def _as_real(t: torch.Tensor) -> torch.Tensor:
    import torch

    t = t.detach()
    if t.is_complex():
        return torch.view_as_real(t.resolve_conj())
    return t if t.dtype is not torch.bool else t.to(torch.uint8)


def _dtype_name(t: torch.Tensor) -> str:
    return str(t.dtype).removeprefix("torch.")


def _num(v: Any) -> Any:
    if isinstance(v, float) and not math.isfinite(v):
        return "nan" if math.isnan(v) else ("inf" if v > 0 else "-inf")
    return v


def _unnum(v: Any) -> float:
    return float(v)  # numbers, and the strings "nan", "inf", "-inf"


def _shape(entry: Mapping[str, Any]) -> str:
    return "[" + ", ".join(str(d) for d in entry.get("shape", [])) + "]"


def _kind(value: object) -> str:
    return type(value).__name__
