"""Intake's own tables: the documents as received and the status read model."""

from __future__ import annotations

from sqlalchemy import JSON, Column, Float, Index, MetaData, String, Table, Text

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
