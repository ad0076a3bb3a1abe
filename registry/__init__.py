"""A registry of PyTorch models: versioned, verified, promotable, loadable without arbitrary code."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from registry.errors import (
    AliasConflict,
    AliasInUse,
    AlreadyExists,
    ConfigError,
    DatabaseError,
    FormatError,
    IntegrityError,
    InvalidName,
    InvalidReference,
    InvalidText,
    NotFound,
    RegistryError,
    SpecError,
    StorageError,
    UntrustedCode,
    UntrustedPickle,
    UntrustedTarget,
)
from registry.records import (
    AliasEvent,
    CacheInfo,
    Format,
    Garbage,
    GcResult,
    GcWarning,
    ModelSummary,
    ModelVersion,
    Problem,
    SchemaInfo,
)

if TYPE_CHECKING:
    from registry.api import Registry
    from registry.diff import DiffReport
    from registry.signature import CheckReport
    from registry.spec import record_init

__all__ = [
    "AliasConflict",
    "AliasEvent",
    "AliasInUse",
    "AlreadyExists",
    "CacheInfo",
    "CheckReport",
    "ConfigError",
    "DatabaseError",
    "DiffReport",
    "Format",
    "FormatError",
    "Garbage",
    "GcResult",
    "GcWarning",
    "IntegrityError",
    "InvalidName",
    "InvalidReference",
    "InvalidText",
    "ModelSummary",
    "ModelVersion",
    "NotFound",
    "Problem",
    "Registry",
    "RegistryError",
    "SchemaInfo",
    "SpecError",
    "StorageError",
    "UntrustedCode",
    "UntrustedPickle",
    "UntrustedTarget",
    "record_init",
]


def __getattr__(name: str) -> Any:
    # Lazy: `import registry` stays light (no SQLAlchemy ORM, no torch) until these are used.
    if name == "Registry":
        from registry.api import Registry

        return Registry
    if name == "CheckReport":
        from registry.signature import CheckReport

        return CheckReport
    if name == "DiffReport":
        from registry.diff import DiffReport

        return DiffReport
    if name == "record_init":
        from registry.spec import record_init

        return record_init
    raise AttributeError(f"module 'registry' has no attribute {name!r}")
