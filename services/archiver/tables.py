"""The archiver service's own tables (the inbox and outbox come from shared.inbox_outbox).

`archive_jobs` is both the leased job and the archive's record; a reuse key may have many
over time (each request archives afresh, but a shared database server's root, reused within
its age). `archive_keys` holds one row per (datacenter, reuse key), pointing at the job new
requests for that key join: concurrent requests meet on it (it is locked while a request is
recorded), so they coalesce into one run. `archive_requests` holds every request; each
points at the one archive job that answers it.
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
    # what the source command left out on purpose (a server root's scrub list)
    Column("excluded", JSON, nullable=True),
    Column("dropped_at", Float, nullable=True),  # `ferry archives drop`: never reused
    Column("removed_at", Float, nullable=True),  # its staging file was deleted (gc, drop)
    # staging space this attempt counted on before it started, and which attempt that was
    # ("<lease owner>#<attempts>"): others starting meanwhile count it as taken
    Column("staging_reserved", BigInteger, nullable=True),
    Column("reserved_for", String(160), nullable=True),
)
Index("ix_archive_jobs_reuse_key", archive_jobs.c.datacenter, archive_jobs.c.reuse_key)
Index("ix_archive_jobs_datacenter", archive_jobs.c.datacenter, archive_jobs.c.state)

# The job a reuse key's next request joins (None: the next request archives afresh). Its
# first request fixes the key's kind.
archive_keys = Table(
    "archive_keys",
    metadata,
    Column("datacenter", String(32), primary_key=True),
    Column("reuse_key", String(255), primary_key=True),
    Column("kind", String(32), nullable=False),
    Column("archive_id", String(64), ForeignKey("archive_jobs.id"), nullable=True),
    Column("updated_at", Float, nullable=False),
)

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
    # transfer.completed for it: its copy at the destination was verified
    Column("transferred_at", Float, nullable=True),
    Index("ix_archive_requests_archive", "archive_id", "state"),
)
