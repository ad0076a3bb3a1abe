"""Signatures: example inputs and recorded outputs of a version.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-29 10:00:00.000000

"""
from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

# revision identifiers, used by Alembic.
revision: str = '0002'
down_revision: str | Sequence[str] | None = '0001'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    """Upgrade schema."""
    with op.batch_alter_table('versions', schema=None) as batch_op:
        batch_op.add_column(sa.Column('signature', sa.JSON(), nullable=True))
        batch_op.add_column(sa.Column('example_sha256', sa.String(length=64), nullable=True))
        batch_op.create_index(batch_op.f('ix_versions_example_sha256'), ['example_sha256'], unique=False)


def downgrade() -> None:
    """Downgrade schema."""
    with op.batch_alter_table('versions', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_versions_example_sha256'))
        batch_op.drop_column('example_sha256')
        batch_op.drop_column('signature')
