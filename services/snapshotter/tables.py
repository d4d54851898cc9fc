"""The snapshotter service's own tables (the inbox and outbox come from shared.inbox_outbox)."""

from __future__ import annotations

from sqlalchemy import MetaData

metadata = MetaData()
