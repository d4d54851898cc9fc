"""intake: allocations on migrations, migration_jobs, idempotency_keys

Revision ID: intake_0002
"""

import sqlalchemy as sa
from alembic import op

revision = "intake_0002"
down_revision = "intake_0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("migrations", sa.Column("allocations", sa.JSON, nullable=True))
    op.create_index("ix_migrations_created", "migrations", ["created_at"])
    op.create_table(
        "migration_jobs",
        sa.Column("migration_id", sa.String(64), primary_key=True),
        sa.Column("request_id", sa.String(128), primary_key=True),
        sa.Column("kind", sa.String(32), nullable=True),
        sa.Column("datacenter", sa.String(32), nullable=True),
        sa.Column("label", sa.Text, nullable=False),
        sa.Column("source", sa.JSON, nullable=True),
        sa.Column("state", sa.String(32), nullable=False),
        sa.Column("state_at", sa.Float, nullable=False),
        sa.Column("stage", sa.String(16), nullable=True),
        sa.Column("bytes_done", sa.BigInteger, nullable=False),
        sa.Column("bytes_total", sa.BigInteger, nullable=True),
        sa.Column("mb_per_s", sa.Float, nullable=True),
        sa.Column("progress_at", sa.Float, nullable=False),
        sa.Column("snapshot", sa.JSON, nullable=True),
        sa.Column("archive", sa.JSON, nullable=True),
        sa.Column("transfer", sa.JSON, nullable=True),
        sa.Column("errors", sa.JSON, nullable=False),
        sa.Column("updated_at", sa.Float, nullable=False),
    )
    op.create_table(
        "idempotency_keys",
        sa.Column("key", sa.String(200), primary_key=True),
        sa.Column("body_sha256", sa.String(64), nullable=False),
        sa.Column("migration_id", sa.String(64), nullable=False),
        sa.Column("created_at", sa.Float, nullable=False),
    )


def downgrade() -> None:
    op.drop_table("idempotency_keys")
    op.drop_table("migration_jobs")
    op.drop_index("ix_migrations_created", "migrations")
    with op.batch_alter_table("migrations") as batch:
        batch.drop_column("allocations")
