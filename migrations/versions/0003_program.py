"""Programs: the operators a TorchScript or export version calls, and why it is not data-only.

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-02 13:00:00.000000

"""
from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

# revision identifiers, used by Alembic.
revision: str = '0003'
down_revision: str | Sequence[str] | None = '0002'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    """Upgrade schema."""
    with op.batch_alter_table('versions', schema=None) as batch_op:
        batch_op.add_column(sa.Column('program', sa.JSON(), nullable=True))


def downgrade() -> None:
    """Downgrade schema."""
    with op.batch_alter_table('versions', schema=None) as batch_op:
        batch_op.drop_column('program')
