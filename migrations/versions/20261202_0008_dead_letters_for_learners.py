"""dead letters for learners: the loop and stream position of an interaction no learner may retry

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-02 13:00:00.000000
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("dead_letters", schema=None) as batch_op:
        batch_op.add_column(sa.Column("loop", sa.String(length=64), nullable=True))
        batch_op.add_column(sa.Column("ref", sa.BigInteger(), nullable=True))
        batch_op.create_index("ix_dead_letters_ref", ["loop", "source", "ref"], unique=False)


def downgrade() -> None:
    with op.batch_alter_table("dead_letters", schema=None) as batch_op:
        batch_op.drop_index("ix_dead_letters_ref")
        batch_op.drop_column("ref")
        batch_op.drop_column("loop")
