"""resolver: inbox, outbox

Revision ID: resolver_0001
"""

from alembic import op

from shared.migration_ops import create_inbox_outbox

revision = "resolver_0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    create_inbox_outbox()


def downgrade() -> None:
    op.drop_table("outbox")
    op.drop_table("inbox")
