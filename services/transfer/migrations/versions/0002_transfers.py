"""transfer: transfers (leased jobs), requests, migrations, attempts

Revision ID: transfer_0002
"""

import sqlalchemy as sa
from alembic import op

from shared.migration_ops import create_job_table

revision = "transfer_0002"
down_revision = "transfer_0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    create_job_table(
        "transfers",
        sa.Column("archive_id", sa.String(128), nullable=False),
        sa.Column("destination", sa.String(512), nullable=False),
        sa.Column("mb_per_s", sa.Float, nullable=True),
        sa.Column("eta_seconds", sa.Float, nullable=True),
        sa.Column("verify_failures", sa.Integer, nullable=False),
    )
    op.create_index("ix_transfers_destination_state", "transfers", ["destination", "state"])
    op.create_table(
        "transfer_migrations",
        sa.Column("migration_id", sa.String(64), primary_key=True),
        sa.Column("resolved", sa.Boolean, nullable=False),
        sa.Column("completed_at", sa.Float, nullable=True),
        sa.Column("failed_at", sa.Float, nullable=True),
        sa.Column("created_at", sa.Float, nullable=False),
    )
    op.create_table(
        "transfer_requests",
        sa.Column("migration_id", sa.String(64), primary_key=True),
        sa.Column("request_id", sa.String(128), primary_key=True),
        sa.Column("kind", sa.String(32), nullable=True),
        sa.Column("archive_id", sa.String(128), nullable=True),
        sa.Column("job_id", sa.String(64), nullable=True),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("reason", sa.Text, nullable=True),
        sa.Column("updated_at", sa.Float, nullable=False),
    )
    op.create_index("ix_transfer_requests_job", "transfer_requests", ["job_id"])
    op.create_table(
        "transfer_attempts",
        sa.Column("job_id", sa.String(64), primary_key=True),
        sa.Column("attempt", sa.Integer, primary_key=True),
        sa.Column("owner", sa.String(128), nullable=False),
        sa.Column("started_at", sa.Float, nullable=False),
        sa.Column("finished_at", sa.Float, nullable=True),
        sa.Column("outcome", sa.String(16), nullable=False),
        sa.Column("exit_code", sa.Integer, nullable=True),
        sa.Column("bytes_sent", sa.BigInteger, nullable=True),
        sa.Column("literal_bytes", sa.BigInteger, nullable=True),
        sa.Column("error", sa.Text, nullable=True),
    )


def downgrade() -> None:
    op.drop_table("transfer_attempts")
    op.drop_table("transfer_requests")
    op.drop_table("transfer_migrations")
    op.drop_table("transfers")
