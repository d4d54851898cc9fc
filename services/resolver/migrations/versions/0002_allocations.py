"""resolver: customers, name sequences and names, public IP / VLAN / internal IP pools,
resolutions

Revision ID: resolver_0002
"""

import sqlalchemy as sa
from alembic import op

revision = "resolver_0002"
down_revision = "resolver_0001"
branch_labels = None
depends_on = None

ID = 100


def upgrade() -> None:
    op.create_table(
        "customers",
        sa.Column("id", sa.String(ID), primary_key=True),
        sa.Column("created_at", sa.Float, nullable=False),
    )
    op.create_table(
        "name_sequences",
        sa.Column("prefix", sa.String(40), primary_key=True),
        sa.Column("next_number", sa.Integer, nullable=False),
    )
    op.create_table(
        "names",
        sa.Column("name", sa.String(64), primary_key=True),
        sa.Column("kind", sa.String(16), nullable=False),
        sa.Column("prefix", sa.String(40), nullable=False),
        sa.Column("number", sa.Integer, nullable=False),
        sa.Column("migration_id", sa.String(ID), nullable=False),
        sa.Column("duid", sa.String(ID), nullable=False),
        sa.Column("customer_id", sa.String(ID), nullable=False),
        sa.Column("allocated_at", sa.Float, nullable=False),
        sa.UniqueConstraint("migration_id", "duid", name="uq_names_migration_duid"),
        sa.UniqueConstraint("prefix", "number", name="uq_names_prefix_number"),
    )
    op.create_table(
        "public_ips",
        sa.Column("address", sa.String(45), primary_key=True),
        sa.Column("position", sa.BigInteger, nullable=False),
        sa.Column("migration_id", sa.String(ID), nullable=True),
        sa.Column("duid", sa.String(ID), nullable=True),
        sa.Column("customer_id", sa.String(ID), nullable=True),
        sa.Column("allocated_at", sa.Float, nullable=True),
        sa.UniqueConstraint("migration_id", "duid", name="uq_public_ips_migration_duid"),
    )
    op.create_index("ix_public_ips_free", "public_ips", ["migration_id", "position"])
    op.create_table(
        "vlans",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=False),
        sa.Column("subnet", sa.String(64), nullable=False),
        sa.Column("customer_id", sa.String(ID), nullable=True),
        sa.Column("migration_id", sa.String(ID), nullable=True),
        sa.Column("allocated_at", sa.Float, nullable=True),
        sa.UniqueConstraint("subnet", name="uq_vlans_subnet"),
        sa.UniqueConstraint("customer_id", name="uq_vlans_customer"),
    )
    op.create_table(
        "internal_ips",
        sa.Column("address", sa.String(45), primary_key=True),
        sa.Column("vlan_id", sa.Integer, nullable=False),
        sa.Column("position", sa.Integer, nullable=False),
        sa.Column("migration_id", sa.String(ID), nullable=True),
        sa.Column("duid", sa.String(ID), nullable=True),
        sa.Column("allocated_at", sa.Float, nullable=True),
        sa.UniqueConstraint("migration_id", "duid", name="uq_internal_ips_migration_duid"),
    )
    op.create_index("ix_internal_ips_free", "internal_ips",
                    ["vlan_id", "migration_id", "position"])
    op.create_table(
        "resolutions",
        sa.Column("migration_id", sa.String(ID), primary_key=True),
        sa.Column("customer_id", sa.String(ID), nullable=False),
        sa.Column("message_id", sa.String(36), nullable=False),
        sa.Column("allocations", sa.JSON, nullable=False),
        sa.Column("jobs", sa.JSON, nullable=False),
        sa.Column("resolved_at", sa.Float, nullable=False),
    )


def downgrade() -> None:
    for table in ("resolutions", "internal_ips", "vlans", "public_ips", "names",
                  "name_sequences", "customers"):
        op.drop_table(table)
