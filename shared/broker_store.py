"""The embedded broker's storage: exchanges, queues, bindings and messages in one SQLite file.

A message row is ready when no one holds it and its time has come (`visible_at`); a get
leases it to this process and a delivery tag, the ack deletes it, a give-back makes it ready
again and counts the return. Every process that leases holds an exclusive flock on its own
file under `<file>-owners/` for as long as it lives: whoever can take that lock knows the
owner is dead (SIGKILLed, say) and gives its leases back (shared.broker_process).

What RabbitMQ's queue arguments mean here (those Ferry's topology uses):
- `x-message-ttl` with `x-dead-letter-exchange` (a retry queue, which no one consumes): the
  message is stored straight into what that exchange routes it to, ready after the TTL;
- `x-delivery-limit`: a message returned more often than that is dead-lettered, with
  `x-first-death-reason: delivery_limit`;
- `x-dead-letter-exchange` / `-routing-key`: where a rejected or over-limit message goes.
"""

from __future__ import annotations

import contextlib
import json
import logging
import re
import sqlite3
import threading
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from kombu.transport.virtual.exchange import TopicExchange

from shared.broker_process import owner_for, signal_for

log = logging.getLogger(__name__)

SCHEMA = """
CREATE TABLE IF NOT EXISTS exchanges (name TEXT PRIMARY KEY, type TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS queues (name TEXT PRIMARY KEY, arguments TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS bindings (exchange TEXT NOT NULL, routing_key TEXT NOT NULL,
    queue TEXT NOT NULL, PRIMARY KEY (exchange, routing_key, queue));
CREATE TABLE IF NOT EXISTS messages (id INTEGER PRIMARY KEY AUTOINCREMENT,
    queue TEXT NOT NULL, payload TEXT NOT NULL, visible_at REAL NOT NULL,
    owner TEXT, tag TEXT UNIQUE, returns INTEGER NOT NULL DEFAULT 0);
CREATE INDEX IF NOT EXISTS messages_ready ON messages (queue, owner, visible_at, id);
CREATE INDEX IF NOT EXISTS messages_owner ON messages (owner);
"""

_TOPIC = TopicExchange(None)
_patterns: dict[str, re.Pattern[str]] = {}


def topic_matches(binding_key: str, routing_key: str) -> bool:
    """AMQP topic matching as kombu's in-memory exchange does it (`*` one word, `#` any)."""
    pattern = _patterns.get(binding_key)
    if pattern is None:
        pattern = _patterns[binding_key] = re.compile(_TOPIC.key_to_pattern(binding_key))
    return pattern.match(routing_key) is not None


class BrokerStore:
    """One connection to the broker file, safe to share between threads (one lock). Every
    method commits before it returns; each raises sqlite3.Error when the file fails."""

    def __init__(self, path: Path, *, reclaim_seconds: float = 5.0) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self._db = sqlite3.connect(path, timeout=30, isolation_level=None,
                                   check_same_thread=False)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")  # a confirmed publish survives power loss
        self._lock = threading.RLock()
        with self._write() as db:
            for statement in SCHEMA.split(";"):
                if statement.strip():
                    db.execute(statement)
        self.owner = owner_for(path)
        self._reclaim_seconds = reclaim_seconds
        self._reclaimed_at = 0.0
        self.reclaim()

    @contextlib.contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    def close(self) -> None:
        with self._lock:
            self._db.close()

    # -- topology ---------------------------------------------------------------------------
    def declare_exchange(self, name: str, kind: str) -> None:
        with self._write() as db:
            db.execute("INSERT OR IGNORE INTO exchanges VALUES (?, ?)", (name, kind))

    def declare_queue(self, name: str, arguments: dict[str, Any] | None) -> None:
        """Declare `name`; a queue that exists keeps the arguments it was declared with."""
        wanted = json.dumps(arguments or {}, sort_keys=True)
        with self._write() as db:
            db.execute("INSERT OR IGNORE INTO queues VALUES (?, ?)", (name, wanted))
            (kept,) = db.execute("SELECT arguments FROM queues WHERE name = ?",
                                 (name,)).fetchone()
        if kept != wanted:
            log.warning("queue %s exists with arguments %s, kept (asked for %s)", name, kept,
                        wanted)

    def bind(self, exchange: str, routing_key: str, queue: str) -> None:
        with self._write() as db:
            db.execute("INSERT OR IGNORE INTO bindings VALUES (?, ?, ?)",
                       (exchange, routing_key, queue))

    def has_queue(self, name: str) -> bool:
        with self._lock:
            return self._db.execute("SELECT 1 FROM queues WHERE name = ?",
                                    (name,)).fetchone() is not None

    def size(self, queue: str) -> int:
        """Messages ready in `queue` (not leased, due)."""
        with self._lock:
            (count,) = self._db.execute(
                "SELECT count(*) FROM messages WHERE queue = ? AND owner IS NULL "
                "AND visible_at <= ?", (queue, time.time())).fetchone()
        return int(count)

    def delete_queue(self, name: str) -> None:
        """Delete a queue with its bindings and messages."""
        with self._write() as db:
            for table, column in (("messages", "queue"), ("bindings", "queue"),
                                  ("queues", "name")):
                db.execute(f"DELETE FROM {table} WHERE {column} = ?", (name,))  # noqa: S608

    def purge(self, queue: str) -> int:
        with self._write() as db:
            return int(db.execute("DELETE FROM messages WHERE queue = ? AND owner IS NULL",
                                  (queue,)).rowcount)

    def route(self, exchange: str, routing_key: str) -> list[str]:
        """The queues a message published to `exchange` with `routing_key` goes to."""
        with self._lock:
            return self._route(self._db, exchange, routing_key)

    def _route(self, db: sqlite3.Connection, exchange: str, routing_key: str) -> list[str]:
        if not exchange:  # the default exchange: the queue named by the routing key
            found = db.execute("SELECT name FROM queues WHERE name = ?", (routing_key,))
            return [row[0] for row in found]
        kind = db.execute("SELECT type FROM exchanges WHERE name = ?", (exchange,)).fetchone()
        if kind is None:
            return []
        bound = db.execute("SELECT DISTINCT routing_key, queue FROM bindings "
                           "WHERE exchange = ?", (exchange,)).fetchall()
        if kind[0] == "topic":
            return sorted({q for key, q in bound if topic_matches(key, routing_key)})
        return sorted({q for key, q in bound if key == routing_key})

    # -- messages ---------------------------------------------------------------------------
    def put(self, queues: Iterable[str], payload: dict[str, Any]) -> None:
        """Store one copy of `payload` in each queue (a TTL queue forwards it, delayed), in
        one transaction."""
        with self._write() as db:
            for queue in queues:
                self._put(db, queue, payload)
        signal_for(self.path).notify()

    def _put(self, db: sqlite3.Connection, queue: str, payload: dict[str, Any],
             delay: float = 0.0) -> None:
        arguments = self._arguments(db, queue)
        ttl = arguments.get("x-message-ttl")
        if ttl is not None and "x-dead-letter-exchange" in arguments and delay == 0.0:
            info = payload["properties"]["delivery_info"]
            key = arguments.get("x-dead-letter-routing-key", info.get("routing_key", ""))
            for target in self._route(db, arguments["x-dead-letter-exchange"], key):
                self._put(db, target, payload, delay=float(ttl) / 1000)
            return
        db.execute("INSERT INTO messages (queue, payload, visible_at) VALUES (?, ?, ?)",
                   (queue, json.dumps(payload), time.time() + delay))

    def _arguments(self, db: sqlite3.Connection, queue: str) -> dict[str, Any]:
        row = db.execute("SELECT arguments FROM queues WHERE name = ?", (queue,)).fetchone()
        return dict(json.loads(row[0])) if row else {}

    def lease(self, queue: str, tag: str) -> dict[str, Any] | None:
        """Lease the next ready message of `queue` to this process under `tag`; None when
        none is ready. A message returned more often than the queue's delivery limit is
        dead-lettered instead."""
        self._maybe_reclaim()
        with self._write() as db:
            limit = self._arguments(db, queue).get("x-delivery-limit")
            while True:
                row = db.execute(
                    "SELECT id, payload, returns FROM messages WHERE queue = ? AND owner IS "
                    "NULL AND visible_at <= ? ORDER BY visible_at, id LIMIT 1",
                    (queue, time.time())).fetchone()
                if row is None:
                    return None
                message_id, text, returns = row
                payload: dict[str, Any] = json.loads(text)
                if limit is not None and returns > int(limit):
                    self._dead_letter(db, message_id, queue, payload, "delivery_limit")
                    continue
                db.execute("UPDATE messages SET owner = ?, tag = ? WHERE id = ?",
                           (self.owner.name, tag, message_id))
                payload["headers"] = {**(payload.get("headers") or {}),
                                      "x-delivery-count": returns}
                return payload

    def ack(self, tag: str) -> None:
        with self._write() as db:
            db.execute("DELETE FROM messages WHERE tag = ?", (tag,))

    def give_back(self, tag: str) -> None:
        """Make a leased message ready again (a requeue, a channel closed before the ack)."""
        with self._write() as db:
            db.execute("UPDATE messages SET owner = NULL, tag = NULL, returns = returns + 1 "
                       "WHERE tag = ?", (tag,))
        signal_for(self.path).notify()

    def reject(self, tag: str) -> None:
        """Dead-letter a leased message (dropped when its queue has no dead-letter exchange)."""
        with self._write() as db:
            row = db.execute("SELECT id, queue, payload FROM messages WHERE tag = ?",
                             (tag,)).fetchone()
            if row is not None:
                self._dead_letter(db, row[0], row[1], json.loads(row[2]), "rejected")

    def _dead_letter(self, db: sqlite3.Connection, message_id: int, queue: str,
                     payload: dict[str, Any], reason: str) -> None:
        db.execute("DELETE FROM messages WHERE id = ?", (message_id,))
        arguments = self._arguments(db, queue)
        if "x-dead-letter-exchange" not in arguments:
            log.warning("%s: message dropped (%s), the queue has no dead-letter exchange",
                        queue, reason)
            return
        info = payload["properties"]["delivery_info"]
        exchange = arguments["x-dead-letter-exchange"]
        key = arguments.get("x-dead-letter-routing-key", info.get("routing_key", ""))
        headers = payload.setdefault("headers", {})
        headers.setdefault("x-first-death-reason", reason)
        headers.setdefault("x-first-death-queue", queue)
        info.update(exchange=exchange, routing_key=key)
        for target in self._route(db, exchange, key):
            self._put(db, target, payload)

    # -- leases of dead processes -------------------------------------------------------------
    def _maybe_reclaim(self) -> None:
        if time.monotonic() - self._reclaimed_at >= self._reclaim_seconds:
            self.reclaim()

    def reclaim(self) -> int:
        """Give back every lease whose owner process is dead; returns how many."""
        self._reclaimed_at = time.monotonic()
        with self._lock:
            holders = {row[0] for row in self._db.execute(
                "SELECT DISTINCT owner FROM messages WHERE owner IS NOT NULL")}
        dead = [name for name in holders | set(self.owner.others())
                if name != self.owner.name and self.owner.is_dead(name)]
        returned = 0
        for name in dead:
            with self._write() as db:
                returned += db.execute(
                    "UPDATE messages SET owner = NULL, tag = NULL, returns = returns + 1 "
                    "WHERE owner = ?", (name,)).rowcount
        if returned:
            log.warning("embedded broker: %d message(s) leased by a process that died are "
                        "ready again", returned)
            signal_for(self.path).notify()
        return returned
