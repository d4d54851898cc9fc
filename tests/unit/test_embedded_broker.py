"""The embedded broker (sqlite+ferry://): what it keeps across a SIGKILL, and the RabbitMQ
behaviours Ferry relies on (routing from any connection, mandatory, TTL retries, delivery
limit, dead letters)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from kombu import Connection, Queue

from ferry.dlq import list_dead, replay_dead
from shared.broker_store import BrokerStore
from shared.bus import Publisher, UnroutableError, connect
from shared.embedded_broker import broker_path, embedded_url
from shared.settings import Settings
from shared.topology import (
    DEAD_EXCHANGE,
    DEFAULT_EXCHANGE,
    EVENTS_EXCHANGE,
    QueueSpec,
    all_queues,
    retry_queue,
)
from tests.support.helpers import wait_for
from tests.support.processes import ROOT

SPEC = QueueSpec("work", ("thing.happened",))


def declare(url: str, delivery_limit: int = 10) -> None:
    with connect(url) as connection:
        channel = connection.channel()
        for queue in all_queues(SPEC, delivery_limit, (0.5,)):
            queue(channel).declare()
        channel.close()


def get(url: str, queue: str = "work", *, ack: bool = True) -> bytes | None:
    with connect(url) as connection:
        message = Queue(queue)(connection.channel()).get(no_ack=False)
        if message is None:
            return None
        if ack:
            message.ack()
        return bytes(message.body)


KILLED_HOLDING = textwrap.dedent("""
    import os, signal, sys
    from kombu import Connection, Queue
    from shared.bus import connect
    url = sys.argv[1]
    connection = connect(url) if url.startswith("sqlite+ferry") else Connection(url)
    message = Queue("work")(connection.channel()).get(no_ack=False)
    print(message.body.decode(), flush=True)
    os.kill(os.getpid(), signal.SIGKILL)  # as a crash between the get and the ack would
""")


@pytest.mark.parametrize("transport", ["embedded", "kombu-sqlalchemy"])
def test_message_held_by_a_killed_process_is_delivered_again(tmp_path: Path,
                                                             transport: str) -> None:
    url = (embedded_url(tmp_path) if transport == "embedded"
           else f"sqla+sqlite:///{tmp_path}/kombu.sqlite3")
    # Given a message in a queue
    with (connect(url) if transport == "embedded" else Connection(url)) as connection:
        channel = connection.channel()
        queue = Queue("work", EVENTS_EXCHANGE, routing_key="thing.happened")(channel)
        queue.declare()
        connection.Producer(channel).publish(b'{"n": 1}', exchange=EVENTS_EXCHANGE,
                                             routing_key="thing.happened",
                                             content_type="application/json")
        # When a process takes it and is SIGKILLed before its ack
        done = subprocess.run([sys.executable, "-c", KILLED_HOLDING, url], cwd=ROOT,
                              capture_output=True, text=True, timeout=60,
                              env={**os.environ, "PYTHONPATH": str(ROOT)})
        assert done.returncode == -9 and '{"n": 1}' in done.stdout, done.stderr
    # Then the next connection to open (a restart) gets it again, and its ack removes it
    with (connect(url) if transport == "embedded" else Connection(url)) as connection:
        again = Queue("work")(connection.channel()).get(no_ack=False)
        if again is not None:
            again.ack()
    if transport == "embedded":
        assert again is not None and again.body == b'{"n": 1}'
        assert again.headers["x-delivery-count"] == 1
        assert get(url) is None
    else:
        # (kombu's own SQLAlchemy transport marked it invisible for good: lost)
        assert again is None


def test_a_publisher_routes_by_bindings_another_connection_declared(tmp_path: Path) -> None:
    url = embedded_url(tmp_path)
    declare(url)
    # When a fresh publisher that declared nothing publishes an event
    publisher = Publisher(url)
    publisher.publish(b'{"n": 2}', routing_key="thing.happened")
    # Then it is in the bound queue; an event no queue is bound for is returned, not kept
    with pytest.raises(UnroutableError, match="no queue is bound for 'nothing.bound'"):
        publisher.publish(b'{"n": 3}', routing_key="nothing.bound")
    publisher.close()
    assert get(url) == b'{"n": 2}'
    assert get(url) is None


def test_retry_waits_its_delay_in_the_file_then_comes_back(tmp_path: Path) -> None:
    url = embedded_url(tmp_path)
    declare(url)
    # When a message is published to the 0.5 s retry queue, as the consumer retries
    publisher = Publisher(url)
    publisher.publish(b'{"n": 4}', exchange=DEFAULT_EXCHANGE,
                      routing_key=retry_queue(SPEC, 0.5).name)
    publisher.close()
    store = BrokerStore(broker_path(url))
    # Then it is stored for the work queue, not ready yet (a restart keeps the wait)
    assert store.size("work") == 0
    wait_for(lambda: store.size("work") == 1, timeout=5, what="the retry to be due")
    assert get(url) == b'{"n": 4}'
    store.close()


def test_message_returned_past_the_delivery_limit_is_dead_lettered(tmp_path: Path) -> None:
    url = embedded_url(tmp_path)
    declare(url, delivery_limit=2)
    publisher = Publisher(url)
    publisher.publish(b'{"id": "m-1", "type": "thing.happened"}',
                      routing_key="thing.happened")
    publisher.close()
    # When its consumers go away without an ack three times (delivery limit 2)
    for _ in range(3):
        assert get(url, ack=False) is not None  # the channel closes unacked: given back
    # Then it is not delivered a fourth time but dead-lettered, as a quorum queue does
    assert get(url) is None
    letters = list_dead(url, "work")
    assert [(letter.id, letter.reason) for letter in letters] == [("m-1", "delivery_limit")]
    # And `ferry dlq list` consumed nothing; a replay puts it back on its queue, once
    assert [letter.id for letter in replay_dead(url, "work")] == ["m-1"]
    assert list_dead(url, "work") == []
    assert get(url) == b'{"id": "m-1", "type": "thing.happened"}'


def test_dead_letter_published_by_the_consumer_lands_in_the_dead_queue(tmp_path: Path) -> None:
    url = embedded_url(tmp_path)
    declare(url)
    publisher = Publisher(url)
    publisher.publish(b'{"id": "m-2"}', exchange=DEAD_EXCHANGE, routing_key="work",
                      headers={"x-ferry-reason": "malformed"})
    publisher.close()
    assert [(x.id, x.reason) for x in list_dead(url, "work.dead")] == [("m-2", "malformed")]


def test_default_broker_is_the_embedded_file_in_the_state_directory(tmp_path: Path) -> None:
    assert Settings(state_dir=tmp_path).broker_url == f"sqlite+ferry://{tmp_path}/broker.sqlite3"
    assert Settings(state_dir=tmp_path, broker_url="memory://").broker_url == "memory://"


@pytest.mark.parametrize("url", ["sqlite+ferry://relative/broker.sqlite3", "sqlite+ferry://"])
def test_embedded_url_without_an_absolute_file_is_refused(url: str) -> None:
    with pytest.raises(ValueError, match="needs an absolute file path"):
        connect(url)
