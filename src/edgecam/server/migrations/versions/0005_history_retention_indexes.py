"""indexes that the retention of statuses and command results reads through

Revision ID: 0005
Revises: 0004
"""

from __future__ import annotations

from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_index("ix_status_messages_ts", "status_messages", ["ts"])
    op.create_index("ix_command_results_ts", "command_results", ["ts"])


def downgrade() -> None:
    op.drop_index("ix_command_results_ts", "command_results")
    op.drop_index("ix_status_messages_ts", "status_messages")
