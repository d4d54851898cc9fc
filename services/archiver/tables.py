"""The archiver service's own tables (the inbox and outbox come from shared.inbox_outbox).

`archive_jobs` is both the leased job and the archive's record: one row per (datacenter,
reuse key), so a source archived for several migrations is archived once. `archive_requests`
holds every request; each points at the one archive job that answers it.
"""

from __future__ import annotations

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    Column,
    Float,
    ForeignKey,
    Index,
    MetaData,
    String,
    Table,
    Text,
)

from shared.jobs import job_table

metadata = MetaData()

# request states
WAITING, COMPLETED, FAILED = "waiting", "completed", "failed"

archive_jobs = job_table(
    "archive_jobs",
    metadata,
    Column("datacenter", String(32), nullable=False),
    Column("reuse_key", String(255), nullable=False),
    Column("source_label", String(255), nullable=False),
    Column("source_host", String(255), nullable=False),
    Column("source_path", Text, nullable=True),  # directory, or database name
    Column("file_path", Text, nullable=True),
    Column("raw_bytes", BigInteger, nullable=True),
    Column("compressed_bytes", BigInteger, nullable=True),
    Column("sha256", String(64), nullable=True),
    Column("started_at", Float, nullable=True),
    Column("finished_at", Float, nullable=True),
    Column("warnings", JSON, nullable=True),
    Column("replication_position", JSON, nullable=True),
)
# One archive per reuse key in a datacenter: concurrent requests meet on this index.
Index("uq_archive_jobs_reuse_key", archive_jobs.c.datacenter, archive_jobs.c.reuse_key,
      unique=True)
Index("ix_archive_jobs_datacenter", archive_jobs.c.datacenter, archive_jobs.c.state)

archive_requests = Table(
    "archive_requests",
    metadata,
    Column("request_id", String(64), primary_key=True),
    Column("archive_id", String(64), ForeignKey("archive_jobs.id"), nullable=True),
    Column("migration_id", String(64), nullable=False),
    Column("datacenter", String(32), nullable=False),
    Column("kind", String(32), nullable=False),
    Column("reuse_key", String(255), nullable=False),
    Column("state", String(16), nullable=False),
    Column("reused", Boolean, nullable=False),
    Column("created_at", Float, nullable=False),
    Column("answered_at", Float, nullable=True),
    Index("ix_archive_requests_archive", "archive_id", "state"),
)
