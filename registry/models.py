"""The metadata schema as SQLAlchemy ORM classes; Alembic migrations in ``migrations/`` create it."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any

from sqlalchemy import (
    JSON,
    BigInteger,
    DateTime,
    Enum,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Text,
    UniqueConstraint,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from registry.records import Format

# Named constraints, so that Alembic batch mode on SQLite can drop and recreate them.
NAMING_CONVENTION = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

intpk = Annotated[int, mapped_column(Integer, primary_key=True)]
timestamp = Annotated[datetime, mapped_column(DateTime(timezone=True))]
name_str = Annotated[str, mapped_column(String(128))]


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)
    type_annotation_map = {dict[str, Any]: JSON, list[str]: JSON}


class Model(Base):
    """A model name; ``last_version`` is the counter that allocates version numbers."""

    __tablename__ = "models"

    id: Mapped[intpk]
    name: Mapped[name_str] = mapped_column(unique=True)
    # Bumped with UPDATE … RETURNING inside the push transaction: numbers are never reused.
    last_version: Mapped[int] = mapped_column(default=0)
    created_at: Mapped[timestamp]


class Version(Base):
    """One immutable artifact of a model."""

    __tablename__ = "versions"
    __table_args__ = (UniqueConstraint("model_id", "version", name="uq_versions_model_id_version"),)

    id: Mapped[intpk]
    model_id: Mapped[int] = mapped_column(ForeignKey("models.id", ondelete="CASCADE"))
    version: Mapped[int]
    format: Mapped[Format] = mapped_column(
        Enum(Format, native_enum=False, length=32, values_callable=lambda e: [m.value for m in e])
    )
    sha256: Mapped[str] = mapped_column(String(64), index=True)
    size: Mapped[int] = mapped_column(BigInteger)
    spec: Mapped[dict[str, Any] | None]
    pickle_globals: Mapped[list[str]]
    description: Mapped[str | None] = mapped_column(Text)
    tags: Mapped[dict[str, Any]]
    created_at: Mapped[timestamp]
    created_by: Mapped[str] = mapped_column(String(256))
    torch_version: Mapped[str | None] = mapped_column(String(64))
    python_version: Mapped[str | None] = mapped_column(String(64))
    source: Mapped[str | None] = mapped_column(String(160))
    signature: Mapped[dict[str, Any] | None]
    example_sha256: Mapped[str | None] = mapped_column(String(64), index=True)
    #: TorchScript/export only: ``{"operators": [...], "problems": [...]}`` read from the program at push.
    program: Mapped[dict[str, Any] | None]


class Alias(Base):
    """A movable name (``production``, ``staging``, …) pointing at exactly one version of a model."""

    __tablename__ = "aliases"

    model_id: Mapped[int] = mapped_column(
        ForeignKey("models.id", ondelete="CASCADE"), primary_key=True
    )
    name: Mapped[name_str] = mapped_column(primary_key=True)
    version_id: Mapped[int] = mapped_column(ForeignKey("versions.id"), index=True)


class AliasEvent(Base):
    """Append-only history of alias moves, in the order the database applied them (``id``)."""

    __tablename__ = "alias_events"
    __table_args__ = (Index("ix_alias_events_model_id_id", "model_id", "id"),)

    id: Mapped[intpk]
    model_id: Mapped[int] = mapped_column(ForeignKey("models.id", ondelete="CASCADE"))
    alias: Mapped[name_str]
    version: Mapped[int | None]
    previous: Mapped[int | None]
    at: Mapped[timestamp]
    user: Mapped[str] = mapped_column(String(256))
    reason: Mapped[str | None] = mapped_column(Text)
