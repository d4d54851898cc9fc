"""Intake's own tables: the documents as received, the keys they came with, and the status
read model (each migration, its history, and one row per archive job)."""

from __future__ import annotations

from sqlalchemy import (
    JSON,
    BigInteger,
    Column,
    Float,
    Index,
    MetaData,
    String,
    Table,
    Text,
)

metadata = MetaData()

migrations = Table(
    "migrations",
    metadata,
    Column("id", String(64), primary_key=True),
    Column("customer_id", String(64), nullable=False),
    Column("status", String(32), nullable=False),
    Column("document", Text, nullable=True),  # the body exactly as received
    Column("reason", Text, nullable=True),
    Column("created_at", Float, nullable=False),
    Column("updated_at", Float, nullable=False),
    Column("allocations", JSON, nullable=True),  # from migration.resolved
    Index("ix_migrations_created", "created_at"),
)

migration_events = Table(
    "migration_events",
    metadata,
    Column("message_id", String(36), primary_key=True),
    Column("migration_id", String(64), nullable=False),
    Column("type", String(64), nullable=False),
    Column("payload", JSON, nullable=False),
    Column("occurred_at", Float, nullable=False),
    Index("ix_migration_events_migration", "migration_id", "occurred_at"),
)

# One row per archive request of a migration, built only from events (never from another
# service's tables). `state_at` is when the event that set `state` happened, so an event
# delivered late cannot move a job back; `progress_at` does the same for the byte counts.
migration_jobs = Table(
    "migration_jobs",
    metadata,
    Column("migration_id", String(64), primary_key=True),
    Column("request_id", String(128), primary_key=True),
    Column("kind", String(32), nullable=True),
    Column("datacenter", String(32), nullable=True),
    Column("label", Text, nullable=False),
    Column("source", JSON, nullable=True),
    Column("state", String(32), nullable=False),
    Column("state_at", Float, nullable=False),
    Column("stage", String(16), nullable=True),
    Column("bytes_done", BigInteger, nullable=False),
    Column("bytes_total", BigInteger, nullable=True),
    Column("mb_per_s", Float, nullable=True),
    Column("progress_at", Float, nullable=False),
    Column("snapshot", JSON, nullable=True),
    Column("archive", JSON, nullable=True),
    Column("transfer", JSON, nullable=True),
    Column("errors", JSON, nullable=False),
    Column("updated_at", Float, nullable=False),
)

# An Idempotency-Key names one body (by its sha256) and the migration it created.
idempotency_keys = Table(
    "idempotency_keys",
    metadata,
    Column("key", String(200), primary_key=True),
    Column("body_sha256", String(64), nullable=False),
    Column("migration_id", String(64), nullable=False),
    Column("created_at", Float, nullable=False),
)
