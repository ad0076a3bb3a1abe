"""Plain typed records the API returns: safe to keep after the session that read them is gone."""

from __future__ import annotations

import enum
from dataclasses import asdict, dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from collections.abc import Iterable


class Format(enum.StrEnum):
    """How an artifact's bytes encode the model."""

    STATE_DICT = "state_dict"  # torch.save(model.state_dict()): tensors only, needs a spec
    FULL = "full"  # torch.save(model): the pickled module object
    TORCHSCRIPT = "torchscript"  # torch.jit.script(model).save(): code + weights, no class needed
    EXPORT = "export"  # torch.export.save(program): a .pt2 archive, no class needed
    SAFETENSORS = "safetensors"  # safetensors tensors, no pickle anywhere; needs a spec


#: Formats whose loading rebuilds the architecture from a spec.
SPEC_FORMATS = frozenset({Format.STATE_DICT, Format.SAFETENSORS})


@dataclass(frozen=True, slots=True)
class ModelVersion:
    """One immutable version of a model, and the aliases that point at it now."""

    name: str
    version: int
    format: Format
    sha256: str
    size: int
    created_at: datetime
    created_by: str
    spec: dict[str, Any] | None = None
    pickle_globals: tuple[str, ...] = ()
    description: str | None = None
    tags: dict[str, str] = field(default_factory=dict)
    aliases: tuple[str, ...] = ()
    torch_version: str | None = None
    python_version: str | None = None
    source: str | None = None
    #: Example inputs and the outputs they gave when pushed (see :mod:`registry.signature`).
    signature: dict[str, Any] | None = None
    #: sha256 of the blob holding the example inputs (a torch.save-d tuple of tensors).
    example_sha256: str | None = None
    #: Operators a TorchScript or export program calls (``aten::linear``, ...), read at push.
    operators: tuple[str, ...] = ()
    #: Why a program is not data-only (loading it needs ``trust_code``); empty for data-only programs.
    code_problems: tuple[str, ...] = ()

    @property
    def ref(self) -> str:
        """The reference that names exactly this version, ``NAME:N``."""
        return f"{self.name}:{self.version}"

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["format"] = self.format.value
        data["created_at"] = self.created_at.isoformat()
        data["pickle_globals"] = list(self.pickle_globals)
        data["operators"] = list(self.operators)
        data["code_problems"] = list(self.code_problems)
        data["aliases"] = list(self.aliases)
        data["ref"] = self.ref
        return data


@dataclass(frozen=True, slots=True)
class ModelSummary:
    """A model with its newest version and its aliases."""

    name: str
    latest_version: int | None
    version_count: int
    aliases: dict[str, int]
    created_at: datetime

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["created_at"] = self.created_at.isoformat()
        return data


@dataclass(frozen=True, slots=True)
class AliasEvent:
    """One move of an alias: a promotion (``version`` set) or a demotion (``version`` None)."""

    name: str
    alias: str
    version: int | None
    previous: int | None
    at: datetime
    user: str
    reason: str | None = None

    @property
    def action(self) -> str:
        return "demote" if self.version is None else "promote"

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["at"] = self.at.isoformat()
        data["action"] = self.action
        return data


@dataclass(frozen=True, slots=True)
class Problem:
    """Something ``verify`` found wrong with a stored artifact."""

    name: str
    version: int
    sha256: str
    kind: str  # "missing" | "size" | "corrupt"
    detail: str

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    def __str__(self) -> str:
        return f"{self.name}:{self.version} {self.kind}: {self.detail}"


@dataclass(frozen=True, slots=True)
class Garbage:
    """Something ``gc`` removed (or, with ``dry_run``, would remove)."""

    kind: str  # "blob" (no version uses it) | "partial" (a staging file a killed push left) | "upload" (S3 multipart)
    key: str
    size: int
    age_seconds: float

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True, slots=True)
class GcWarning:
    """Something ``gc`` had to leave, and why: one line."""

    key: str  # what it concerns: an upload (``KEY?uploadId=…``), a blob, or ``uploads`` for the listing
    message: str

    def to_json(self) -> dict[str, Any]:
        return {"kind": "warning", "key": self.key, "message": self.message}


class GcResult(list[Garbage]):
    """What ``gc`` removed (or would remove), plus what it could not do.

    A list of :class:`Garbage`, as gc always returned; ``warnings`` holds one line per thing gc had
    to leave (an operation the server lacks, an upload that could not be aborted, a failed removal).
    """

    def __init__(self, removed: Iterable[Garbage] = (), warnings: Iterable[GcWarning] = ()) -> None:
        super().__init__(removed)
        self.warnings: list[GcWarning] = list(warnings)

    def to_json(self) -> list[dict[str, Any]]:
        """The removed items, then ``{"kind": "warning", "key": …, "message": …}`` per warning."""
        return [*(g.to_json() for g in self), *(w.to_json() for w in self.warnings)]


@dataclass(frozen=True, slots=True)
class SchemaInfo:
    """The metadata database's schema revision (None: an empty database) and the newest this registry knows."""

    revision: str | None
    head: str

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True, slots=True)
class CacheInfo:
    """The local cache of remote artifacts: where it is, how many blobs, how many bytes."""

    path: str
    blobs: int
    bytes: int

    def to_json(self) -> dict[str, Any]:
        return asdict(self)
