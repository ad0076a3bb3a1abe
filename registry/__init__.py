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
    NotFound,
    RegistryError,
    SpecError,
    StorageError,
    UntrustedPickle,
    UntrustedTarget,
)
from registry.records import AliasEvent, CacheInfo, Format, Garbage, ModelSummary, ModelVersion, Problem

if TYPE_CHECKING:
    from registry.api import Registry
    from registry.spec import record_init

__all__ = [
    "AliasConflict",
    "AliasEvent",
    "AliasInUse",
    "AlreadyExists",
    "CacheInfo",
    "ConfigError",
    "DatabaseError",
    "Format",
    "FormatError",
    "Garbage",
    "IntegrityError",
    "InvalidName",
    "InvalidReference",
    "ModelSummary",
    "ModelVersion",
    "NotFound",
    "Problem",
    "Registry",
    "RegistryError",
    "SpecError",
    "StorageError",
    "UntrustedPickle",
    "UntrustedTarget",
    "record_init",
]


def __getattr__(name: str) -> Any:
    # Lazy: `import registry` stays light (no SQLAlchemy ORM, no torch) until these are used.
    if name == "Registry":
        from registry.api import Registry

        return Registry
    if name == "record_init":
        from registry.spec import record_init

        return record_init
    raise AttributeError(f"module 'registry' has no attribute {name!r}")
