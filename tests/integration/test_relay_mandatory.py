"""No event lost for want of a queue (real RabbitMQ): the relay publishes `mandatory`, and a
row the broker returns stays in the outbox until its consumer's queue exists."""

from __future__ import annotations

from pathlib import Path

import pytest
from kombu import Queue
from sqlalchemy import select

from shared.bus import Publisher, UnroutableError, connect
from shared.db import make_engine
from shared.inbox_outbox import Units, metadata, outbox_table
from shared.relay import OutboxRelay
from shared.topology import EVENTS_EXCHANGE
from tests.support import echo
from tests.support.helpers import wait_for

KEY = "test.echoed"


@pytest.fixture
def rabbit(bare_rabbit_url: str) -> str:
    """A vhost with only the events exchange, as every service declares it at start."""
    with connect(bare_rabbit_url) as connection:
        channel = connection.channel()
        EVENTS_EXCHANGE(channel).declare()
        channel.close()
    return bare_rabbit_url


def bind_queue(url: str, name: str) -> None:
    with connect(url) as connection:
        channel = connection.channel()
        Queue(name, exchange=EVENTS_EXCHANGE, routing_key=KEY, durable=True)(channel).declare()
        channel.close()


def take(url: str, name: str) -> list[str]:
    taken = []
    with connect(url) as connection:
        channel = connection.channel()
        queue = Queue(name, exchange=EVENTS_EXCHANGE, routing_key=KEY, durable=True)(channel)
        while (message := queue.get(no_ack=True)) is not None:
            taken.append(message.body)
        channel.close()
    return taken


def test_without_mandatory_an_event_with_no_queue_is_lost(rabbit: str) -> None:
    # The failure the fix prevents: the broker confirms a message it routed nowhere
    publisher = Publisher(rabbit)
    publisher._mandatory = False  # noqa: SLF001 - the old behaviour, as the control
    try:
        publisher.publish(b'{"lost": true}', routing_key=KEY)  # confirmed: no error
    finally:
        publisher.close()
    bind_queue(rabbit, "late-consumer")
    assert take(rabbit, "late-consumer") == []


def test_a_mandatory_publish_with_no_queue_raises_and_one_with_a_queue_does_not(
        rabbit: str) -> None:
    publisher = Publisher(rabbit)
    try:
        with pytest.raises(UnroutableError, match=KEY):
            publisher.publish(b"{}", routing_key=KEY)
        bind_queue(rabbit, "consumer")
        publisher.publish(b'{"n": 1}', routing_key=KEY)
    finally:
        publisher.close()
    assert take(rabbit, "consumer") == ['{"n": 1}']


def test_relay_keeps_a_returned_row_until_its_queue_exists(rabbit: str, tmp_path: Path) -> None:
    # Given an outbox row for an event no queue is bound for yet
    engine = make_engine(f"sqlite:///{tmp_path}/relay.sqlite3")
    metadata.create_all(engine)
    with Units(engine)() as uow:
        uow.outbox.add(echo.Echoed(value="early"), migration_id="m-1")
        uow.commit()
    relay = OutboxRelay(engine, rabbit, poll_seconds=0.05, name="test")
    relay.start()
    try:
        # When the relay has tried it: returned, held, still unpublished
        wait_for(lambda: relay._held, what="the row returned and held")  # noqa: SLF001
        with engine.connect() as connection:
            assert connection.execute(select(outbox_table.c.published_at)).scalar_one() is None
        # And the consumer's queue appears (its service starts late)
        bind_queue(rabbit, "echoed-late")

        def published() -> bool:
            with engine.connect() as connection:
                return connection.execute(
                    select(outbox_table.c.published_at)).scalar_one() is not None

        # Then the relay publishes it there, once
        wait_for(published, timeout=30, what="the row published")
    finally:
        relay.stop()
        engine.dispose()
    bodies = take(rabbit, "echoed-late")
    assert len(bodies) == 1 and "early" in bodies[0]
