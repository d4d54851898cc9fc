"""The transfer service's own tables (the inbox and outbox come from shared.inbox_outbox).

- `transfers`: one leased job per archive per migration (two requests sharing an archive
  share its transfer), of the archive's datacenter;
- `transfer_requests`: every archive request of a migration, expected from
  migration.resolved, linked to its transfer once archive.completed names the archive;
- `transfer_migrations`: per migration, whether it was resolved and when it completed or
  failed (each announced once);
- `transfer_attempts`: what each claim of a transfer did, with rsync's --stats.
"""

from __future__ import annotations

from sqlalchemy import (
    BigInteger,
    Boolean,
    Column,
    Float,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    Text,
)

from shared.jobs import job_table

metadata = MetaData()

transfers = job_table(
    "transfers", metadata,
    Column("archive_id", String(128), nullable=False),
    Column("destination", String(512), nullable=False),
    Column("mb_per_s", Float, nullable=True),
    Column("eta_seconds", Float, nullable=True),
    Column("verify_failures", Integer, nullable=False, default=0),
    # the archive's: only that datacenter's workers read its staging (None: recorded by a
    # transfer serving every datacenter from one staging directory)
    Column("datacenter", String(64), nullable=True),
)
Index("ix_transfers_destination_state", transfers.c.destination, transfers.c.state)
# the claim filter counts running transfers per (datacenter, destination) link
Index("ix_transfers_datacenter_destination_state", transfers.c.datacenter,
      transfers.c.destination, transfers.c.state)

transfer_migrations = Table(
    "transfer_migrations", metadata,
    Column("migration_id", String(64), primary_key=True),
    Column("resolved", Boolean, nullable=False, default=False),
    Column("completed_at", Float, nullable=True),
    Column("failed_at", Float, nullable=True),
    Column("created_at", Float, nullable=False),
)

transfer_requests = Table(
    "transfer_requests", metadata,
    Column("migration_id", String(64), primary_key=True),
    Column("request_id", String(128), primary_key=True),
    Column("kind", String(32), nullable=True),
    Column("archive_id", String(128), nullable=True),
    Column("job_id", String(64), nullable=True),
    # expected | transferring | transferred | failed | archive_failed
    Column("state", String(16), nullable=False),
    Column("reason", Text, nullable=True),
    Column("updated_at", Float, nullable=False),
    Index("ix_transfer_requests_job", "job_id"),
)

transfer_attempts = Table(
    "transfer_attempts", metadata,
    Column("job_id", String(64), primary_key=True),
    Column("attempt", Integer, primary_key=True),
    Column("owner", String(128), nullable=False),
    Column("started_at", Float, nullable=False),
    Column("finished_at", Float, nullable=True),
    # running | transferred | retry | sha256_mismatch | failed | interrupted | abandoned
    Column("outcome", String(16), nullable=False),
    Column("exit_code", Integer, nullable=True),
    Column("bytes_sent", BigInteger, nullable=True),  # rsync --stats "Total bytes sent"
    Column("literal_bytes", BigInteger, nullable=True),
    Column("error", Text, nullable=True),
)
