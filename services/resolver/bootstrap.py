"""Wiring for the resolver service: its database and pools, the inventory, its handlers."""

from __future__ import annotations

import logging

from services.resolver import SCHEMA
from services.resolver.allocation import Allocator
from services.resolver.handlers import HANDLERS, ON_FAILURE, Resolver
from services.resolver.inventory import open_inventory
from services.resolver.pools import Pools, seed_pools
from shared.runtime import Service, open_database, routing_keys
from shared.settings import Settings
from shared.topology import QueueSpec, queue_name

NAME = "resolver"
log = logging.getLogger(__name__)


def bootstrap(settings: Settings) -> Service:
    """Raises ConfigurationError for unusable pool settings or an unreadable inventory file."""
    pools = Pools.from_settings(settings)  # before touching the database: fail fast
    units = open_database(settings, SCHEMA)
    seed_pools(units.engine, pools)
    inventory = open_inventory(settings) if settings.inventory else None
    if inventory is None:
        log.warning("resolver: FERRY_INVENTORY is not set; every migration will fail until "
                    "it is")
    return Service(NAME, settings, units, QueueSpec(queue_name(NAME), routing_keys(HANDLERS)),
                   HANDLERS, deps=Resolver(Allocator(pools), inventory), on_failure=ON_FAILURE)
