"""The embedded default's broker: a kombu transport on one SQLite file that survives SIGKILL.

`FERRY_BROKER_URL=sqlite+ferry:///abs/path/broker.sqlite3` (`ferry run all` and `ferry demo`
use `<state_dir>/broker.sqlite3`). The publisher, the consumer and the dead-letter tools
speak kombu to it exactly as to RabbitMQ; `shared.broker_store` keeps everything in the file.

Why not kombu's own SQLAlchemy transport (read in kombu 5.7, and tried): its get marks a row
invisible, and nothing makes it visible again after a SIGKILL (an unacked message is put back
only by a clean close); its ack deletes nothing; its bindings live in each connection's
memory, so the relay's publisher, which declares no queue, drops every event without a word.
And like memory:// it has no TTL, no dead-lettering and no `mandatory`.

Here: a publish is committed before it returns (the relay marks a row published only then);
a message no binding routes is returned to the producer when published `mandatory`; a get
leases the message, the ack (after the handler's commit) deletes it; a lease of a process
that died is given back by the next process that looks (`shared.broker_store`).
"""

from __future__ import annotations

import uuid
from collections import defaultdict
from pathlib import Path
from queue import Empty
from time import monotonic
from typing import Any

from kombu.exceptions import ChannelError
from kombu.transport import virtual

from shared.broker_process import signal_for
from shared.broker_store import BrokerStore

SCHEME = "sqlite+ferry://"


def broker_path(url: str) -> Path:
    """The file of a `sqlite+ferry:///abs/path` URL. Raises ValueError for another scheme
    or a path that is not absolute."""
    if not url.startswith(SCHEME):
        raise ValueError(f"not an embedded broker URL ({SCHEME}/abs/path): {url!r}")
    path = Path(url[len(SCHEME):])
    if not path.is_absolute() or path.name == "":
        raise ValueError(f"the embedded broker needs an absolute file path, as in "
                         f"{SCHEME}/var/lib/ferry/broker.sqlite3, not {url!r}")
    return path


def embedded_url(state_dir: Path) -> str:
    """The embedded broker's URL under a state directory."""
    return f"{SCHEME}{(state_dir / 'broker.sqlite3').resolve()}"


class Channel(virtual.Channel):  # type: ignore[misc]
    """A virtual channel whose exchanges, queues, bindings and messages are in the store."""

    def __init__(self, connection: Any, **kwargs: Any) -> None:
        super().__init__(connection, **kwargs)
        self.events: defaultdict[str, set[Any]] = defaultdict(set)  # basic_return callbacks
        self._no_ack: set[str] = set()

    @property
    def store(self) -> BrokerStore:
        store: BrokerStore = self.connection.store
        return store

    # -- topology -------------------------------------------------------------------------
    def exchange_declare(self, exchange: str | None = None, type: str = "direct",  # noqa: A002
                         durable: bool = False, auto_delete: bool = False,
                         arguments: Any = None, nowait: bool = False,
                         passive: bool = False) -> None:
        if exchange and not passive:
            self.store.declare_exchange(exchange, type or "direct")

    def _new_queue(self, queue: str, arguments: dict[str, Any] | None = None,
                   **kwargs: Any) -> None:
        self.store.declare_queue(queue, arguments)

    def _has_queue(self, queue: str, **kwargs: Any) -> bool:
        return self.store.has_queue(queue)

    def _size(self, queue: str) -> int:
        return self.store.size(queue)

    def _purge(self, queue: str) -> int:
        return self.store.purge(queue)

    def queue_bind(self, queue: str, exchange: str | None = None, routing_key: str = "",
                   arguments: Any = None, **kwargs: Any) -> None:
        self.store.bind(exchange or "amq.direct", routing_key, queue)

    def queue_delete(self, queue: str, if_unused: bool = False, if_empty: bool = False,
                     **kwargs: Any) -> None:
        if if_empty and self.store.size(queue):
            return
        self.store.delete_queue(queue)

    # -- messages -------------------------------------------------------------------------
    def basic_publish(self, message: dict[str, Any], exchange: str, routing_key: str,
                      mandatory: bool = False, **kwargs: Any) -> None:
        """Store the message in every queue it routes to (committed before this returns).
        Unroutable and `mandatory`: handed to the producer's on_return, as AMQP does."""
        self._inplace_augment_message(message, exchange, routing_key)
        queues = self.store.route(exchange, routing_key)
        if queues:
            self.store.put(queues, message)
        elif mandatory:
            error = ChannelError(f"NO_ROUTE: nothing bound to {exchange!r} for {routing_key!r}")
            for on_return in list(self.events["basic_return"]):
                on_return(error, exchange, routing_key, message)

    def _put(self, queue: str, message: dict[str, Any], **kwargs: Any) -> None:
        self.store.put([queue], message)

    def _get(self, queue: str, timeout: float | None = None) -> dict[str, Any]:
        tag = uuid.uuid4().hex
        payload = self.store.lease(queue, tag)
        if payload is None:
            raise Empty()
        payload["properties"]["delivery_tag"] = tag  # one tag per delivery, not per message
        return payload

    def _get_and_deliver(self, queue: str, callback: Any) -> None:
        message = self._get(queue)
        if queue in self._no_ack:
            self.store.ack(message["properties"]["delivery_tag"])
        callback(message, queue)

    def basic_consume(self, queue: str, no_ack: bool, callback: Any, consumer_tag: str,
                      **kwargs: Any) -> Any:
        if no_ack:
            self._no_ack.add(queue)
        return super().basic_consume(queue, no_ack, callback, consumer_tag, **kwargs)

    def basic_get(self, queue: str, no_ack: bool = False, **kwargs: Any) -> Any:
        message = super().basic_get(queue, no_ack=no_ack, **kwargs)
        if message is not None and no_ack:
            self.store.ack(message.delivery_tag)
        return message

    def basic_ack(self, delivery_tag: str, multiple: bool = False) -> None:
        super().basic_ack(delivery_tag, multiple)
        self.store.ack(delivery_tag)

    def basic_reject(self, delivery_tag: str, requeue: bool = False) -> None:
        super().basic_reject(delivery_tag, requeue=requeue)  # a requeue gives it back
        if not requeue:
            self.store.reject(delivery_tag)

    def _restore(self, message: Any) -> None:
        # an unacked message on a closed channel or a requeue: the same row, ready again
        self.store.give_back(message.delivery_tag)


class Transport(virtual.Transport):  # type: ignore[misc]
    """One kombu connection: one store (one SQLite connection) shared by its channels."""

    Channel = Channel
    driver_type = "ferry-sqlite"
    driver_name = "sqlite3"
    polling_interval = 0.5  # for what other processes publish; this one's wake us at once
    implements = virtual.Transport.implements.extend(
        exchange_type=frozenset(["direct", "topic"]))

    def __init__(self, client: Any, **kwargs: Any) -> None:
        super().__init__(client, **kwargs)
        self.path = Path(client.transport_options["path"])
        self.store = BrokerStore(self.path)

    def driver_version(self) -> str:
        import sqlite3

        return sqlite3.sqlite_version

    def close_connection(self, connection: Any) -> None:
        super().close_connection(connection)  # closing the channels gives back what is unacked
        self.store.close()

    def drain_events(self, connection: Any, timeout: float | None = None) -> None:
        """Deliver one message; between polls, wait for a publish in this process."""
        signal = signal_for(self.path)
        deadline = None if timeout is None else monotonic() + timeout
        while True:
            seen = signal.generation
            try:
                self.cycle.get(self._deliver, timeout=timeout)
                return
            except Empty:
                pass
            wait = self.polling_interval
            if deadline is not None:
                left = deadline - monotonic()
                if left <= 0:
                    raise TimeoutError()
                wait = min(wait, left)
            signal.wait(seen, wait)
