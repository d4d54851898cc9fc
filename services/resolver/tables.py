"""The resolver service's own tables (the inbox and outbox come from shared.inbox_outbox).

Pools are rows: a free public IP, VLAN or internal IP has no `migration_id` (VLANs: no
`customer_id`); taking one sets who took it. Names come from a counter row per prefix that
only ever grows. Unique constraints are the last line of defence against double allocation:
(migration_id, duid) once per pool, every name, address and subnet once.
"""

from __future__ import annotations

from sqlalchemy import (
    JSON,
    BigInteger,
    Column,
    Float,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    UniqueConstraint,
)

metadata = MetaData()

ID = 100  # migration ids, customer ids and duids are at most this long

# One row per customer: locked for the length of a migration's allocation, so two
# migrations of one customer agree on its VLAN.
customers = Table(
    "customers",
    metadata,
    Column("id", String(ID), primary_key=True),
    Column("created_at", Float, nullable=False),
)

name_sequences = Table(
    "name_sequences",
    metadata,
    Column("prefix", String(40), primary_key=True),  # "tm21-s", "tm21-e"
    Column("next_number", Integer, nullable=False),
)

names = Table(
    "names",
    metadata,
    Column("name", String(64), primary_key=True),
    Column("kind", String(16), nullable=False),  # vm | environment
    Column("prefix", String(40), nullable=False),
    Column("number", Integer, nullable=False),
    Column("migration_id", String(ID), nullable=False),
    Column("duid", String(ID), nullable=False),
    Column("customer_id", String(ID), nullable=False),
    Column("allocated_at", Float, nullable=False),
    UniqueConstraint("migration_id", "duid", name="uq_names_migration_duid"),
    UniqueConstraint("prefix", "number", name="uq_names_prefix_number"),
)

public_ips = Table(
    "public_ips",
    metadata,
    Column("address", String(45), primary_key=True),
    Column("position", BigInteger, nullable=False),  # order of the configured pool
    Column("migration_id", String(ID), nullable=True),
    Column("duid", String(ID), nullable=True),
    Column("customer_id", String(ID), nullable=True),
    Column("allocated_at", Float, nullable=True),
    UniqueConstraint("migration_id", "duid", name="uq_public_ips_migration_duid"),
    Index("ix_public_ips_free", "migration_id", "position"),
)

vlans = Table(
    "vlans",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=False),
    Column("subnet", String(64), nullable=False),
    Column("customer_id", String(ID), nullable=True),
    Column("migration_id", String(ID), nullable=True),  # the migration that took it
    Column("allocated_at", Float, nullable=True),
    UniqueConstraint("subnet", name="uq_vlans_subnet"),
    UniqueConstraint("customer_id", name="uq_vlans_customer"),
)

internal_ips = Table(
    "internal_ips",
    metadata,
    Column("address", String(45), primary_key=True),
    Column("vlan_id", Integer, nullable=False),
    Column("position", Integer, nullable=False),
    Column("migration_id", String(ID), nullable=True),
    Column("duid", String(ID), nullable=True),
    Column("allocated_at", Float, nullable=True),
    UniqueConstraint("migration_id", "duid", name="uq_internal_ips_migration_duid"),
    Index("ix_internal_ips_free", "vlan_id", "migration_id", "position"),
)

# What each migration resolved to: the allocations and the jobs planned from the inventory.
resolutions = Table(
    "resolutions",
    metadata,
    Column("migration_id", String(ID), primary_key=True),
    Column("customer_id", String(ID), nullable=False),
    Column("message_id", String(36), nullable=False),
    Column("allocations", JSON, nullable=False),
    Column("jobs", JSON, nullable=False),
    Column("resolved_at", Float, nullable=False),
    # sha256 of the document's canonical JSON: a migration id is resolved from one document
    Column("document_sha256", String(64), nullable=True),
)
