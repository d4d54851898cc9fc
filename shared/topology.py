"""Every exchange and queue Ferry declares, in one place.

- `ferry.events` (topic): every event, routing key = type (+ `.<datacenter>`).
- each service's work queue: a quorum queue with an explicit delivery limit, dead-lettered
  through `ferry.dead-letters` into `<queue>.dead` (the broker's guard for a message that
  kills its consumer before it can answer);
- `<queue>.retry.<ms>ms`: one TTL queue per delay tier, fed through `ferry.retry`. Every
  message in it has the same TTL, so expiry at the head (all RabbitMQ 3.10 does) is exact;
  it dead-letters back into the work queue through `ferry.retry` (routing key `<queue>`).

Retries and dead letters go through topic exchanges, routing key = the queue's name, never
the default exchange: RabbitMQ's topic permissions (ferry/broker.py) then hold each
service's broker user to its own queues' keys, where write access to the default exchange
would let it put a message into any queue by name. (Both were direct or default exchanges
before, `ferry.dead` among them: an exchange's type cannot change under its name, hence
the new names.)
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from kombu import Exchange, Queue, binding

EVENTS_EXCHANGE = Exchange("ferry.events", type="topic", durable=True)
RETRY_EXCHANGE = Exchange("ferry.retry", type="topic", durable=True)
DEAD_EXCHANGE = Exchange("ferry.dead-letters", type="topic", durable=True)
EXCHANGES = (EVENTS_EXCHANGE, RETRY_EXCHANGE, DEAD_EXCHANGE)
DEFAULT_EXCHANGE = Exchange("", type="direct")  # operators' replays and memory:// only

ATTEMPTS_HEADER = "x-ferry-attempts"
ERROR_HEADER = "x-ferry-error"
REASON_HEADER = "x-ferry-reason"
QUEUE_HEADER = "x-ferry-queue"
FAILED_AT_HEADER = "x-ferry-failed-at"

FIXED_QUEUES = ("intake.status", "resolver", "snapshotter")
# The services whose work queue exists once per datacenter: `<service>.<dc>`.
DATACENTER_SERVICES = ("archiver", "transfer")
MAX_ATTEMPTS_HEADER = 1_000_000  # no honest count comes near: a larger one is forged


def attempts_of(headers: dict[str, object]) -> int | None:
    """Our attempt count from a message's headers: 0 when absent, None when it is not a
    plain whole number in range (a malformed or forged header)."""
    value = headers.get(ATTEMPTS_HEADER)
    if value is None:
        return 0
    if isinstance(value, bool) or not isinstance(value, int):
        return None
    return value if 0 <= value <= MAX_ATTEMPTS_HEADER else None


@dataclass(frozen=True)
class QueueSpec:
    """A service's work queue and the routing keys it is bound with."""

    name: str
    routing_keys: tuple[str, ...]

    @property
    def dead_name(self) -> str:
        return f"{self.name}.dead"

    def retry_name(self, delay: float) -> str:
        return f"{self.name}.retry.{int(delay * 1000)}ms"


def queue_name(service: str, datacenter: str | None = None) -> str:
    """`archiver.<dc>` for the archiver, `transfer.<dc>` for a datacenter's transfer
    (plain `transfer` for one serving every datacenter from one staging directory, see
    services.transfer.bootstrap), `intake.status` for intake, else the service name.

    Raises ValueError when the archiver is named without a datacenter.
    """
    if service == "archiver":
        if not datacenter:
            raise ValueError("the archiver's queue needs a datacenter (--datacenter DC)")
        return f"archiver.{datacenter}"
    if service == "transfer" and datacenter:
        return f"transfer.{datacenter}"
    if service == "intake":
        return "intake.status"
    return service


# The events each per-datacenter queue takes `.<dc>`-routed: a datacenter whose archivers or
# transfer workers have not started yet must still keep them, so publishers declare that
# datacenter's queues too (see standing_queues_for).
DATACENTER_QUEUES: dict[str, tuple[str, ...]] = {
    "archiver": ("archive.requested", "snapshot.ready"),
    "transfer": ("archive.completed", "archive.failed"),
}
# What those queues are bound to besides: events not routed by datacenter, which every
# datacenter's queue hears. Declared with the queue, so `ferry broker setup` binds them
# for services whose own broker user may not.
DATACENTER_QUEUES_ALSO = {"archiver": ("snapshot.released", "transfer.completed"),
                          "transfer": ("migration.resolved",)}


def datacenter_queue(service: str, datacenter: str) -> QueueSpec:
    """`<service>.<datacenter>` with every key it is bound to (see DATACENTER_QUEUES)."""
    return QueueSpec(queue_name(service, datacenter),
                     (*(f"{t}.{datacenter}" for t in DATACENTER_QUEUES[service]),
                      *DATACENTER_QUEUES_ALSO.get(service, ())))


def standing_queues_for(routing_key: str) -> list[QueueSpec]:
    """The per-datacenter work queues that must exist before `routing_key` is published:
    those that take it, and the datacenter's others (an archive.requested for a datacenter
    declares its transfer queue too, before its archive.completed or migration.resolved)."""
    event_type, _, datacenter = routing_key.rpartition(".")
    if not datacenter or not any(event_type in types for types in DATACENTER_QUEUES.values()):
        return []
    return [datacenter_queue(service, datacenter) for service in DATACENTER_QUEUES]


# Every fixed work queue and what it is bound to. Every service declares all of them at start
# (shared.bus.declare_standing), so no event depends on its consumer having started: what
# intake publishes before the resolver ever ran waits in `resolver`. Each service's
# HANDLERS must bind exactly these (tests/unit/test_topology.py).
FIXED_BINDINGS: dict[str, tuple[str, ...]] = {
    "intake.status": ("#",),
    "resolver": ("migration.submitted",),
    "snapshotter": ("snapshot.requested", "archive.completed.*", "archive.failed.*"),
}


def standing_queues(datacenters: Iterable[str] = ()) -> list[QueueSpec]:
    """The queues that must exist before anything is published: the fixed ones, and the
    archiver's and the transfer's queue of each datacenter named."""
    specs = [QueueSpec(name, keys) for name, keys in FIXED_BINDINGS.items()]
    for datacenter in datacenters:
        specs.extend(datacenter_queue(service, datacenter) for service in DATACENTER_QUEUES)
    return specs


def work_queue(spec: QueueSpec, delivery_limit: int) -> Queue:
    return Queue(
        spec.name,
        bindings=[*(binding(EVENTS_EXCHANGE, routing_key=key) for key in spec.routing_keys),
                  binding(RETRY_EXCHANGE, routing_key=spec.name)],  # expired retries
        durable=True,
        queue_arguments={
            "x-queue-type": "quorum",
            "x-delivery-limit": delivery_limit,
            "x-dead-letter-exchange": DEAD_EXCHANGE.name,
            "x-dead-letter-routing-key": spec.name,
        },
    )


def dead_queue(name: str) -> Queue:
    """`<name>.dead`, bound to `ferry.dead-letters` with the work queue's name."""
    return Queue(
        f"{name}.dead",
        exchange=DEAD_EXCHANGE,
        routing_key=name,
        durable=True,
        queue_arguments={"x-queue-type": "quorum"},
    )


def retry_queue(spec: QueueSpec, delay: float) -> Queue:
    return Queue(
        spec.retry_name(delay),
        exchange=RETRY_EXCHANGE,
        routing_key=spec.retry_name(delay),
        durable=True,
        queue_arguments={
            "x-message-ttl": int(delay * 1000),
            "x-dead-letter-exchange": RETRY_EXCHANGE.name,
            "x-dead-letter-routing-key": spec.name,
        },
    )


def all_queues(spec: QueueSpec, delivery_limit: int, delays: Iterable[float]) -> list[Queue]:
    return [
        work_queue(spec, delivery_limit),
        dead_queue(spec.name),
        *(retry_queue(spec, delay) for delay in sorted(set(delays))),
    ]
