"""indexes that retention reads through

Revision ID: 0004
Revises: 0003
"""

from __future__ import annotations

from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_index("ix_stats_minute_minute", "stats_minute", ["minute"])
    op.create_index("ix_stats_hourly_hour", "stats_hourly", ["hour"])


def downgrade() -> None:
    op.drop_index("ix_stats_hourly_hour", "stats_hourly")
    op.drop_index("ix_stats_minute_minute", "stats_minute")
