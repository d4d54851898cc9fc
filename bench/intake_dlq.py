"""Dead letters for bench/intake.py: `count` dead letters in a fresh RabbitMQ vhost (made
here with rabbitmqctl, deleted after), replayed by ferry.dlq.replay_dead (what `ferry dlq
replay --all` runs) while a consumer rejects every replayed copy, so that each copy dies
again during the replay: the case that replayed 303 letters 2,210 times."""

from __future__ import annotations

import json
import os
import subprocess
import threading
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from kombu import Consumer, Message

from ferry.dlq import list_dead, replay_dead
from shared.bus import Publisher, connect, raw_body
from shared.topology import (
    DEAD_EXCHANGE,
    ERROR_HEADER,
    REASON_HEADER,
    dead_queue,
    standing_queues,
    work_queue,
)

RABBIT_HOST = os.environ.get("FERRY_TEST_RABBIT", "guest:guest@127.0.0.1:5672")
QUEUE = "transfer"


def _rabbitmqctl(*args: str) -> None:
    subprocess.run(["rabbitmqctl", *args], check=True, capture_output=True,  # noqa: S603,S607
                   timeout=60)


@contextmanager
def rabbit_vhost() -> Iterator[str]:
    vhost = f"ferry-bench-{uuid.uuid4().hex[:12]}"
    _rabbitmqctl("add_vhost", vhost)
    try:
        _rabbitmqctl("set_permissions", "-p", vhost, "guest", ".*", ".*", ".*")
        yield f"amqp://{RABBIT_HOST}/{vhost}"
    finally:
        _rabbitmqctl("delete_vhost", vhost)


@dataclass(frozen=True)
class Replay:
    dead: int  # letters there when the replay started
    replayed: int  # what replay_dead returned
    distinct: int  # distinct envelope ids among them
    consumed: Counter[str]  # copies the rejecting consumer got, by id
    dead_after: Counter[str]  # letters in the dead queue afterwards, by id
    seconds: float


def replay_bench(url: str, count: int) -> Replay:
    spec = next(s for s in standing_queues() if s.name == QUEUE)
    with connect(url) as connection:
        channel = connection.channel()
        work_queue(spec, delivery_limit=3)(channel).declare()
        dead_queue(QUEUE)(channel).declare()
    publisher = Publisher(url)
    try:
        for n in range(count):
            body = json.dumps({"id": f"evt-{n:04d}", "type": "archive.completed.dc1",
                               "migration_id": "mig-bench", "payload": {}}).encode()
            publisher.publish(body, exchange=DEAD_EXCHANGE, routing_key=QUEUE,
                              headers={REASON_HEADER: "permanent", ERROR_HEADER: "bench"})
    finally:
        publisher.close()
    consumed: Counter[str] = Counter()
    stop = threading.Event()

    def reject_all() -> None:
        def on_message(body: object, message: Message) -> None:
            consumed[json.loads(raw_body(message))["id"]] += 1
            message.reject(requeue=False)  # dies again: back to transfer.dead

        with connect(url) as consuming:
            queue = work_queue(spec, delivery_limit=3)
            with Consumer(consuming.channel(), [queue], callbacks=[on_message],
                          accept=["json"]):
                while not stop.is_set():
                    try:
                        consuming.drain_events(timeout=0.2)
                    except TimeoutError:
                        pass

    consumer = threading.Thread(target=reject_all)
    consumer.start()
    try:
        started = time.perf_counter()
        replayed = replay_dead(url, QUEUE)
        seconds = time.perf_counter() - started
        deadline = time.monotonic() + 60
        while sum(consumed.values()) < len(replayed) and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(0.5)  # a copy replayed twice would arrive now (bench only, not a test)
    finally:
        stop.set()
        consumer.join()
    dead_after = Counter(letter.id for letter in list_dead(url, QUEUE))
    return Replay(count, len(replayed), len({letter.id for letter in replayed}), consumed,
                  dead_after, seconds)
