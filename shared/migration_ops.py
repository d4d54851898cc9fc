"""Schema steps that every service's first Alembic revision runs for the shared tables.

Written out (not copied from the live metadata) so an old revision keeps its meaning.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op


def create_inbox_outbox() -> None:
    op.create_table(
        "inbox",
        sa.Column("message_id", sa.String(36), primary_key=True),
        sa.Column("handler", sa.String(100), primary_key=True),
        sa.Column("received_at", sa.Float, nullable=False),
    )
    op.create_table(
        "outbox",
        sa.Column("seq", sa.BigInteger().with_variant(sa.Integer, "sqlite"), primary_key=True,
                  autoincrement=True),
        sa.Column("message_id", sa.String(36), nullable=False, unique=True),
        sa.Column("routing_key", sa.String(255), nullable=False),
        sa.Column("body", sa.Text, nullable=False),
        sa.Column("created_at", sa.Float, nullable=False),
        sa.Column("published_at", sa.Float, nullable=True),
    )
    op.create_index("ix_outbox_unpublished", "outbox", ["published_at", "seq"])


def create_job_table(name: str, *extra: sa.Column) -> None:  # type: ignore[type-arg]
    op.create_table(
        name,
        sa.Column("id", sa.String(64), primary_key=True),
        sa.Column("migration_id", sa.String(64), nullable=False),
        sa.Column("kind", sa.String(32), nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("payload", sa.JSON, nullable=False),
        sa.Column("attempts", sa.Integer, nullable=False),
        sa.Column("lease_owner", sa.String(128), nullable=True),
        sa.Column("lease_expires_at", sa.Float, nullable=True),
        sa.Column("next_run_at", sa.Float, nullable=False),
        sa.Column("bytes_done", sa.BigInteger, nullable=False),
        sa.Column("bytes_total", sa.BigInteger, nullable=True),
        sa.Column("result", sa.JSON, nullable=True),
        sa.Column("error", sa.Text, nullable=True),
        sa.Column("created_at", sa.Float, nullable=False),
        sa.Column("updated_at", sa.Float, nullable=False),
        *extra,
    )
    op.create_index(f"ix_{name}_claimable", name, ["state", "next_run_at"])
