"""resolver: the digest of the document each resolution was made from

Revision ID: resolver_0003
"""

import sqlalchemy as sa
from alembic import op

revision = "resolver_0003"
down_revision = "resolver_0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # nullable: resolutions made before this revision have no digest on record
    op.add_column("resolutions", sa.Column("document_sha256", sa.String(64), nullable=True))


def downgrade() -> None:
    op.drop_column("resolutions", "document_sha256")
