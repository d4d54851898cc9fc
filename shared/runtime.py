"""A running service: its consumer, its outbox relay and its job workers, as threads.

Each service's bootstrap builds a `Service`; `ferry run NAME` starts one, `ferry run all`
starts all five in one process (the embedded default).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import Engine

from shared.bus import FailureHook, Handler, ServiceConsumer, declare_topology
from shared.contracts import EVENTS
from shared.inbox_outbox import UnitOfWork
from shared.jobs import JobWorker
from shared.relay import OutboxRelay
from shared.settings import Settings
from shared.topology import QueueSpec

log = logging.getLogger(__name__)

# A service's handler: a plain function that gets a fresh unit of work per message.
ServiceHandler = Callable[..., None]


def routing_keys(handlers: Mapping[str, Any], datacenter: str | None = None) -> tuple[str, ...]:
    """The bindings a service needs: one per handled type; datacenter-routed types get
    `.<datacenter>` when the service serves one datacenter, `.*` when it serves all."""
    keys = []
    for event_type in handlers:
        if EVENTS[event_type].ROUTED_BY_DATACENTER:
            keys.append(f"{event_type}.{datacenter or '*'}")
        else:
            keys.append(event_type)
    return tuple(keys)


@dataclass
class Service:
    name: str
    settings: Settings
    engine: Engine
    queue: QueueSpec
    handlers: Mapping[str, ServiceHandler]
    on_failure: FailureHook | None = None
    workers: list[JobWorker] = field(default_factory=list)
    relay: OutboxRelay | None = None
    consumer: ServiceConsumer | None = None
    _threads: list[threading.Thread] = field(default_factory=list)
    # Extra parts of a service with their own lifecycle (intake's HTTP server): each
    # on_start runs after the consumer started (raising fails start()), each on_stop runs
    # first on stop, so nothing new comes in while the rest winds down.
    on_start: list[Callable[[], None]] = field(default_factory=list)
    on_stop: list[Callable[[], None]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.relay = OutboxRelay(self.engine, self.settings.broker_url,
                                 poll_seconds=self.settings.outbox_poll_seconds, name=self.name,
                                 delivery_limit=self.settings.delivery_limit)

    def uow(self) -> UnitOfWork:
        """A unit of work that wakes this service's relay and workers when it commits."""
        return UnitOfWork(self.engine, on_commit=self.wake)

    def wake(self) -> None:
        if self.relay is not None:
            self.relay.wake()
        for worker in self.workers:
            worker.wake()

    def _bind(self, handler: ServiceHandler) -> Handler:
        def handle(event: Any, envelope: Any) -> None:
            handler(event, envelope, uow=self.uow())

        return handle

    def start(self) -> None:
        declare_topology(self.settings.broker_url, self.queue, self.settings)
        if self.settings.outbox_relay and self.relay is not None:
            self.relay.start()
        for worker in self.workers:
            worker.start()
        if self.handlers:
            bound = {t: self._bind(h) for t, h in self.handlers.items()}
            self.consumer = ServiceConsumer(self.settings, self.queue, bound, self.on_failure)
            thread = threading.Thread(target=self.consumer.run, name=f"{self.name}-consumer",
                                      daemon=True)
            thread.start()
            self._threads.append(thread)
        for hook in self.on_start:
            hook()
        log.info("%s: started (queue %s, %d job workers)", self.name, self.queue.name,
                 sum(w.concurrency for w in self.workers))

    def stop(self) -> None:
        for hook in self.on_stop:
            hook()
        if self.consumer is not None:
            self.consumer.should_stop = True
        for thread in self._threads:
            thread.join(timeout=10)
        if self.consumer is not None:
            self.consumer.close()
        for worker in self.workers:
            worker.stop()
        if self.relay is not None:
            self.relay.stop()


def open_database(settings: Settings, service: str) -> Engine:
    """The service's engine, its schema upgraded to the newest revision (services upgrade on
    start)."""
    from shared.db import make_engine, upgrade

    engine = make_engine(settings.database_url(service))
    upgrade(engine, service)
    return engine
