"""Alembic environment for the transfer service's own tables (run through shared.db.upgrade)."""

from services.transfer.tables import metadata
from shared.db import run_migrations
from shared.inbox_outbox import metadata as messaging

run_migrations([messaging, metadata])
