"""archiver: archive jobs (one per datacenter and reuse key) and the requests they answer

Revision ID: archiver_0002
"""

import sqlalchemy as sa
from alembic import op

from shared.migration_ops import create_job_table

revision = "archiver_0002"
down_revision = "archiver_0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    create_job_table(
        "archive_jobs",
        sa.Column("datacenter", sa.String(32), nullable=False),
        sa.Column("reuse_key", sa.String(255), nullable=False),
        sa.Column("source_label", sa.String(255), nullable=False),
        sa.Column("source_host", sa.String(255), nullable=False),
        sa.Column("source_path", sa.Text, nullable=True),
        sa.Column("file_path", sa.Text, nullable=True),
        sa.Column("raw_bytes", sa.BigInteger, nullable=True),
        sa.Column("compressed_bytes", sa.BigInteger, nullable=True),
        sa.Column("sha256", sa.String(64), nullable=True),
        sa.Column("started_at", sa.Float, nullable=True),
        sa.Column("finished_at", sa.Float, nullable=True),
        sa.Column("warnings", sa.JSON, nullable=True),
        sa.Column("replication_position", sa.JSON, nullable=True),
    )
    op.create_index("uq_archive_jobs_reuse_key", "archive_jobs", ["datacenter", "reuse_key"],
                    unique=True)
    op.create_index("ix_archive_jobs_datacenter", "archive_jobs", ["datacenter", "state"])
    op.create_table(
        "archive_requests",
        sa.Column("request_id", sa.String(64), primary_key=True),
        sa.Column("archive_id", sa.String(64), sa.ForeignKey("archive_jobs.id"), nullable=True),
        sa.Column("migration_id", sa.String(64), nullable=False),
        sa.Column("datacenter", sa.String(32), nullable=False),
        sa.Column("kind", sa.String(32), nullable=False),
        sa.Column("reuse_key", sa.String(255), nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("reused", sa.Boolean, nullable=False),
        sa.Column("created_at", sa.Float, nullable=False),
        sa.Column("answered_at", sa.Float, nullable=True),
    )
    op.create_index("ix_archive_requests_archive", "archive_requests", ["archive_id", "state"])


def downgrade() -> None:
    op.drop_table("archive_requests")
    op.drop_table("archive_jobs")
