"""stats summed per minute at ingest

Revision ID: 0002
Revises: 0001
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "stats_minute",
        sa.Column("device", sa.String(length=64), nullable=False),
        sa.Column("camera", sa.String(length=64), nullable=False),
        sa.Column("minute", sa.Float(), nullable=False),
        sa.Column("messages", sa.Integer(), nullable=False),
        sa.Column("people", sa.BigInteger(), nullable=False),
        sa.Column("peak", sa.Integer(), nullable=False),
        sa.Column("mask", sa.BigInteger(), nullable=False),
        sa.Column("no_mask", sa.BigInteger(), nullable=False),
        sa.Column("undecided", sa.BigInteger(), nullable=False),
        sa.Column("person", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("device", "camera", "minute"),
    )
    # Fill it from the stats already stored (PostgreSQL's CAST rounds; floor does not).
    pg = op.get_bind().dialect.name == "postgresql"
    minute = "floor(t_start / 60) * 60" if pg else "CAST(t_start / 60 AS INTEGER) * 60.0"
    op.execute(
        "INSERT INTO stats_minute (device, camera, minute, messages, people, peak, mask, "
        f"no_mask, undecided, person) SELECT device, camera, {minute}, count(*), "
        "sum(people), max(peak), sum(mask), sum(no_mask), sum(undecided), sum(person) "
        f"FROM stats GROUP BY device, camera, {minute}"
    )


def downgrade() -> None:
    op.drop_table("stats_minute")
