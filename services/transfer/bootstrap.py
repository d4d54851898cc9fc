"""Wiring for the transfer service: its database, destination, handlers, queue and worker."""

from __future__ import annotations

import functools
from typing import Any

from services.transfer.destination import parse_destination, ssh_identity
from services.transfer.handlers import HANDLERS, record_failed_message
from services.transfer.jobs import (
    TransferContext,
    TransferLeases,
    TransferWorker,
    destination_pool,
)
from shared.envelope import Envelope
from shared.runtime import Service, open_database, routing_keys
from shared.settings import Settings
from shared.topology import QueueSpec, queue_name

NAME = "transfer"


def bootstrap(settings: Settings, *, concurrency: int | None = None, **_: Any) -> Service:
    """The transfer service, not started. Raises ConfigurationError for a destination it
    could not reach (malformed, or remote without an SSH key and known_hosts)."""
    destination = parse_destination(settings.destination, settings)
    if not destination.is_local:
        ssh_identity(settings)  # fail at start, not at the first archive
    engine = open_database(settings, NAME)
    handlers = {event_type: functools.partial(handler, destination=destination.text)
                for event_type, handler in HANDLERS.items()}
    service: Service

    def on_failure(event: Any, envelope: Envelope, error: BaseException) -> None:
        record_failed_message(event, envelope, error, uow=service.uow())

    service = Service(NAME, settings, engine, QueueSpec(queue_name(NAME), routing_keys(HANDLERS)),
                      handlers, on_failure=on_failure)
    leases = TransferLeases(engine, settings.lease_seconds, settings.transfer_max_parallel)
    context = TransferContext(settings, engine, leases, service.uow, destination_pool(settings))
    service.workers.append(TransferWorker(context, concurrency or settings.concurrency))
    return service
