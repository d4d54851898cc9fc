"""A running service, and the lifecycle it owns: of every message and of every job.

A handler is a plain function `(event, ctx) -> None` holding only its decision. The runtime
opens the unit of work, claims the inbox under the handler's qualified name (a message seen
before stops there), calls the handler, commits on return (rolls back on raise), and
after the commit wakes the service's relay and job workers. A failure hook
`(event, ctx, error) -> None` is delivered the same way when the bus gives up on a message.
Jobs are run by `shared.jobs.JobWorker`, which applies what a job returns under the one
retry policy (`shared.retry`).

Each service's `bootstrap(settings) -> Service` builds one; `ferry run NAME` starts it,
`ferry run all` starts all of them in one process (the embedded default).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

from sqlalchemy import Connection, Engine

from shared import failpoints, logs, metrics
from shared.bus import ServiceConsumer, declare_standing, declare_topology
from shared.contracts import EVENTS, Event
from shared.db import Schema, make_engine, upgrade
from shared.envelope import Envelope
from shared.failpoints import failpoint
from shared.inbox_outbox import Outbox, UnitOfWork, Units
from shared.jobs import JobWorker
from shared.periodic import Periodic
from shared.relay import OutboxRelay
from shared.retry import RetryPolicy
from shared.settings import Settings
from shared.topology import QueueSpec

log = logging.getLogger(__name__)

DepsT = TypeVar("DepsT")


@dataclass(frozen=True)
class Context(Generic[DepsT]):
    """What a handler gets besides its event: the message, the open unit of work and the
    service's own dependencies."""

    envelope: Envelope
    uow: UnitOfWork
    deps: DepsT

    @property
    def connection(self) -> Connection:
        return self.uow.connection

    @property
    def outbox(self) -> Outbox:
        return self.uow.outbox

    @property
    def migration_id(self) -> str:
        return self.envelope.migration_id

    def emit(self, event: Event, *, migration_id: str | None = None) -> Envelope:
        """Add `event` to the outbox, caused by this message (of its migration by default)."""
        return self.uow.outbox.add(event, migration_id=migration_id or self.migration_id,
                                   cause=self.envelope)


Handler = Callable[[Any, Context[Any]], None]
FailureHandler = Callable[[Any, Context[Any], BaseException], None]


def handler_name(function: Callable[..., Any]) -> str:
    """The name a handler's inbox claims are recorded under: module and qualified name."""
    return f"{function.__module__}.{function.__qualname__}"


def deliver(handler: Handler, event: Any, envelope: Envelope, units: Units,
            deps: Any = None, *, service: str | None = None) -> bool:
    """Run `handler` on one message with exactly-once effect; False for a duplicate.
    `service`: the one delivering it (the scope of its failpoint).

    Raises whatever the handler raises (its transaction rolled back)."""
    return _once(handler_name(handler), lambda ctx: handler(event, ctx), envelope, units, deps,
                 service)


def deliver_failure(hook: FailureHandler, event: Any, envelope: Envelope,
                    error: BaseException, units: Units, deps: Any = None, *,
                    service: str | None = None) -> bool:
    """Run a failure hook on a message the bus gave up on, once; False for a duplicate."""
    return _once(handler_name(hook), lambda ctx: hook(event, ctx, error), envelope, units, deps,
                 service)


def _once(name: str, call: Callable[[Context[Any]], None], envelope: Envelope, units: Units,
          deps: Any, service: str | None) -> bool:
    with logs.context(migration_id=envelope.migration_id), units() as uow:
        # first in the transaction: a duplicate stops here, before the handler asks anything
        # of the world outside the database
        if not uow.inbox.claim(envelope.id, name):
            return False
        call(Context(envelope, uow, deps))
        uow.commit()
    metrics.observe_delivery(service or "", envelope.type,
                             time.time() - envelope.occurred_at.timestamp())
    # committed, not yet acked: redelivered, claimed again
    failpoint("runtime.after_commit", scope=service)
    return True


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
    """One service: its consumer, outbox relay, job workers and periodic loops, as threads.

    Extra parts with their own lifecycle (intake's HTTP server) hook in: each on_start runs
    after the consumer started (raising fails start()), each on_stop runs first on stop, so
    nothing new comes in while the rest winds down; each on_closed runs last, once no
    thread of the service runs any more (closing the connections they used)."""

    name: str
    settings: Settings
    units: Units
    queue: QueueSpec
    handlers: Mapping[str, Handler]
    deps: Any = None
    on_failure: FailureHandler | None = None
    workers: list[JobWorker] = field(default_factory=list)
    loops: list[Periodic] = field(default_factory=list)
    on_start: list[Callable[[], None]] = field(default_factory=list)
    on_stop: list[Callable[[], None]] = field(default_factory=list)
    on_closed: list[Callable[[], None]] = field(default_factory=list)
    relay: OutboxRelay = field(init=False)
    consumer: ServiceConsumer | None = field(init=False, default=None)
    _threads: list[threading.Thread] = field(init=False, default_factory=list)
    _metrics_key: str = field(init=False, default="")

    def __post_init__(self) -> None:
        self.settings = self.settings.for_service(self.name)  # its own broker user
        self.relay = OutboxRelay(self.engine, self.settings.broker_url,
                                 poll_seconds=self.settings.outbox_poll_seconds, name=self.name,
                                 delivery_limit=self.settings.delivery_limit)
        self.units.subscribe(self.relay.wake)
        for worker in self.workers:
            worker.service = self.name
            self.units.subscribe(worker.wake)
        # one entry per service and queue: two archivers of one process, two datacenters
        self._metrics_key = f"{self.name}:{self.queue.name}:{id(self)}"

    @property
    def engine(self) -> Engine:
        return self.units.engine

    def uow(self) -> UnitOfWork:
        """A unit of work that wakes this service's relay and workers when it commits."""
        return self.units()

    def wake(self) -> None:
        self.units.wake()

    def deliver(self, event: Any, envelope: Envelope) -> bool:
        """Handle one message as the consumer would; False for a duplicate. Raises
        KeyError for a type this service does not handle, and what the handler raises."""
        return deliver(self.handlers[envelope.type], event, envelope, self.units, self.deps,
                       service=self.name)

    def _fail(self, event: Any, envelope: Envelope, error: BaseException) -> None:
        assert self.on_failure is not None  # noqa: S101 - bound only when set
        deliver_failure(self.on_failure, event, envelope, error, self.units, self.deps,
                        service=self.name)

    def start(self) -> None:
        failpoints.check()  # a refused FERRY_FAILPOINTS stops the start, naming the entry
        metrics.TABLES.watch(self._metrics_key, self.name, self.engine,
                             [worker.leases.table for worker in self.workers])
        # every service's queues, not only its own: what it publishes before the consumer
        # ever started waits in that consumer's queue
        declare_standing(self.settings.broker_url, self.settings)
        declare_topology(self.settings.broker_url, self.queue, self.settings)
        if self.settings.outbox_relay:
            self.relay.start()
        for worker in self.workers:
            worker.start()
        if self.handlers:
            bound = {t: self._bind(h) for t, h in self.handlers.items()}
            self.consumer = ServiceConsumer(
                self.settings, self.queue, bound, RetryPolicy.from_settings(self.settings),
                self._fail if self.on_failure is not None else None)
            thread = threading.Thread(target=self.consumer.run, name=f"{self.name}-consumer",
                                      daemon=True)
            thread.start()
            self._threads.append(thread)
        for hook in self.on_start:
            hook()
        for loop in self.loops:
            loop.start()
        log.info("%s: started (queue %s, %d job workers)", self.name, self.queue.name,
                 sum(w.concurrency for w in self.workers))

    def _bind(self, handler: Handler) -> Callable[[Any, Envelope], None]:
        def handle(event: Any, envelope: Envelope) -> None:
            try:
                deliver(handler, event, envelope, self.units, self.deps, service=self.name)
            except BaseException:
                metrics.handler_errors.labels(self.name, envelope.type).inc()
                raise

        return handle

    def stop(self) -> None:
        for hook in self.on_stop:
            hook()
        for loop in self.loops:
            loop.stop()
        if self.consumer is not None:
            self.consumer.should_stop = True
        for thread in self._threads:
            thread.join(timeout=10)
        if self.consumer is not None:
            self.consumer.close()
        for worker in self.workers:
            worker.stop()
        self.relay.stop()
        metrics.TABLES.forget(self._metrics_key)
        for hook in self.on_closed:
            hook()


def open_database(settings: Settings, schema: Schema) -> Units:
    """Units of work on the service's database, its schema upgraded to the newest revision
    (services upgrade on start)."""
    engine = make_engine(settings.database_url(schema.name))
    upgrade(engine, schema)
    return Units(engine)
