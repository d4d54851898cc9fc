"""Alembic environment for the intake service's own tables (run through shared.db.upgrade)."""

from services.intake.tables import metadata
from shared.db import run_migrations
from shared.inbox_outbox import metadata as messaging

run_migrations([messaging, metadata])
