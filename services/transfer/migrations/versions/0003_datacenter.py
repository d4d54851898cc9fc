"""transfer: each transfer job belongs to its archive's datacenter

Revision ID: transfer_0003

A datacenter's transfer workers claim only its jobs (they can read only its staging), and
the per-destination limit counts per (datacenter, destination) link. Jobs recorded before
take the datacenter their archive.completed named (kept in the payload).
"""

import json

import sqlalchemy as sa
from alembic import op

revision = "transfer_0003"
down_revision = "transfer_0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("transfers", sa.Column("datacenter", sa.String(64), nullable=True))
    connection = op.get_bind()
    jobs = sa.table("transfers", sa.column("id", sa.String), sa.column("payload", sa.JSON),
                    sa.column("datacenter", sa.String))
    found = []
    for job_id, payload in connection.execute(sa.select(jobs.c.id, jobs.c.payload)).all():
        if isinstance(payload, str):
            payload = json.loads(payload)
        datacenter = (payload or {}).get("datacenter")
        if datacenter:
            found.append({"job_id": job_id, "dc": datacenter})
    if found:  # one statement, executed for every job: not a round trip each
        connection.execute(sa.update(jobs).where(jobs.c.id == sa.bindparam("job_id"))
                           .values(datacenter=sa.bindparam("dc")), found)
    op.create_index("ix_transfers_datacenter_destination_state", "transfers",
                    ["datacenter", "destination", "state"])


def downgrade() -> None:
    op.drop_index("ix_transfers_datacenter_destination_state", "transfers")
    op.drop_column("transfers", "datacenter")
