"""intake: inbox, outbox, migrations, migration_events

Revision ID: intake_0001
"""

import sqlalchemy as sa
from alembic import op

from shared.migration_ops import create_inbox_outbox

revision = "intake_0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    create_inbox_outbox()
    op.create_table(
        "migrations",
        sa.Column("id", sa.String(64), primary_key=True),
        sa.Column("customer_id", sa.String(64), nullable=False),
        sa.Column("status", sa.String(32), nullable=False),
        sa.Column("document", sa.Text, nullable=True),
        sa.Column("reason", sa.Text, nullable=True),
        sa.Column("created_at", sa.Float, nullable=False),
        sa.Column("updated_at", sa.Float, nullable=False),
    )
    op.create_table(
        "migration_events",
        sa.Column("message_id", sa.String(36), primary_key=True),
        sa.Column("migration_id", sa.String(64), nullable=False),
        sa.Column("type", sa.String(64), nullable=False),
        sa.Column("payload", sa.JSON, nullable=False),
        sa.Column("occurred_at", sa.Float, nullable=False),
    )
    op.create_index("ix_migration_events_migration", "migration_events",
                    ["migration_id", "occurred_at"])


def downgrade() -> None:
    op.drop_table("migration_events")
    op.drop_table("migrations")
    op.drop_table("outbox")
    op.drop_table("inbox")
