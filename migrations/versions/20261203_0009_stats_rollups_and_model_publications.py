"""stats rollups (per loop, 10 seconds and slot), action counts, model publications, and when a
joined row's last reward arrived (issue 14: the dashboard and GET /loops/{loop}/stats)

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-03 08:00:00.000000
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0009"
down_revision = "0008"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "action_stats",
        sa.Column("loop", sa.String(length=64), nullable=False),
        sa.Column("bucket", sa.BigInteger(), nullable=False),
        sa.Column("slot", sa.String(length=256), nullable=False),
        sa.Column("action", sa.String(length=256), nullable=False),
        sa.Column("n", sa.BigInteger(), server_default="0", nullable=False),
        sa.PrimaryKeyConstraint("loop", "bucket", "slot", "action", name=op.f("pk_action_stats")),
    )
    op.create_table(
        "loop_stats",
        sa.Column("loop", sa.String(length=64), nullable=False),
        sa.Column("bucket", sa.BigInteger(), nullable=False),
        sa.Column("slot", sa.String(length=256), nullable=False),
        sa.Column("ranked", sa.BigInteger(), server_default="0", nullable=False),
        sa.Column("late", sa.BigInteger(), server_default="0", nullable=False),
        sa.Column("dangling", sa.BigInteger(), server_default="0", nullable=False),
        sa.Column("decisions", sa.Float(), server_default="0", nullable=False),
        sa.Column("learnable", sa.Float(), server_default="0", nullable=False),
        sa.Column("rewarded", sa.Float(), server_default="0", nullable=False),
        sa.Column("explored", sa.Float(), server_default="0", nullable=False),
        sa.Column("reward_n", sa.Float(), server_default="0", nullable=False),
        sa.Column("reward_sum", sa.Float(), server_default="0", nullable=False),
        sa.Column("reward_sq", sa.Float(), server_default="0", nullable=False),
        sa.Column("holdout_n", sa.Float(), server_default="0", nullable=False),
        sa.Column("holdout_sum", sa.Float(), server_default="0", nullable=False),
        sa.Column("holdout_sq", sa.Float(), server_default="0", nullable=False),
        sa.Column("trial_n", sa.Float(), server_default="0", nullable=False),
        sa.Column("trial_sum", sa.Float(), server_default="0", nullable=False),
        sa.Column("trial_sq", sa.Float(), server_default="0", nullable=False),
        sa.Column("effect_n", sa.Float(), server_default="0", nullable=False),
        sa.Column("effect_sum", sa.Float(), server_default="0", nullable=False),
        sa.Column("effect_sq", sa.Float(), server_default="0", nullable=False),
        sa.Column("baseline_w", sa.Float(), server_default="0", nullable=False),
        sa.Column("baseline_w2", sa.Float(), server_default="0", nullable=False),
        sa.Column("baseline_wr", sa.Float(), server_default="0", nullable=False),
        sa.Column("baseline_wr2", sa.Float(), server_default="0", nullable=False),
        sa.Column("random_w", sa.Float(), server_default="0", nullable=False),
        sa.Column("random_w2", sa.Float(), server_default="0", nullable=False),
        sa.Column("random_wr", sa.Float(), server_default="0", nullable=False),
        sa.Column("random_wr2", sa.Float(), server_default="0", nullable=False),
        sa.Column("episodes", sa.Float(), server_default="0", nullable=False),
        sa.Column("return_sum", sa.Float(), server_default="0", nullable=False),
        sa.Column("return_sq", sa.Float(), server_default="0", nullable=False),
        sa.PrimaryKeyConstraint("loop", "bucket", "slot", name=op.f("pk_loop_stats")),
    )
    op.create_table(
        "model_publications",
        sa.Column(
            "id",
            sa.BigInteger().with_variant(sa.Integer(), "sqlite"),
            autoincrement=True,
            nullable=False,
        ),
        sa.Column("loop", sa.String(length=64), nullable=False),
        sa.Column("model_id", sa.String(length=64), nullable=False),
        sa.Column("published_at", sa.Float(), nullable=False),
        sa.Column("examples", sa.BigInteger(), nullable=False),
        sa.Column("rewards", sa.BigInteger(), nullable=False),
        sa.Column("freshness_p50", sa.Float(), nullable=True),
        sa.Column("freshness_p95", sa.Float(), nullable=True),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_model_publications")),
    )
    with op.batch_alter_table("model_publications", schema=None) as batch_op:
        batch_op.create_index("ix_model_publications_loop", ["loop", "published_at"], unique=False)

    with op.batch_alter_table("joined", schema=None) as batch_op:
        batch_op.add_column(sa.Column("observed_at", sa.Float(), nullable=True))

    # Episodes learned before this migration count as counted: their returns are not rolled up.
    with op.batch_alter_table("episodes", schema=None) as batch_op:
        batch_op.add_column(
            sa.Column("counted", sa.Boolean(), server_default=sa.false(), nullable=False)
        )
    op.execute("UPDATE episodes SET counted = learned")


def downgrade() -> None:
    with op.batch_alter_table("episodes", schema=None) as batch_op:
        batch_op.drop_column("counted")

    with op.batch_alter_table("joined", schema=None) as batch_op:
        batch_op.drop_column("observed_at")

    with op.batch_alter_table("model_publications", schema=None) as batch_op:
        batch_op.drop_index("ix_model_publications_loop")

    op.drop_table("model_publications")
    op.drop_table("loop_stats")
    op.drop_table("action_stats")
