"""What a stored version does: load it, describe it, run its recorded signature, convert it, diff two versions.

Each function takes a version record already resolved by the facade, the store its bytes are in, and
the settings; whatever is deserialised is read from :meth:`BlobStore.open_verified`'s verified file.
"""

from __future__ import annotations

import tempfile
from collections.abc import Mapping
from contextlib import ExitStack
from pathlib import Path
from typing import TYPE_CHECKING, Any

from registry import queries
from registry.config import Settings
from registry.errors import FormatError, SpecError
from registry.records import Format, ModelVersion
from registry.store import BlobStore

if TYPE_CHECKING:
    import torch

    from registry.diff import DiffReport
    from registry.diff import Side as DiffSide
    from registry.signature import CheckReport


def load(store: BlobStore, settings: Settings, mv: ModelVersion, *, map_location: str | torch.device | None = None,
         trust_code: bool = False) -> torch.nn.Module:
    """The version as an ``nn.Module``, deserialised from its verified bytes (see :meth:`Registry.load`)."""
    from registry import formats

    with store.open_verified(mv.sha256, mv.size, artifact=mv.ref, name=mv.name) as path:
        return formats.load(
            path, mv.format, spec=mv.spec, trusted=settings.trusted_modules,
            map_location=map_location, trust_code=trust_code, artifact=mv.ref,
        )


def describe(store: BlobStore, settings: Settings, mv: ModelVersion, *, map_location: str | None = None,
             trust_code: bool = False) -> dict[str, Any]:
    """Load the version and summarise the module: class, parameter count and bytes, dtypes, device."""
    module = load(store, settings, mv, map_location=map_location, trust_code=trust_code)
    params = list(module.parameters())
    return {
        "ref": mv.ref, "format": mv.format.value, "class": type(module).__qualname__,
        "parameters": sum(p.numel() for p in params),
        "parameter_bytes": sum(p.numel() * p.element_size() for p in params),
        "dtypes": ", ".join(sorted({str(p.dtype).removeprefix("torch.") for p in params})) or "-",
        "device": ", ".join(sorted({str(p.device) for p in params})) or "-",
    }


def read_example(store: BlobStore, mv: ModelVersion) -> tuple[torch.Tensor, ...]:
    """The example inputs recorded with the version (verified, loaded with ``weights_only=True``)."""
    from registry import signature

    if mv.example_sha256 is None or mv.signature is None:
        raise FormatError(f"{mv.ref} has no recorded signature; push it with --example FILE "
                          "(example_inputs=) to record one")
    size = int(mv.signature["example"]["size"])
    with store.open_verified(mv.example_sha256, size, artifact=f"the example inputs of {mv.ref}",
                             name=mv.name) as path:
        signature.vet_example(path, what=f"the example inputs of {mv.ref}")
        return signature.load_example(path.read_bytes(), what=mv.ref)


def check(store: BlobStore, settings: Settings, mv: ModelVersion, *, rtol: float | None, atol: float | None,
          trust_code: bool) -> CheckReport:
    """Run the version on its recorded example inputs and compare with the recorded outputs."""
    from registry import signature

    rtol = signature.DEFAULT_RTOL if rtol is None else rtol
    atol = signature.DEFAULT_ATOL if atol is None else atol
    inputs = read_example(store, mv)
    assert mv.signature is not None  # read_example() raised otherwise
    module = load(store, settings, mv, trust_code=trust_code)
    outputs = signature.run(module, inputs, what=mv.ref)
    return signature.compare(mv.ref, mv.signature, outputs, rtol=rtol, atol=atol)


def convert(
    sessions: queries.Sessions, store: BlobStore, settings: Settings, mv: ModelVersion, to: Format | str, *,
    example_inputs: Any, spec: Mapping[str, Any] | None, rtol: float | None, atol: float | None,
    trust_code: bool, description: str | None,
) -> ModelVersion:
    """Load the version, write it as ``to`` and push that as the next version (see :meth:`Registry.convert`)."""
    from registry import convert as conversions
    from registry import intake, signature

    rtol = signature.DEFAULT_RTOL if rtol is None else rtol
    atol = signature.DEFAULT_ATOL if atol is None else atol
    target = conversions.check_target(mv, intake.parse_format(to))
    given = signature.as_inputs(example_inputs) if example_inputs is not None else None
    recorded = read_example(store, mv) if mv.example_sha256 is not None else None
    trace = given if given is not None else recorded
    if target is Format.EXPORT and trace is None:
        raise conversions.missing_example(mv)
    new_spec = conversions.spec_for(mv, target, spec)
    module = load(store, settings, mv, trust_code=trust_code)
    return intake.push(
        sessions, store, settings, mv.name, module, format=target, spec=new_spec, description=description,
        tags=None, alias=None, example_inputs=recorded if recorded is not None else given, dynamic_shapes=None,
        trace_inputs=trace, lineage=mv.ref, expected=mv if recorded is not None else None,
        rtol=rtol, atol=atol, trust_code=trust_code,
    )



def diff(store: BlobStore, settings: Settings, a: ModelVersion, b: ModelVersion, *, trust_code: bool) -> DiffReport:
    """Compare the parameters of two versions through memory maps, one tensor pair at a time."""
    from registry import diff as differ

    with tempfile.TemporaryDirectory(prefix="registry-diff-") as tmp, ExitStack() as held:
        side_a = _diff_side(store, settings, a, Path(tmp) / "a.safetensors", trust_code, held)
        side_b = _diff_side(store, settings, b, Path(tmp) / "b.safetensors", trust_code, held)
        return differ.compare(side_a, side_b, trusted=settings.trusted_modules)


def _diff_side(store: BlobStore, settings: Settings, mv: ModelVersion, scratch: Path, trust_code: bool,
               held: ExitStack) -> DiffSide:
    from registry import diff as differ
    from registry import formats

    if mv.format in (Format.STATE_DICT, Format.SAFETENSORS):
        path = held.enter_context(store.open_verified(mv.sha256, mv.size, artifact=mv.ref, name=mv.name))
        formats.vet(path, mv.format, artifact=mv.ref, trust_code=trust_code)
        return differ.Side(mv.ref, path, mv.format, mv.spec)
    # No mappable tensor file: load this one model alone, write its tensors out, let it go.
    module = load(store, settings, mv, trust_code=trust_code)
    spec = mv.spec
    if mv.format is Format.FULL:
        from registry import spec as spec_mod

        try:
            spec = spec_mod.capture(module)
        except SpecError:
            spec = None
    differ.materialize(module, scratch)
    del module
    return differ.Side(mv.ref, scratch, Format.SAFETENSORS, spec)
