"""What a push reads: a saved file or a live module, checked and staged before anything is stored."""

from __future__ import annotations

import os
import shutil
import tempfile
import uuid
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from registry import pickles
from registry.errors import FormatError, SpecError, UntrustedPickle
from registry.records import SPEC_FORMATS, Format
from registry.store import Blob, BlobStore

if TYPE_CHECKING:
    import torch

#: The format, the checked spec, what detection found, and for programs what they call (``program`` column).
Prepared = tuple[Format, "dict[str, Any] | None", pickles.Detected, "dict[str, list[str]] | None"]


class FileSource:
    """A model file on disk; pushing it never imports torch unless its spec must be checked."""

    def __init__(self, path: Path, store: BlobStore) -> None:
        self.path, self._store = path, store

    def __enter__(self) -> FileSource:
        return self

    def __exit__(self, *exc: object) -> None:
        pass

    def prepare(self, declared: Format | None, spec: Mapping[str, Any] | None,
                trusted: Sequence[str], *, trust_code: bool = False) -> Prepared:
        if not self.path.is_file():
            raise FormatError(f"file {str(self.path)!r} does not exist or is not a regular file")
        return check(self.path, declared, spec, trusted, module=None, trust_code=trust_code)

    def store(self) -> Blob:
        return self._store.put_file(self.path)

    @property
    def artifact_path(self) -> Path:
        """The local file holding the artifact's bytes (for recording a signature)."""
        return self.path


class ModuleSource:
    """A live ``nn.Module``, serialised once into the store's staging area."""

    def __init__(self, module: torch.nn.Module, store: BlobStore, *,
                 example_inputs: tuple[torch.Tensor, ...] | None = None, dynamic_shapes: Any = None) -> None:
        import torch

        if not isinstance(module, (torch.nn.Module, torch.export.ExportedProgram)):
            raise FormatError(
                f"cannot push a {type(module).__name__}: pass an nn.Module or the path of a saved model file"
            )
        self.module, self._store = module, store
        self._export_args = {"example_inputs": example_inputs, "dynamic_shapes": dynamic_shapes}
        self._dir = store.tmp_dir() if store.local else Path(tempfile.mkdtemp(prefix="registry-"))
        self._staged = self._dir / f"{uuid.uuid4().hex}.part"
        self._format: Format = Format.STATE_DICT

    def __enter__(self) -> ModuleSource:
        return self

    def __exit__(self, *exc: object) -> None:
        self._staged.unlink(missing_ok=True)
        if not self._store.local:
            shutil.rmtree(self._dir, ignore_errors=True)

    def prepare(self, declared: Format | None, spec: Mapping[str, Any] | None,
                trusted: Sequence[str], *, trust_code: bool = False) -> Prepared:
        import torch

        from registry import fidelity, formats
        from registry import spec as spec_mod

        if isinstance(self.module, torch.export.ExportedProgram):
            if declared not in (None, Format.EXPORT):
                raise FormatError(f"an ExportedProgram can only be pushed as export, not {declared.value}")
            declared = Format.EXPORT
        if declared is None:
            declared = Format.TORCHSCRIPT if isinstance(self.module, torch.jit.ScriptModule) else Format.STATE_DICT
        if declared in SPEC_FORMATS:
            if spec is None:
                spec = spec_mod.capture(self.module)
            # What the weights file does not carry (ties, flags, changed buffers) goes into the spec,
            # and the spec is checked to rebuild this very module, before anything is written.
            spec = fidelity.seal(self.module, spec, trusted, declared)
        fidelity.check_format(self.module, declared)
        self._format = declared
        formats.save(self.module, declared, self._staged, **self._export_args)
        return check(self._staged, declared, spec, trusted, module=self.module, trust_code=trust_code)

    def store(self) -> Blob:
        from registry import formats

        if not self._staged.exists():  # consumed by an earlier attempt's rename
            formats.save(self.module, self._format, self._staged, **self._export_args)
        return self._store.adopt(self._staged)

    @property
    def artifact_path(self) -> Path:
        """The staged file holding the artifact's bytes (for recording a signature)."""
        return self._staged


def check(path: Path, declared: Format | None, spec: Mapping[str, Any] | None,
          trusted: Sequence[str], *, module: torch.nn.Module | None, trust_code: bool = False) -> Prepared:
    """Detect the format from the bytes and refuse anything the registry should not accept.

    A whole-model pickle may reference only the allow-list of :func:`pickles.untrusted_globals` unless
    ``trust_code``; plainly dangerous globals are refused even then. A TorchScript program is read
    for the operators it calls and whether it is data-only (recorded; loading one that is not needs
    ``trust_code``); a ``.pt2`` must pass :func:`registry.pt2.vet`.
    """
    label = path.name if module is None else "the model"
    detected = pickles.detect(path, label=label)
    if declared is not None and declared is not detected.format:
        raise FormatError(
            f"{path.name} was declared {declared.value} but its bytes are {detected.format.value}; "
            f"push it with --format {detected.format.value} (or leave --format out)"
        )
    main = sorted(g for g in detected.globals_ if g.startswith("__main__."))
    if main:
        raise FormatError(
            f"the pickle references {', '.join(main)}, defined in a script (__main__), which no other "
            "process can import; move the class into a module, or push as state_dict with a spec"
        )
    bad = pickles.dangerous(pickles.parse_globals(detected.globals_))
    if bad:
        raise UntrustedPickle(f"{label} is refused: its pickle", bad,
                              hint="no model needs these; it would run code when loaded")
    if detected.format is Format.FULL and not trust_code:
        outside = pickles.untrusted_globals(detected.globals_, trusted)
        if outside:
            raise UntrustedPickle(
                f"{label} is refused: its pickle", outside,
                hint="a whole-model pickle may reference torch.nn and the modules in REGISTRY_TRUSTED_MODULES; "
                "add their module there, push a state_dict with a spec, or pass --trust-code "
                "(trust_code=True) if you trust its author",
            )
    program: dict[str, list[str]] | None = None
    if detected.format is Format.EXPORT:
        from registry import programs, pt2

        pt2.vet(path, label=label, detected=detected)
        program = {"operators": list(programs.export_operators(path)), "problems": []}
    elif detected.format is Format.TORCHSCRIPT:
        from registry import programs

        report = programs.vet_torchscript(path, label)
        program = {"operators": list(report.ops), "problems": list(report.problems)}
    checked: dict[str, Any] | None = None
    if spec is not None:
        from registry import spec as spec_mod

        checked = spec_mod.validate(spec, trusted)
    if detected.format in SPEC_FORMATS:
        if checked is None:
            raise SpecError(
                f"{path.name} is a {detected.format.value}, which needs an architecture spec to be "
                "loaded again: pass --arch SPEC.json (spec= in Python)"
            )
        _check_weights(path, detected.format, checked, trusted)
    return detected.format, checked, detected, program


def _check_weights(path: Path, fmt: Format, spec: dict[str, Any], trusted: Sequence[str]) -> None:
    from registry import formats
    from registry import spec as spec_mod

    tensors = formats.meta_tensors(path, fmt)
    skeleton = spec_mod.skeleton(spec, trusted)
    if fmt is Format.SAFETENSORS:
        from registry import weights

        # Tied tensors are stored once under one of their names; the architecture says which.
        groups = weights.tie_groups(skeleton)
        weights.check_ties(path, groups, what=path.name)
        tensors = weights.expand_ties(tensors, groups, what=path.name)
    spec_mod.check_state_dict(skeleton, tensors)


def recheck(stored: Path, checked: pickles.Detected, source: object) -> None:
    """Refuse a push whose stored bytes are not the ones :func:`check` looked at."""
    again = pickles.detect(stored)
    if (again.format, again.globals_, again.pickles) != (checked.format, checked.globals_, checked.pickles):
        what = source if isinstance(source, (str, os.PathLike)) else "the model"
        raise FormatError(f"{what} changed while it was being pushed; nothing was recorded, push it again")
