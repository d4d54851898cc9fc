"""Publishing with confirms, and the consumer every service runs (kombu ConsumerMixin).

What the consumer does with a delivery:
- not JSON, not an envelope, unknown type, payload fails its schema → `<queue>.dead` at once;
- handler raises PermanentError → the service's failure hook, then `<queue>.dead`;
- handler raises anything else (TransientError, a bug) → `<queue>.retry.<tier>` with the
  attempt count in our own header; after `max_attempts` → failure hook, then `<queue>.dead`;
- handler returns → ack (the handler has committed its transaction by then).
Dead letters and retries are published with confirms before the original is acked, so a
crash at any point leaves the message in one queue or another, never nowhere. Both go
through topic exchanges (`ferry.dead-letters`, `ferry.retry`), never the default one: a
service's own broker user may write only its own queues' routing keys there.

Queues are declared where the user may (the admin of `ferry broker setup`, a development
broker's guest) and otherwise only checked to exist: a service's own broker user has no
`configure` permission at all, so it can neither delete a queue nor make one that
dead-letters into another service's.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
import traceback
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from kombu import Connection, Consumer, Message, Producer, Queue
from kombu.mixins import ConsumerMixin

from shared import embedded_broker, metrics
from shared.contracts import Event
from shared.db import is_unreachable
from shared.envelope import Envelope
from shared.errors import (
    ConfigurationError,
    MalformedMessageError,
    PermanentError,
    TransientError,
)
from shared.retry import RetryPolicy
from shared.settings import Settings
from shared.topology import (
    ATTEMPTS_HEADER,
    DEAD_EXCHANGE,
    DEFAULT_EXCHANGE,
    ERROR_HEADER,
    EVENTS_EXCHANGE,
    FAILED_AT_HEADER,
    QUEUE_HEADER,
    REASON_HEADER,
    RETRY_EXCHANGE,
    QueueSpec,
    all_queues,
    attempts_of,
    dead_queue,
    retry_queue,
    standing_queues,
    work_queue,
)

ACCESS_REFUSED, NOT_FOUND, PRECONDITION_FAILED = 403, 404, 406

log = logging.getLogger(__name__)

Handler = Callable[[Any, Envelope], None]
FailureHook = Callable[[Any, Envelope, BaseException], None]


def connect(url: str, *, confirm: bool = False) -> Connection:
    """A kombu connection; `confirm` turns on publisher confirms (AMQP only: the embedded
    broker commits a publish before it returns). `sqlite+ferry:///path` is the embedded
    broker (shared.embedded_broker). Raises ValueError for a malformed embedded URL."""
    options: dict[str, Any] = {"confirm_publish": True} if confirm else {}
    if url.startswith(embedded_broker.SCHEME):
        options["path"] = str(embedded_broker.broker_path(url))
        return Connection(transport=embedded_broker.Transport, transport_options=options)
    if url.startswith("memory:"):
        # The in-memory transport polls its queues; its default 1 s is a second per hop.
        options["polling_interval"] = 0.02
    return Connection(url, transport_options=options, connect_timeout=10)


def raw_body(message: Message) -> bytes:
    """The body as sent: py-amqp hands text bodies over already decoded."""
    body = message.body
    return body.encode("utf-8") if isinstance(body, str) else bytes(body)


def supports_ttl(connection: Connection) -> bool:
    """RabbitMQ and the embedded broker keep delayed retries, dead letters and `mandatory`
    returns; the in-memory transport has none of them: its retries are timed in-process."""
    return str(connection.transport.driver_type) in {"amqp", "pyamqp",
                                                      embedded_broker.Transport.driver_type}


class UnroutableError(TransientError):
    """The broker returned a mandatory message: no queue is bound for its routing key (yet)."""


class PublishRefusedError(TransientError):
    """The broker refused a publish (403 ACCESS_REFUSED): this broker user may not write that
    exchange or routing key. Transient: an operator can fix the permissions."""


class TopologyMissingError(ConfigurationError):
    """A queue does not exist and this broker user may not declare it."""


def _code(error: BaseException) -> int | None:
    code = getattr(error, "reply_code", None)
    return code if isinstance(code, int) else None


def declare_queues(connection: Connection, queues: Iterable[Queue], *,
                   strict: bool = False) -> int:
    """Declare each queue with its exchanges and bindings, each on a channel of its own (a
    refusal closes the channel). A queue this user may not declare (403: a service's own
    broker user) is checked passively instead, which needs no permission. A queue that
    exists with other arguments (another delivery limit, an older Ferry's dead-letter
    exchange) is left as it is with a warning, or raises ConfigurationError when `strict`.
    Returns how many were declared. Raises TopologyMissingError for a queue that does not
    exist and may not be declared, kombu/amqp errors otherwise."""
    declared = 0
    for queue in queues:
        channel = connection.channel()
        try:
            queue(channel).declare()
            declared += 1
        except connection.channel_errors as error:
            if _code(error) == ACCESS_REFUSED:
                _must_exist(connection, queue.name, error)
            elif _code(error) == PRECONDITION_FAILED and not strict:
                log.warning("queue %s exists with other arguments, left as it is: %s",
                            queue.name, error)
            elif _code(error) == PRECONDITION_FAILED:
                raise ConfigurationError(
                    f"queue {queue.name} exists with other arguments than Ferry declares "
                    f"({error}): an older Ferry's (dead letters through ferry.dead) or another "
                    f"FERRY_DELIVERY_LIMIT; drain it, delete it and run this again") from error
            else:
                raise
        finally:
            with contextlib.suppress(Exception):
                channel.close()
    return declared


def _must_exist(connection: Connection, name: str, refused: BaseException) -> None:
    channel = connection.channel()
    try:
        channel.queue_declare(queue=name, passive=True)
    except connection.channel_errors as error:
        if _code(error) != NOT_FOUND:
            raise
        user = getattr(connection, "userid", None) or "this user"
        raise TopologyMissingError(
            f"queue {name} does not exist and broker user {user} may not declare it "
            f"({refused}); run `ferry broker setup` (with the same FERRY_RETRY_DELAYS and "
            f"--datacenter for every archiver) first") from error
    finally:
        with contextlib.suppress(Exception):
            channel.close()


class Publisher:
    """Publishes raw JSON bodies with confirms over its own connection, `mandatory` on AMQP:
    a message no queue would take is returned by the broker and raises UnroutableError,
    instead of vanishing. Not thread-safe."""

    def __init__(self, url: str) -> None:
        self._connection = connect(url, confirm=True)
        self._producer: Producer | None = None
        self._mandatory = supports_ttl(self._connection)  # AMQP; the memory transport has none
        self._returned: list[str] = []

    def _get_producer(self) -> Producer:
        if self._producer is None:
            self._producer = Producer(self._connection.channel(), on_return=self._on_return)
        return self._producer

    def _on_return(self, exception: Any, exchange: Any, routing_key: str, message: Any) -> None:
        # py-amqp delivers basic.return before the confirm of the same message
        self._returned.append(routing_key)

    def publish(
        self,
        body: bytes,
        *,
        routing_key: str,
        exchange: Any = EVENTS_EXCHANGE,
        headers: Mapping[str, Any] | None = None,
        declare: Iterable[Queue] = (),
        content_encoding: str = "utf-8",
    ) -> None:
        """Publish and wait for the broker's confirm, first declaring `declare` where this user
        may (see declare_queues; one it may not is left to `mandatory`). Raises
        UnroutableError when the broker returned it (no queue bound), PublishRefusedError when
        it refused it (403), kombu/amqp errors on other failures."""
        if declare:
            try:
                declare_queues(self._connection, declare)
            except TopologyMissingError as error:
                log.error("%s", error)  # published anyway: mandatory, it comes back
        ensure = self._connection.ensure(
            self, self._publish_once, max_retries=3, interval_start=0.2, interval_step=0.5
        )
        self._returned.clear()
        name = getattr(exchange, "name", exchange) or "the default exchange"
        try:
            ensure(body, routing_key, exchange, dict(headers or {}), content_encoding)
        except self._connection.channel_errors as error:
            self._reset()  # the broker closed the channel
            if _code(error) == ACCESS_REFUSED:
                raise PublishRefusedError(f"the broker refused {routing_key!r} on {name}: "
                                          f"{error}") from error
            raise
        if self._returned:
            self._returned.clear()
            raise UnroutableError(f"no queue is bound for {routing_key!r} on {name}")

    def _publish_once(
        self, body: bytes | str, routing_key: str, exchange: Any, headers: dict[str, Any],
        content_encoding: str,
    ) -> None:
        self._get_producer().publish(
            body,
            exchange=exchange,
            routing_key=routing_key,
            headers=headers,
            content_type="application/json",
            content_encoding=content_encoding,
            delivery_mode=2,
            mandatory=self._mandatory,
        )

    def _reset(self) -> None:
        if self._producer is not None:
            with contextlib.suppress(Exception):
                self._producer.channel.close()
        self._producer = None

    def revive(self, channel: Any) -> None:
        """Called by kombu's ensure() after a reconnect."""
        self._producer = None

    def close(self) -> None:
        self._connection.release()


def declare_standing(url: str, settings: Settings, datacenters: Iterable[str] = ()) -> int:
    """Declare every fixed work queue (and the archiver queue of each of `datacenters`) with
    its bindings and dead-letter queue, so an event published before its consumer started
    waits for it; a service's own broker user checks that they exist (declare_queues).
    Idempotent; returns how many queues were declared. Raises TopologyMissingError,
    kombu/amqp connection errors."""
    with connect(url) as connection:
        return declare_queues(connection, [
            queue for spec in standing_queues(datacenters)
            for queue in (work_queue(spec, settings.delivery_limit), dead_queue(spec.name))])


def declare_all(url: str, settings: Settings, datacenters: Iterable[str]) -> int:
    """Declare the whole topology, every service's work, dead and retry queues (the
    archiver's per datacenter), as `ferry broker setup` does with admin credentials. Returns
    how many queues were declared. Raises ConfigurationError for a queue that exists with
    other arguments, kombu/amqp errors."""
    with connect(url) as connection:
        return declare_queues(connection, [
            queue for spec in standing_queues(datacenters)
            for queue in all_queues(spec, settings.delivery_limit, settings.retry_delays)],
            strict=True)


def declare_topology(url: str, spec: QueueSpec, settings: Settings) -> None:
    """Declare a service's work, dead and retry queues (idempotent; see declare_queues).
    Raises TopologyMissingError, kombu/amqp errors."""
    with connect(url) as connection:
        declare_queues(connection, all_queues(spec, settings.delivery_limit,
                                              settings.retry_delays))


class ServiceConsumer(ConsumerMixin):  # type: ignore[misc]
    """Consumes one service's work queue and dispatches envelopes to plain handler functions."""

    def __init__(
        self,
        settings: Settings,
        spec: QueueSpec,
        handlers: Mapping[str, Handler],
        policy: RetryPolicy,
        on_failure: FailureHook | None = None,
    ) -> None:
        self.settings = settings
        self.spec = spec
        self.handlers = dict(handlers)
        self.policy = policy
        self.on_failure = on_failure
        self.connection = connect(settings.broker_url)
        self._publisher = Publisher(settings.broker_url)
        self._ttl = supports_ttl(self.connection)
        self._timers: set[threading.Timer] = set()
        self.handled = 0
        self.deferred = 0  # retries for a database outage, which spend no attempt

    # -- kombu hooks -----------------------------------------------------------------
    def get_consumers(self, consumer_cls: type[Consumer], channel: Any) -> list[Consumer]:
        # again on every (re)connect: a broker that lost its queues gets them back
        declare_topology(self.settings.broker_url, self.spec, self.settings)
        consumer = consumer_cls(
            queues=[work_queue(self.spec, self.settings.delivery_limit)],
            on_message=self.on_message,
            accept=["application/json"],
            prefetch_count=self.settings.prefetch,
            auto_declare=False,  # declared above, where this user may
        )
        # kombu's default on_decode_error acks (loses) the message: dead-letter it instead.
        consumer.on_decode_error = self._on_decode_error
        return [consumer]

    def on_connection_error(self, exc: BaseException, interval: float) -> None:
        log.warning("%s: broker connection lost (%s); retrying in %.1fs", self.spec.name,
                    exc, interval)

    def _on_decode_error(self, message: Message, exc: BaseException) -> None:
        self._dead_letter(message, "malformed", f"undecodable message: {exc}", 0)

    # -- dispatch ---------------------------------------------------------------------
    def on_message(self, message: Message) -> None:
        """Dispatch one delivery. If even the failure path fails (the failure hook's
        database is down, the broker refuses the dead letter), the message goes back to its
        queue and the consumer keeps running: an exception here would end its thread."""
        try:
            self._dispatch(message)
        except tuple(self.connection.connection_errors):
            raise  # ConsumerMixin reconnects; the unacked message comes back by itself
        except Exception:  # noqa: BLE001 - never let one message stop the consumer
            log.exception("%s: could not settle a message; it goes back to the queue",
                          self.spec.name)
            message.requeue()

    def _dispatch(self, message: Message) -> None:
        headers = dict(message.headers or {})
        attempts = attempts_of(headers)
        if attempts is None:  # dead-lettered once, as malformed: never retried on its word
            self._dead_letter(message, "malformed", f"the {ATTEMPTS_HEADER} header "
                              f"{str(headers.get(ATTEMPTS_HEADER))[:100]!r} is not an "
                              f"attempt count", 0)
            return
        try:
            envelope = Envelope.from_json(message.body)
            event = envelope.event()
        except MalformedMessageError as error:
            self._dead_letter(message, "malformed", str(error), attempts)
            return
        handler = self.handlers.get(envelope.type)
        if handler is None:
            self._dead_letter(message, "unhandled",
                              f"{self.spec.name} has no handler for {envelope.type}", attempts)
            return
        try:
            handler(event, envelope)
        except PermanentError as error:
            log.warning("%s: %s %s failed for good: %s", self.spec.name, envelope.type,
                        envelope.id, error)
            reason = str(getattr(error, "dead_letter_reason", "permanent"))
            self._give_up(message, event, envelope, error, reason, attempts + 1)
        except Exception as error:  # noqa: BLE001 - anything else is worth another try
            detail = "".join(traceback.format_exception_only(error)).strip()
            if is_unreachable(error):
                # The service's own database is down: no fault of the message. Retried at
                # the delay its attempts have earned, never dead-lettered for an outage.
                self.deferred += 1
                log.warning("%s: %s %s waits for the database (%s); retrying, attempt not "
                            "counted", self.spec.name, envelope.type, envelope.id, detail)
                self._retry(message, attempts, detail)
                return
            attempts += 1
            if self.policy.exhausted(attempts):
                log.error("%s: %s %s failed %d times: %s", self.spec.name, envelope.type,
                          envelope.id, attempts, detail)
                self._give_up(message, event, envelope, error, "attempts", attempts)
            else:
                log.warning("%s: %s %s attempt %d failed, retrying: %s", self.spec.name,
                            envelope.type, envelope.id, attempts, detail)
                self._retry(message, attempts, detail)
        else:
            message.ack()
            self.handled += 1

    def _give_up(self, message: Message, event: Event, envelope: Envelope,
                 error: BaseException, reason: str, attempts: int) -> None:
        if self.on_failure is not None:
            # May raise: then the message is not acked and comes back (the hook is idempotent).
            self.on_failure(event, envelope, error)
        self._dead_letter(message, reason, f"{type(error).__name__}: {error}", attempts)

    def _dead_letter(self, message: Message, reason: str, error: str, attempts: int) -> None:
        headers = dict(message.headers or {})
        headers.update({
            REASON_HEADER: reason,
            ERROR_HEADER: error[-4000:],
            ATTEMPTS_HEADER: attempts,
            QUEUE_HEADER: self.spec.name,
            FAILED_AT_HEADER: time.time(),
        })
        self._publisher.publish(raw_body(message), exchange=DEAD_EXCHANGE,
                                routing_key=self.spec.name, headers=headers,
                                content_encoding="binary")
        message.ack()
        metrics.dead_letters.labels(self.spec.name, reason).inc()

    def _retry(self, message: Message, attempts: int, error: str) -> None:
        delay = self.policy.tier(attempts)
        headers = dict(message.headers or {})
        headers.update({ATTEMPTS_HEADER: attempts, ERROR_HEADER: error[-4000:]})
        if self._ttl:
            queue = retry_queue(self.spec, delay)
            self._publisher.publish(raw_body(message), exchange=RETRY_EXCHANGE,
                                    routing_key=queue.name, headers=headers)
        else:
            self._later(delay, raw_body(message), headers)
        message.ack()
        metrics.message_retries.labels(self.spec.name).inc()

    def _later(self, delay: float, body: bytes, headers: dict[str, Any]) -> None:
        # memory:// has no TTL: time the retry here (the in-memory broker dies with us anyway).
        def fire() -> None:
            self._timers.discard(timer)
            publisher = Publisher(self.settings.broker_url)
            try:
                publisher.publish(body, exchange=DEFAULT_EXCHANGE, routing_key=self.spec.name,
                                  headers=headers)
            finally:
                publisher.close()

        timer = threading.Timer(delay, fire)
        timer.daemon = True
        self._timers.add(timer)
        timer.start()

    def close(self) -> None:
        self.should_stop = True
        self._publisher.close()
