"""snapshotter: snapshot jobs and per-host admission rows

Revision ID: snapshotter_0002
"""

import sqlalchemy as sa
from alembic import op

from shared.migration_ops import create_job_table

revision = "snapshotter_0002"
down_revision = "snapshotter_0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    create_job_table(
        "snapshot_jobs",
        sa.Column("request_id", sa.String(64), nullable=False, unique=True),
        sa.Column("xen_host", sa.String(255), nullable=False),
        sa.Column("datacenter", sa.String(32), nullable=False),
        sa.Column("driver", sa.String(8), nullable=False),
        sa.Column("phase", sa.String(16), nullable=False),
        sa.Column("admitted", sa.Boolean, nullable=False),
        sa.Column("cow_attempt", sa.Integer, nullable=False),
        sa.Column("snapshot_id", sa.String(80), nullable=True),
        sa.Column("export_port", sa.Integer, nullable=True),
        sa.Column("cow_bytes", sa.BigInteger, nullable=True),
        sa.Column("release_reason", sa.Text, nullable=True),
    )
    op.create_index("ix_snapshot_jobs_host", "snapshot_jobs", ["xen_host", "admitted"])
    op.create_table("snapshot_hosts", sa.Column("xen_host", sa.String(255), primary_key=True))


def downgrade() -> None:
    op.drop_table("snapshot_hosts")
    op.drop_table("snapshot_jobs")
