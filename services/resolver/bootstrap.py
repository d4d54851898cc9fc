"""Wiring for the resolver service: its database and pools, the inventory, its handlers."""

from __future__ import annotations

import logging
from collections.abc import Callable

from services.resolver import SCHEMA
from services.resolver.allocation import Allocator
from services.resolver.handlers import HANDLERS, ON_FAILURE, Resolver
from services.resolver.inventory import FileInventory, Inventory, open_inventory
from services.resolver.pools import Pools, seed_pools
from shared.bus import declare_standing
from shared.periodic import Periodic
from shared.runtime import Service, open_database, routing_keys
from shared.settings import Settings
from shared.topology import QueueSpec, queue_name

NAME = "resolver"
INVENTORY_WATCH_SECONDS = 10.0  # how soon a datacenter added to the inventory file has a queue
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
    declare = datacenter_queues(settings.for_service(NAME), inventory)  # its own broker user
    return Service(NAME, settings, units, QueueSpec(queue_name(NAME), routing_keys(HANDLERS)),
                   HANDLERS, deps=Resolver(Allocator(pools), inventory), on_failure=ON_FAILURE,
                   on_start=[declare],
                   loops=[Periodic("resolver-datacenters", INVENTORY_WATCH_SECONDS, declare)])


def datacenter_queues(settings: Settings, inventory: Inventory | None) -> Callable[[], None]:
    """A hook declaring `archiver.<dc>` and `transfer.<dc>` for every datacenter the
    inventory names, so an archive request (and the archive) for a datacenter whose
    archivers or transfer workers never ran waits in its queue. Run at
    start (raising fails the start) and again whenever the inventory file changed (it is
    re-read on change); each datacenter once per process. An HTTP inventory has no list of
    datacenters: the relay declares a routed event's queue as it publishes it."""
    declared: set[str] = set()

    def declare() -> None:
        if not isinstance(inventory, FileInventory):
            return
        new = sorted(set(inventory.document().datacenters) - declared)
        if new:
            declare_standing(settings.broker_url, settings, new)
            declared.update(new)
            log.info("resolver: archiver and transfer queues declared for %s", ", ".join(new))

    return declare
