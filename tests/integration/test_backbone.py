"""The message backbone's guarantees, on the embedded default and on RabbitMQ + PostgreSQL."""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator

import pytest
from kombu import Queue
from sqlalchemy import func, insert, select

from ferry.dlq import list_dead, replay_dead
from shared.bus import Publisher, connect
from shared.envelope import Envelope
from shared.errors import PermanentError
from shared.inbox_outbox import outbox_table
from shared.runtime import Context, Service
from shared.settings import Settings
from shared.topology import DEAD_EXCHANGE, EVENTS_EXCHANGE, QueueSpec
from tests.conftest import Backbone
from tests.support import echo
from tests.support.helpers import wait_for


def fast_settings(broker_url: str, **overrides: object) -> Settings:
    values: dict[str, object] = {
        "broker_url": broker_url, "retry_delays": (0.05, 0.1), "max_attempts": 3,
        "outbox_poll_seconds": 0.1, "lease_seconds": 2.0, "job_poll_seconds": 0.1,
    }
    values.update(overrides)
    return Settings(**values)  # type: ignore[arg-type]


@pytest.fixture
def running(backbone: Backbone) -> Iterator[Service]:
    """The echo service on this backbone, on a queue of its own."""
    service = echo.build(fast_settings(backbone.broker_url), backbone.db_url,
                         queue=f"echo-{uuid.uuid4().hex[:8]}")
    service.start()
    yield service
    service.stop()
    service.engine.dispose()


def publish(broker_url: str, envelope: Envelope) -> None:
    publisher = Publisher(broker_url)
    try:
        publisher.publish(envelope.to_json(), routing_key=envelope.routing_key)
    finally:
        publisher.close()


def publish_raw(broker_url: str, body: bytes, routing_key: str = "test.echo",
                content_type: str = "application/json") -> None:
    with connect(broker_url, confirm=True) as connection:
        producer = connection.Producer()
        producer.publish(body, exchange=EVENTS_EXCHANGE, routing_key=routing_key,
                         content_type=content_type, content_encoding="binary")


def count(service: Service, table: object, *where: object) -> int:
    with service.engine.connect() as connection:
        return int(connection.execute(
            select(func.count()).select_from(table).where(*where)  # type: ignore[arg-type]
        ).scalar_one())


def echo_envelope(value: str, fail: str = "never") -> Envelope:
    return Envelope.wrap(echo.Echo(value=value, fail=fail), migration_id="m-1")  # type: ignore[arg-type]


def test_message_delivered_twice_has_one_effect(running: Service) -> None:
    # Given one envelope
    envelope = echo_envelope("twice")
    # When the broker delivers it twice
    publish(running.settings.broker_url, envelope)
    publish(running.settings.broker_url, envelope)
    # Then the handler ran its transaction once and emitted one event
    assert running.consumer is not None
    wait_for(lambda: running.consumer.handled == 2, what="both deliveries handled")  # type: ignore[union-attr]
    assert count(running, echo.effects) == 1
    assert count(running, outbox_table) == 1


def test_outbox_event_is_published_once_with_confirms(running: Service) -> None:
    # Given a queue that watches for the echo service's output
    broker = running.settings.broker_url
    watch = Queue(f"watch-{uuid.uuid4().hex[:8]}", EVENTS_EXCHANGE, routing_key="test.echoed")
    with connect(broker) as connection:
        channel = connection.channel()
        bound = watch(channel)
        bound.declare()
        # When a message is handled
        publish(broker, echo_envelope("out"))
        message = wait_for(lambda: bound.get(no_ack=True), what="test.echoed published")
        # Then its event reaches the broker, and the outbox row is marked published
        body = json.loads(message.body)  # type: ignore[attr-defined]
        assert body["type"] == "test.echoed" and body["payload"] == {"value": "out"}
        assert body["causation_id"] is not None
        wait_for(lambda: count(running, outbox_table, outbox_table.c.published_at.is_not(None))
                 == 1, what="outbox row marked published")
        assert bound.get(no_ack=True) is None
        channel.close()


@pytest.mark.parametrize("body,content_type", [
    (b"this is not json {", "application/json"),
    (b'{"hello": "world"}', "application/json"),
    (json.dumps({"id": str(uuid.uuid4()), "type": "test.unknown", "migration_id": "m",
                 "occurred_at": "2026-11-26T00:00:00Z", "payload": {}}).encode(),
     "application/json"),
    (json.dumps({"id": str(uuid.uuid4()), "type": "test.echo", "migration_id": "m",
                 "occurred_at": "2026-11-26T00:00:00Z", "payload": {"value": 7}}).encode(),
     "application/json"),
    (b"\x80\x04\x95pickled", "application/x-python-serialize"),
], ids=["not-json", "not-an-envelope", "unknown-type", "wrong-payload", "pickle"])
def test_malformed_body_is_dead_lettered_at_once(running: Service, body: bytes,
                                                 content_type: str) -> None:
    # When a body that is not a valid Ferry message arrives
    publish_raw(running.settings.broker_url, body, content_type=content_type)
    # Then it lands in the dead-letter queue at once, unchanged, with no retry
    letters = wait_for(lambda: list_dead(running.settings.broker_url, running.queue.name),
                       what="dead letter")
    assert len(letters) == 1  # type: ignore[arg-type]
    letter = letters[0]  # type: ignore[index]
    assert letter.reason == "malformed" and letter.attempts == 0
    assert letter.body == body
    assert count(running, echo.effects) == 0


def test_failing_handler_ends_in_dead_letter_queue_then_replay_handles_it_once(
    running: Service,
) -> None:
    broker, queue = running.settings.broker_url, running.queue.name
    # Given a handler that fails until healed
    envelope = echo_envelope("stubborn", fail="until_flag")
    publish(broker, envelope)
    # When it has failed max_attempts times
    letters = wait_for(lambda: list_dead(broker, queue), what="dead letter after attempts")
    # Then it is dead-lettered with the error text and the attempt count
    letter = letters[0]  # type: ignore[index]
    assert letter.id == str(envelope.id) and letter.type == "test.echo"
    assert letter.reason == "attempts" and letter.attempts == 3
    assert "not healed yet" in letter.error
    assert count(running, echo.failures) == 1
    # And listing twice consumes nothing
    assert [d.id for d in list_dead(broker, queue)] == [str(envelope.id)]
    assert [d.id for d in list_dead(broker, queue)] == [str(envelope.id)]
    # When the cause is fixed and the dead letter replayed
    with running.engine.begin() as connection:
        connection.execute(insert(echo.flags).values(name="heal"))
    replayed = replay_dead(broker, queue, {str(envelope.id)})
    # Then it is handled exactly once and the dead-letter queue is empty
    assert [d.id for d in replayed] == [str(envelope.id)]
    wait_for(lambda: count(running, echo.effects) == 1, what="replayed message handled")
    assert list_dead(broker, queue) == []


def test_replaying_an_already_handled_message_has_no_second_effect(running: Service) -> None:
    broker, queue = running.settings.broker_url, running.queue.name
    # Given a message that was handled
    envelope = echo_envelope("done-before")
    publish(broker, envelope)
    wait_for(lambda: count(running, echo.effects) == 1, what="first handling")
    # And a copy of it sitting in the dead-letter queue
    with connect(broker, confirm=True) as connection:
        connection.Producer().publish(envelope.to_json(), exchange=DEAD_EXCHANGE,
                                      routing_key=queue, content_type="application/json",
                                      content_encoding="utf-8")
    wait_for(lambda: list_dead(broker, queue), what="copy in dead-letter queue")
    # When it is replayed
    replay_dead(broker, queue)
    # Then the inbox recognises it: still one effect, one outgoing event
    assert running.consumer is not None
    wait_for(lambda: running.consumer.handled == 2, what="replay handled")  # type: ignore[union-attr]
    assert count(running, echo.effects) == 1
    assert count(running, outbox_table) == 1


def test_permanent_error_is_dead_lettered_without_retry(running: Service) -> None:
    broker, queue = running.settings.broker_url, running.queue.name
    envelope = echo_envelope("hopeless", fail="permanent")
    publish(broker, envelope)
    letters = wait_for(lambda: list_dead(broker, queue), what="dead letter")
    letter = letters[0]  # type: ignore[index]
    assert letter.reason == "permanent" and letter.attempts == 1
    assert "PermanentError: echo hopeless: this can never work" in letter.error
    assert count(running, echo.failures) == 1


def test_transient_error_is_retried_with_delay_then_succeeds(running: Service) -> None:
    broker = running.settings.broker_url
    # Given a handler failing until healed
    publish(broker, echo_envelope("flaky", fail="until_flag"))
    wait_for(lambda: running.consumer and running.consumer.handled == 0, what="consumer up")
    # When it is healed before the attempts run out
    with running.engine.begin() as connection:
        connection.execute(insert(echo.flags).values(name="heal"))
    # Then a later attempt succeeds: one effect, nothing dead
    wait_for(lambda: count(running, echo.effects) == 1, what="retried success")
    assert list_dead(broker, running.queue.name) == []


def test_event_for_a_datacenter_without_workers_waits_in_its_queue(running: Service) -> None:
    from shared.contracts import ArchiveRequested, ArchiveSource

    broker = running.settings.broker_url
    datacenter = f"dc{uuid.uuid4().hex[:6]}"
    # Given no archiver for this datacenter ever started
    event = ArchiveRequested(datacenter=datacenter, request_id="r-1", kind="shared_fs",
                             reuse_key="k", source=ArchiveSource(host="local", path="/data"))
    # When a service publishes an archive request for it through its outbox
    with running.uow() as uow:
        uow.outbox.add(event, migration_id="m-1")
        uow.commit()
    # Then the request waits in that datacenter's queue instead of being dropped
    wait_for(lambda: count(running, outbox_table, outbox_table.c.published_at.is_not(None)) == 1,
             what="request published")
    with connect(broker) as connection:
        channel = connection.channel()
        queue = Queue(f"archiver.{datacenter}", no_declare=True)(channel)
        message = wait_for(lambda: queue.get(no_ack=False), what="request in archiver queue")
        assert json.loads(message.body)["payload"]["request_id"] == "r-1"  # type: ignore[attr-defined]
        channel.close()


def _hopeless(event: echo.Echo, ctx: Context[list[str]]) -> None:
    if event.value == "hopeless":
        raise PermanentError("never")
    ctx.deps.append(f"handled {event.value}")


def _flaky_hook(event: echo.Echo, ctx: Context[list[str]], error: BaseException) -> None:
    ctx.deps.append("hook")
    if ctx.deps.count("hook") == 1:
        raise RuntimeError("the failure record's database is down")


def test_consumer_survives_a_failing_failure_hook(backbone: Backbone) -> None:
    calls: list[str] = []
    settings = fast_settings(backbone.broker_url)
    tables = echo.build(settings, backbone.db_url, queue=f"echo-{uuid.uuid4().hex[:8]}")
    custom = Service("echo", settings, tables.units, QueueSpec(tables.queue.name,
                                                               ("test.echo",)),
                     {echo.Echo.TYPE: _hopeless}, deps=calls, on_failure=_flaky_hook)
    custom.start()
    try:
        # Given a message whose failure hook fails the first time
        publish(backbone.broker_url, echo_envelope("hopeless"))
        # Then it comes back, the hook runs again and the message is dead-lettered once
        letters = wait_for(lambda: list_dead(backbone.broker_url, custom.queue.name),
                           what="dead letter after a failing hook")
        assert len(letters) == 1 and calls.count("hook") == 2  # type: ignore[arg-type]
        # And the consumer is still alive for the next message
        publish(backbone.broker_url, echo_envelope("next"))
        wait_for(lambda: "handled next" in calls, what="next message handled")
    finally:
        custom.stop()
        custom.engine.dispose()
