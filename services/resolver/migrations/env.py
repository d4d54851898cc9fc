"""Alembic environment for the resolver service's own tables (run through shared.db.upgrade)."""

from services.resolver.tables import metadata
from shared.db import run_migrations
from shared.inbox_outbox import metadata as messaging

run_migrations([messaging, metadata])
