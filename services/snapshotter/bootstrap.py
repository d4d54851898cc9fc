"""Wiring for the snapshotter service: its database, its handlers, its queue."""

from __future__ import annotations

from typing import Any

from services.snapshotter.handlers import HANDLERS
from shared.runtime import Service, open_database, routing_keys
from shared.settings import Settings
from shared.topology import QueueSpec, queue_name

NAME = "snapshotter"


def bootstrap(settings: Settings, **_: Any) -> Service:
    return Service(NAME, settings, open_database(settings, NAME),
                   QueueSpec(queue_name(NAME), routing_keys(HANDLERS)), HANDLERS)
