"""The ``export`` format: ``torch.export`` programs saved with ``torch.export.save`` (``.pt2``).

Loading returns ``ExportedProgram.module()``, a callable ``nn.Module`` that needs no class definition.
That module does not support ``.eval()`` or ``.train()`` (torch 2.13 raises NotImplementedError): its
train/eval behaviour is the one it was exported in, so the registry exports live modules in eval mode
and never calls ``.eval()`` on a loaded program.
"""

from __future__ import annotations

import contextlib
import io
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from registry.errors import FormatError, translated

if TYPE_CHECKING:
    import torch


def save(model: Any, path: Path, example_inputs: tuple[torch.Tensor, ...] | None, dynamic_shapes: Any) -> None:
    """Export ``model`` (in eval mode) with the example inputs and save the program; or save a program.

    Raises:
        FormatError: no example inputs were given for a module.
        Exception: whatever torch.export raises (the caller turns it into one line).
    """
    import torch

    if isinstance(model, torch.export.ExportedProgram):
        _save(model, path)
        return
    if example_inputs is None:
        raise FormatError("exporting a module needs example inputs: pass example_inputs= "
                          "(a tensor or a tuple of tensors to trace it with)")
    modes = {m: m.training for m in model.modules()}
    model.eval()
    try:
        with _quiet_torch():
            program = torch.export.export(model, tuple(example_inputs), dynamic_shapes=dynamic_shapes)
    finally:
        for module, training in modes.items():
            module.training = training
    _save(program, path)


@contextlib.contextmanager
def _quiet_torch() -> Iterator[None]:
    """Keep torch.export from writing to stderr about a failure it raises anyway (reported in one line).

    It logs a warning with the partial graph (torch.fx.experimental.symbolic_shapes), exportdb hints
    (torch.export._trace), and print()s the partial FX graph to sys.stderr (_trace.py::_log_export_wrapper),
    so torch's loggers are disabled and sys.stderr is redirected, process-wide, for the call.
    """
    loggers = [logger for name, logger in logging.Logger.manager.loggerDict.items()
               if isinstance(logger, logging.Logger) and (name == "torch" or name.startswith("torch."))]
    disabled = [logger.disabled for logger in loggers]
    for logger in loggers:
        logger.disabled = True
    try:
        with contextlib.redirect_stderr(io.StringIO()):
            yield
    finally:
        for logger, was in zip(loggers, disabled, strict=True):
            logger.disabled = was


def _save(program: torch.export.ExportedProgram, path: Path) -> None:
    import torch

    # A file object: torch warns about any path not ending in .pt2, and staged files and blobs do not.
    with open(path, "wb") as f:
        torch.export.save(program, f)


def load(path: Path, *, map_location: str | torch.device | None, artifact: str) -> torch.nn.Module:
    """Load a program vetted by :func:`registry.formats.vet`, move it if asked, and return its module.

    The module is not put in eval(): it keeps the mode it was exported in.

    Raises:
        FormatError: the program does not load.
    """
    import torch

    with translated(FormatError, f"cannot load {artifact}"):
        with open(path, "rb") as f:  # a file object: blobs have no .pt2 suffix for torch to expect
            program = torch.export.load(f)
        if map_location is not None:
            from torch.export.passes import move_to_device_pass

            program = move_to_device_pass(program, map_location)
        module: torch.nn.Module = program.module()
    return module
