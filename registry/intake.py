"""One push from start to finish: stage, detect, vet, check against the spec, record the signature, store, commit.

Nothing reaches the database before the bytes are stored, and a version row is inserted only while
holding the lock gc takes to remove a blob, after checking the blob is still there.
"""

from __future__ import annotations

import os
import platform
from collections.abc import Mapping, Sequence
from contextlib import ExitStack
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from registry import _testhooks, pickles, queries
from registry.config import Settings
from registry.errors import FormatError, InvalidText, SpecError, StorageError, UntrustedPickle
from registry.records import SPEC_FORMATS, Format, ModelVersion
from registry.refs import validate_name, validate_text
from registry.store import Blob, BlobStore

if TYPE_CHECKING:
    import torch

#: Times a push stores its blob again when a concurrent gc or delete takes it before the commit.
PUSH_ATTEMPTS = 3

#: The format, the checked spec, what detection found, and for programs what they call (``program`` column).
Prepared = tuple[Format, "dict[str, Any] | None", pickles.Detected, "dict[str, list[str]] | None"]


def push(
    sessions: queries.Sessions,
    store: BlobStore,
    settings: Settings,
    name: str,
    source: Any,
    *,
    format: Format | str | None,
    spec: Mapping[str, Any] | None,
    description: str | None,
    tags: Mapping[str, str] | None,
    alias: str | None,
    example_inputs: Any,
    dynamic_shapes: Any,
    trace_inputs: Any = None,
    lineage: str | None = None,
    expected: ModelVersion | None = None,
    rtol: float = 0.0,
    atol: float = 0.0,
    trust_code: bool = False,
) -> ModelVersion:
    """:meth:`Registry.push`, plus what a conversion needs: the version it came from (``lineage``), whose
    signature the new artifact must reproduce (``expected``), and separate inputs to trace an export with."""
    name = validate_name(name)
    if alias is not None:
        validate_name(alias, kind="alias")
    tag_map = check_tags(tags)
    fmt = parse_format(format)
    if description is not None:
        validate_text(description, "description", multiline=True)
    inputs = None
    if example_inputs is not None:
        from registry import signature

        inputs = signature.as_inputs(example_inputs)
    if isinstance(source, (str, os.PathLike)):
        stager: FileSource | ModuleSource = FileSource(Path(source), store)
    else:
        trace = trace_inputs if trace_inputs is not None else inputs
        stager = ModuleSource(source, store, example_inputs=trace, dynamic_shapes=dynamic_shapes)
    live_outputs: Any = None
    if inputs is not None and expected is None and not isinstance(stager, FileSource):
        from registry import signature

        # The signature is the live model's behaviour, taken before anything is written: a
        # reload that differs must fail check(), not define what check() expects.
        live_outputs = signature.run_live(source, inputs, what=f"the model pushed as {name}")
    with stager:
        fmt, spec_dict, detected, program = stager.prepare(fmt, spec, settings.trusted_modules,
                                                           trust_code=trust_code)
        recorded: tuple[dict[str, Any], bytes] | None = None
        if inputs is not None:
            recorded = record_signature(name, stager.artifact_path, fmt, spec_dict, inputs, settings.trusted_modules,
                                        expected=expected, rtol=rtol, atol=atol, trust_code=trust_code,
                                        outputs=live_outputs)
        with sessions():  # the input is valid: reach the database before anything is stored
            pass
        for _ in range(PUSH_ATTEMPTS):
            blob = stager.store()
            # What was checked must be what was stored: a file rewritten between the check and the
            # copy is refused (its blob is left for gc).
            try:
                store.confirm(blob, lambda stored: recheck(stored, detected, source))
            except FileNotFoundError:
                continue  # a concurrent gc or delete took the blob before our lock: store it again
            _testhooks.pause("uploaded")
            record = commit(
                sessions, store, settings, name, blob, fmt, spec_dict, detected.globals_, description, tag_map,
                alias, signature=recorded, source=lineage, program=program,
            )
            if record is not None:
                return record
    raise StorageError(  # pragma: no cover - needs a delete racing every attempt
        f"blob for {name} kept disappearing from {store.display_url}; push again", url=store.display_url,
    )


def commit(
    sessions: queries.Sessions,
    store: BlobStore,
    settings: Settings,
    name: str,
    blob: Blob,
    fmt: Format,
    spec: dict[str, Any] | None,
    globals_: Sequence[str],
    description: str | None,
    tags: dict[str, str],
    alias: str | None,
    *,
    signature: tuple[dict[str, Any], bytes] | None = None,
    source: str | None = None,
    program: dict[str, list[str]] | None = None,
) -> ModelVersion | None:
    """Insert the version row of a stored blob; None if the blob vanished meanwhile (a racing delete)."""
    now = _now()
    example: tuple[str, bytes] | None = None
    if signature is not None:
        example = (signature[0]["example"]["sha256"], signature[1])
    example_sha = example[0] if example is not None else None
    # Bytes that were already stored may be an orphan older than gc's grace: make them young
    # (local storage) before taking the lock, so a gc that listed them re-checks their age under
    # the lock and keeps them. Remote storage cannot touch; there the check below stores again.
    for sha in filter(None, (example_sha, None if blob.written else blob.sha256)):
        store.touch(sha)
    with sessions(write=True) as s:
        # Each blob is checked (and stored again if gone) holding the lock gc takes to remove it,
        # so once seen here it stays until this transaction ends: gc then finds our row.
        if example is not None:
            queries.lock_blob(s, example[0])
            if not store.exists(example[0]):
                put_bytes(store, example[1])
        queries.lock_blob(s, blob.sha256)
        # Checked even for a blob this push just wrote: a `gc --grace 0` may have removed it as an
        # orphan before we took the lock.
        if not store.exists(blob.sha256):
            s.rollback()
            return None
        _testhooks.pause("checked")
        row = queries.add_version(
            s, name, now, format=fmt, sha256=blob.sha256, size=blob.size,
            spec=spec, pickle_globals=list(globals_), description=description, tags=tags,
            created_by=settings.user, torch_version=_torch_version(),
            python_version=platform.python_version(), source=source,
            signature=signature[0] if signature else None, example_sha256=example_sha, program=program,
        )
        if alias is not None:
            queries.move_alias(s, row.model_id, name, alias, row, user=settings.user, reason="pushed with --alias",
                               expect=queries.ANY, now=_now())
        record = queries.record(s, row, name)
        _testhooks.pause("before_commit")
        return record


def record_signature(
    name: str, path: Path, fmt: Format, spec: Mapping[str, Any] | None, inputs: tuple[torch.Tensor, ...],
    trusted: Sequence[str], *, expected: ModelVersion | None, rtol: float, atol: float, trust_code: bool = False,
    outputs: Any = None,
) -> tuple[dict[str, Any], bytes]:
    """Describe the example and the outputs (plus the example's bytes): the live model's ``outputs`` when
    given, else those of the artifact about to be pushed, loaded (a file push, or a conversion)."""
    import hashlib

    from registry import formats, signature

    what = f"the new version of {name}"
    if outputs is None or fmt in (Format.TORCHSCRIPT, Format.EXPORT):
        # A program is code torch generated from the model: run it too, and refuse one that breaks.
        module = formats.load(path, fmt, spec=spec, trusted=trusted, artifact=what, trust_code=trust_code)
        ran = signature.run(module, inputs, what=what)
        if outputs is not None:
            live = signature.record(inputs, outputs)
            report = signature.compare(what, live, ran)
            if not report.ok:
                bad = "; ".join(f"{o.path}: {o.detail}" for o in report.outputs if not o.ok)
                raise FormatError(f"the {fmt.value} program of {name} does not reproduce the live model's "
                                  f"outputs: {bad}; nothing was pushed (push as state_dict or full)")
        outputs = ran if outputs is None else outputs
    if expected is not None and expected.signature is not None:
        report = signature.compare(expected.ref, expected.signature, outputs, rtol=rtol, atol=atol)
        if not report.ok:
            bad = "; ".join(f"{o.path}: {o.detail}" for o in report.outputs if not o.ok)
            raise FormatError(f"the {fmt.value} conversion of {expected.ref} does not reproduce its "
                              f"signature (rtol {rtol:g}, atol {atol:g}): {bad}; nothing was pushed")
    recorded = signature.record(inputs, outputs)
    data = signature.example_bytes(inputs)
    recorded["example"] = {"sha256": hashlib.sha256(data).hexdigest(), "size": len(data)}
    return recorded, data


def put_bytes(store: BlobStore, data: bytes) -> Blob:
    """Store a small blob held in memory (example inputs)."""
    with store.staging() as staged:
        staged.write_bytes(data)
        return store.adopt(staged)


def parse_format(value: Format | str | None) -> Format | None:
    """The format a caller named (None: detect it); ``auto`` means None."""
    if value is None or value == "auto":
        return None
    try:
        return Format(value)
    except ValueError:
        choices = ", ".join(f.value for f in Format)
        raise FormatError(f"unknown format {value!r}; choose one of: {choices}") from None


def check_tags(tags: Mapping[str, str] | None) -> dict[str, str]:
    out: dict[str, str] = {}
    for key, value in (tags or {}).items():
        if validate_text(key, "tag key", max_length=128) == "":
            raise InvalidText("tag key", key, "must not be empty")
        out[key] = validate_text(value, f"value of tag {key!r}")
    return out


def _now() -> datetime:
    return datetime.now(UTC)


def _torch_version() -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("torch")  # package metadata: no need to import torch for a file push
    except PackageNotFoundError:
        return None


# -- what a push reads: a saved file or a live module, checked and staged before anything is stored --


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
        self._held = ExitStack()
        self._staged = self._held.enter_context(store.staging())
        self._format: Format = Format.STATE_DICT

    def __enter__(self) -> ModuleSource:
        return self

    def __exit__(self, *exc: object) -> None:
        self._held.close()

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
