"""Dead letters: list them without losing them, replay them onto their work queue.

Listing takes every message with basic.get and never acks: closing the channel puts all of
them back. Replay publishes a copy to the work queue with confirms, then acks the dead one.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import Any

from kombu import Message

from shared.bus import Publisher, connect, raw_body, supports_ttl
from shared.topology import (
    ATTEMPTS_HEADER,
    DEFAULT_EXCHANGE,
    ERROR_HEADER,
    REASON_HEADER,
    attempts_of,
    dead_queue,
)


@dataclass(frozen=True)
class DeadLetter:
    queue: str
    id: str
    type: str
    migration_id: str
    reason: str
    error: str
    attempts: int
    body: bytes


def _work_queue_name(queue: str) -> str:
    return queue.removesuffix(".dead")


def _describe(queue: str, message: Message) -> DeadLetter:
    headers: dict[str, Any] = dict(message.headers or {})
    body = raw_body(message)
    try:
        data = json.loads(body)
        ids = (str(data.get("id", "?")), str(data.get("type", "?")),
               str(data.get("migration_id", "?")))
    except (ValueError, AttributeError):
        ids = ("?", "?", "?")
    reason = str(headers.get(REASON_HEADER) or headers.get("x-first-death-reason") or "?")
    error = str(headers.get(ERROR_HEADER) or "")
    if not error and reason == "delivery_limit":
        error = "delivery limit reached: the consumer died or rejected it repeatedly"
    attempts = attempts_of(headers)
    if not attempts:  # absent (0) or unreadable (None): the broker's own count, if any
        delivered = headers.get("x-delivery-count")
        attempts = delivered if isinstance(delivered, int) and not isinstance(
            delivered, bool) else 0
    return DeadLetter(queue, *ids, reason=reason, error=error, attempts=attempts, body=body)


def list_dead(broker_url: str, queue: str) -> list[DeadLetter]:
    """Every dead letter of a work queue, in order. Nothing is consumed."""
    name = _work_queue_name(queue)
    with connect(broker_url) as connection:
        channel = connection.channel()
        bound = dead_queue(name)(channel)
        bound.declare()
        letters = []
        while (message := bound.get(no_ack=False)) is not None:
            letters.append(_describe(name, message))
        _give_back(connection, channel)
    return letters


def _give_back(connection: Any, channel: Any) -> None:
    """Return every unacked message to its queue."""
    if not supports_ttl(connection):
        # The in-memory transport does not restore on close (do_restore is off): ask.
        channel.basic_recover(requeue=True)
    channel.close()



def replay_dead(broker_url: str, queue: str, ids: set[str] | None = None) -> list[DeadLetter]:
    """Put dead letters (all, or those whose envelope id is in `ids`) back on their work queue.

    The attempt count starts again. Only the letters there when the replay starts are
    read, each once: a replayed copy that dies again while the replay runs stays dead
    (for a later replay). Returns what was replayed; the rest stay dead.
    """
    name = _work_queue_name(queue)
    replayed = []
    publisher = Publisher(broker_url)
    try:
        with connect(broker_url) as connection:
            channel = connection.channel()
            bound = dead_queue(name)(channel)
            bound.declare()
            waiting = bound.queue_declare(passive=True).message_count
            for _ in range(waiting):
                message = bound.get(no_ack=False)
                if message is None:
                    break
                letter = _describe(name, message)
                if ids is not None and letter.id not in ids:
                    continue
                headers = {k: v for k, v in dict(message.headers or {}).items()
                           if not k.startswith("x-death") and not k.startswith("x-first-death")
                           and not k.startswith("x-last-death") and k != ATTEMPTS_HEADER}
                headers["x-ferry-replayed-at"] = time.time()
                publisher.publish(letter.body, exchange=DEFAULT_EXCHANGE, routing_key=name,
                                  headers=headers)
                message.ack()
                replayed.append(letter)
            _give_back(connection, channel)
    finally:
        publisher.close()
    return replayed
