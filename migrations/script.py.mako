<%
    # Import only what the generated body uses, so a fresh revision passes ruff (F401) as generated.
    body = (upgrades or "") + (downgrades or "")
    uses_op, uses_sa = "op." in body, "sa." in body
%>"""${message}

Revision ID: ${up_revision}
Revises: ${down_revision | comma,n}
Create Date: ${create_date}

"""
from __future__ import annotations

from collections.abc import Sequence
% if uses_sa or uses_op or imports:

% endif
% if uses_sa:
import sqlalchemy as sa
% endif
% if uses_op:
from alembic import op
% endif
% if imports:
${imports}
% endif

# revision identifiers, used by Alembic.
revision: str = ${repr(up_revision)}
down_revision: str | Sequence[str] | None = ${repr(down_revision)}
branch_labels: str | Sequence[str] | None = ${repr(branch_labels)}
depends_on: str | Sequence[str] | None = ${repr(depends_on)}


def upgrade() -> None:
    """Upgrade schema."""
    ${upgrades if upgrades else "pass"}


def downgrade() -> None:
    """Downgrade schema."""
    ${downgrades if downgrades else "pass"}
