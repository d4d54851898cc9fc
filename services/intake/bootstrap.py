"""Wiring for intake: its database, its handlers, its queue."""

from __future__ import annotations

from typing import Any

from services.intake.handlers import HANDLERS
from shared.runtime import Service, open_database
from shared.settings import Settings
from shared.topology import QueueSpec, queue_name

NAME = "intake"


def bootstrap(settings: Settings, **_: Any) -> Service:
    # intake.status hears every event: "#" rather than one binding per type.
    return Service(NAME, settings, open_database(settings, NAME),
                   QueueSpec(queue_name(NAME), ("#",)), HANDLERS)
