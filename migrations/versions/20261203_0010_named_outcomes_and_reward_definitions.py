"""named outcomes (observations.name), reward definition versions, which version labelled each
joined row, per-outcome rollups, evaluations under another reward, guardrail states (issue 15)

Revision ID: 0010
Revises: 0009
Create Date: 2026-12-03 15:00:00.000000
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0010"
down_revision = "0009"
branch_labels = None
depends_on = None

OUTCOME_SUMS = (
    "n",
    "y_sum",
    "y_sq",
    "holdout_n",
    "holdout_sum",
    "trial_n",
    "trial_sum",
    "ht_a",
    "ht_a2",
    "ht_b",
    "ht_b2",
    "bw_y",
    "bw_y2",
    "y_bw_y",
)


def upgrade() -> None:
    with op.batch_alter_table("observations", schema=None) as batch_op:
        batch_op.add_column(sa.Column("name", sa.String(length=64), nullable=True))
    with op.batch_alter_table("joined", schema=None) as batch_op:
        batch_op.add_column(
            sa.Column("reward_version", sa.Integer(), server_default="0", nullable=False)
        )
    with op.batch_alter_table("evaluations", schema=None) as batch_op:
        batch_op.add_column(sa.Column("reward_definition", sa.Text(), nullable=True))
    op.create_table(
        "reward_definitions",
        sa.Column("loop", sa.String(length=64), nullable=False),
        sa.Column("version", sa.Integer(), nullable=False),
        sa.Column("definition", sa.Text(), nullable=False),
        sa.Column("created_at", sa.Float(), nullable=False),
        sa.ForeignKeyConstraint(
            ["loop"],
            ["loops.name"],
            name=op.f("fk_reward_definitions_loop_loops"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("loop", "version", name=op.f("pk_reward_definitions")),
    )
    op.create_table(
        "outcome_stats",
        sa.Column("loop", sa.String(length=64), nullable=False),
        sa.Column("bucket", sa.BigInteger(), nullable=False),
        sa.Column("outcome", sa.String(length=64), nullable=False),
        *(sa.Column(c, sa.Float(), server_default="0", nullable=False) for c in OUTCOME_SUMS),
        sa.PrimaryKeyConstraint("loop", "bucket", "outcome", name=op.f("pk_outcome_stats")),
    )

    op.create_table(
        "guardrail_states",
        sa.Column("loop", sa.String(length=64), nullable=False),
        sa.Column("guardrail", sa.String(length=80), nullable=False),
        sa.Column("state", sa.String(length=16), nullable=False),
        sa.Column("fallback", sa.Boolean(), nullable=False),
        sa.Column("since", sa.Float(), nullable=False),
        sa.Column("changed_at", sa.Float(), nullable=False),
        sa.Column("checked_at", sa.Float(), nullable=False),
        sa.Column("figures", sa.JSON(), nullable=True),
        sa.ForeignKeyConstraint(
            ["loop"],
            ["loops.name"],
            name=op.f("fk_guardrail_states_loop_loops"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("loop", "guardrail", name=op.f("pk_guardrail_states")),
    )


def downgrade() -> None:
    op.drop_table("guardrail_states")
    op.drop_table("outcome_stats")
    op.drop_table("reward_definitions")
    with op.batch_alter_table("evaluations", schema=None) as batch_op:
        batch_op.drop_column("reward_definition")
    with op.batch_alter_table("joined", schema=None) as batch_op:
        batch_op.drop_column("reward_version")
    with op.batch_alter_table("observations", schema=None) as batch_op:
        batch_op.drop_column("name")
