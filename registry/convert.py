"""Converting a version to another format: which targets exist and what each conversion needs.

The conversion itself is a push of the loaded module in the target format (see ``Registry.convert``):
``state_dict``/``safetensors`` write its parameters (the spec comes from the source version, is
captured from the loaded module, or is given), ``torchscript`` scripts it and ``export`` traces it
with example inputs. A conversion PyTorch cannot do (exporting a ScriptModule, scripting an exported
program) fails with PyTorch's reason in one line and pushes nothing.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from registry.errors import FormatError, SpecError
from registry.records import SPEC_FORMATS, Format, ModelVersion

#: Formats a version can be converted to (``full`` is not one: it would pickle the module object).
TARGETS = (Format.STATE_DICT, Format.SAFETENSORS, Format.TORCHSCRIPT, Format.EXPORT)


def check_target(source: ModelVersion, to: Format | None) -> Format:
    """The target format, if converting ``source`` to it is meaningful.

    Raises:
        FormatError: no such target, or the version is already in it.
    """
    if to not in TARGETS:
        choices = ", ".join(f.value for f in TARGETS)
        raise FormatError(f"cannot convert to {to.value if to else 'auto'}: choose one of {choices}")
    if to is source.format:
        raise FormatError(f"{source.ref} is already {to.value}; nothing to convert")
    return to


def spec_for(source: ModelVersion, to: Format, spec: Mapping[str, Any] | None) -> Mapping[str, Any] | None:
    """The architecture spec the converted version records (None: captured from the loaded module).

    Raises:
        SpecError: the target needs a spec and the source format neither records one nor can give one.
    """
    if spec is not None or to not in SPEC_FORMATS:
        return spec
    if source.spec is not None:
        return source.spec
    if source.format in (Format.TORCHSCRIPT, Format.EXPORT):
        raise SpecError(
            f"converting {source.ref} ({source.format.value}) to {to.value} needs an architecture spec, "
            f"which a {source.format.value} version does not record: pass --arch SPEC.json (spec=)"
        )
    return None  # a whole-model pickle: the spec is captured from the module it loads as


def missing_example(source: ModelVersion) -> FormatError:
    return FormatError(
        f"converting {source.ref} to export needs example inputs to trace it with: {source.ref} has no "
        "recorded signature; pass --example FILE (example_inputs=)"
    )
