"""archiver: a reuse key may have many archives over time; the key's current one in
archive_keys; what each archive left out, its drop and its staging file's removal; staging
space an attempt counted on; when a request was transferred and verified

Revision ID: archiver_0003
"""

import time

import sqlalchemy as sa
from alembic import op

revision = "archiver_0003"
down_revision = "archiver_0002"
branch_labels = None
depends_on = None


JOB_COLUMNS = ("excluded", "dropped_at", "removed_at", "staging_reserved", "reserved_for")


def upgrade() -> None:
    # plain ALTERs, no batch copy: SQLite adds columns and swaps indexes in place, where
    # copying archive_jobs would break the foreign keys of the requests pointing at it
    op.drop_index("uq_archive_jobs_reuse_key", "archive_jobs")
    op.create_index("ix_archive_jobs_reuse_key", "archive_jobs", ["datacenter", "reuse_key"])
    op.add_column("archive_jobs", sa.Column("excluded", sa.JSON, nullable=True))
    op.add_column("archive_jobs", sa.Column("dropped_at", sa.Float, nullable=True))
    op.add_column("archive_jobs", sa.Column("removed_at", sa.Float, nullable=True))
    op.add_column("archive_jobs", sa.Column("staging_reserved", sa.BigInteger, nullable=True))
    op.add_column("archive_jobs", sa.Column("reserved_for", sa.String(160), nullable=True))
    op.create_table(
        "archive_keys",
        sa.Column("datacenter", sa.String(32), primary_key=True),
        sa.Column("reuse_key", sa.String(255), primary_key=True),
        sa.Column("kind", sa.String(32), nullable=False),
        sa.Column("archive_id", sa.String(64), sa.ForeignKey("archive_jobs.id"), nullable=True),
        sa.Column("updated_at", sa.Float, nullable=False),
    )
    # every key's one archive so far is its current one: the handlers decide afresh
    # whether it may still be reused (only a server root, within its age)
    op.execute(sa.text(
        "INSERT INTO archive_keys (datacenter, reuse_key, kind, archive_id, updated_at) "
        "SELECT datacenter, reuse_key, kind, id, :now FROM archive_jobs").bindparams(
            now=time.time()))
    op.add_column("archive_requests", sa.Column("transferred_at", sa.Float, nullable=True))


def downgrade() -> None:
    # the unique index comes back only while every key still has one archive (the
    # database refuses it otherwise, and nothing is dropped)
    op.drop_table("archive_keys")
    op.drop_index("ix_archive_jobs_reuse_key", "archive_jobs")
    op.create_index("uq_archive_jobs_reuse_key", "archive_jobs", ["datacenter", "reuse_key"],
                    unique=True)
    for column in JOB_COLUMNS:
        op.drop_column("archive_jobs", column)
    op.drop_column("archive_requests", "transferred_at")
