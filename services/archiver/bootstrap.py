"""Wiring for an archiver worker: one datacenter's queue, its database, its handlers."""

from __future__ import annotations

from services.archiver.handlers import HANDLERS
from shared.runtime import Service, open_database, routing_keys
from shared.settings import Settings
from shared.topology import QueueSpec, queue_name

NAME = "archiver"


def bootstrap(settings: Settings, *, datacenter: str | None = None,
              concurrency: int | None = None) -> Service:
    """Raises ValueError when no datacenter is given (here or as FERRY_DATACENTER)."""
    dc = datacenter or settings.datacenter
    name = queue_name(NAME, dc)
    return Service(NAME, settings, open_database(settings, NAME),
                   QueueSpec(name, routing_keys(HANDLERS, dc)), HANDLERS)
