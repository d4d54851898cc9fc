"""Wiring for the resolver service: its database and pools, the inventory, its handlers."""

from __future__ import annotations

import functools
import logging
from typing import Any

from services.resolver.allocation import Allocator
from services.resolver.handlers import HANDLERS, Resolver, fail_migration
from services.resolver.inventory import open_inventory
from services.resolver.pools import Pools, seed_pools
from shared.envelope import Envelope
from shared.runtime import Service, open_database, routing_keys
from shared.settings import Settings
from shared.topology import QueueSpec, queue_name

NAME = "resolver"
log = logging.getLogger(__name__)


def bootstrap(settings: Settings, **_: Any) -> Service:
    """Raises ConfigurationError for unusable pool settings or an unreadable inventory file."""
    pools = Pools.from_settings(settings)  # before touching the database: fail fast
    engine = open_database(settings, NAME)
    seed_pools(engine, pools)
    inventory = open_inventory(settings) if settings.inventory else None
    if inventory is None:
        log.warning("resolver: FERRY_INVENTORY is not set; every migration will fail until "
                    "it is")
    resolver = Resolver(engine, Allocator(pools), inventory)
    handlers = {kind: functools.partial(handler, resolver=resolver)
                for kind, handler in HANDLERS.items()}
    service: Service

    def on_failure(event: Any, envelope: Envelope, error: BaseException) -> None:
        fail_migration(event, envelope, error, uow=service.uow())

    service = Service(NAME, settings, engine, QueueSpec(queue_name(NAME), routing_keys(HANDLERS)),
                      handlers, on_failure=on_failure)
    return service
