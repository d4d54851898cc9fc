"""The outbox relay: publishes committed outbox rows with publisher confirms, in order.

A row is marked published only after the broker confirmed it, so a crash at any point
republishes at most a few rows on restart; consumers' inboxes make that harmless. A row the
broker returns (published `mandatory`, no queue bound for it yet) stays unpublished and is
tried again, loudly logged, until its consumer's queue exists.
"""

from __future__ import annotations

import logging
import threading
import time

from kombu import Queue
from sqlalchemy import Engine, select, update

from shared import metrics
from shared.bus import Publisher, PublishRefusedError, UnroutableError
from shared.db import is_postgres
from shared.failpoints import failpoint
from shared.inbox_outbox import outbox_table
from shared.topology import dead_queue, standing_queues_for, work_queue

log = logging.getLogger(__name__)


class OutboxRelay:
    def __init__(self, engine: Engine, broker_url: str, *, poll_seconds: float = 0.5,
                 batch: int = 200, name: str = "relay", delivery_limit: int = 10) -> None:
        self._engine = engine
        self._broker_url = broker_url
        self._poll = poll_seconds
        self._batch = batch
        self._name = name
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.published = 0
        self._delivery_limit = delivery_limit
        self._standing: set[str] = set()
        self._held: dict[int, tuple[float, float]] = {}  # seq -> (next try, last wait)

    def wake(self) -> None:
        """Publish soon: called after a transaction that added outbox rows committed."""
        self._wake.set()

    def publish_pending(self, publisher: Publisher) -> int:
        """Publish one batch of unpublished rows; returns how many. Raises on broker errors."""
        t = outbox_table
        now = time.monotonic()
        waiting = [seq for seq, (until, _) in self._held.items() if until > now]
        query = (
            select(t.c.seq, t.c.routing_key, t.c.body)
            .where(t.c.published_at.is_(None), t.c.seq.not_in(waiting))
            .order_by(t.c.seq)
            .limit(self._batch)
        )
        if is_postgres(self._engine):
            # Several processes of one service may share the database: each row once.
            query = query.with_for_update(skip_locked=True)
        with self._engine.begin() as connection:
            rows = connection.execute(query).all()
            if rows:
                failpoint("relay.before_publish", scope=self._name)
            sent = []
            for row in rows:
                declare = self._standing_queues(row.routing_key)
                try:
                    publisher.publish(row.body.encode(), routing_key=row.routing_key,
                                      declare=declare)
                except (UnroutableError, PublishRefusedError) as error:
                    self._standing.update(queue.name for queue in declare)  # declare ran
                    self._hold(row.seq, row.routing_key, error, now)
                    continue
                # declared: not again. A lost connection before (raised above) leaves them
                # to declare with the row's next try.
                self._standing.update(queue.name for queue in declare)
                self._held.pop(row.seq, None)
                sent.append(row.seq)
            if sent:
                # published: republished after a restart
                failpoint("relay.after_publish", scope=self._name)
                connection.execute(
                    update(t).where(t.c.seq.in_(sent)).values(published_at=time.time()))
        self.published += len(sent)
        metrics.outbox_published.labels(self._name).inc(len(sent))
        return len(sent)

    def _hold(self, seq: int, routing_key: str, error: Exception, now: float) -> None:
        """Keep a returned (or refused) row unpublished, and try it again later, less often
        each time (1 s, doubling to 30 s): its consumer's queue is declared when that service
        starts; a refusal waits for an operator to fix the broker user's permissions."""
        _, wait = self._held.get(seq, (0.0, 0.5))
        wait = min(30.0, wait * 2)
        self._held[seq] = (now + wait, wait)
        refused = isinstance(error, PublishRefusedError)  # a permission, not a late queue
        log.log(logging.ERROR if refused else logging.WARNING,
                "%s: outbox row %d (%s) was %s by the broker, kept to publish again in %.0fs: "
                "%s", self._name, seq, routing_key, "refused" if refused else "returned", wait,
                error)

    def _standing_queues(self, routing_key: str) -> list[Queue]:
        # An event for a datacenter whose workers never started would match no queue and be
        # dropped by the exchange: declare that datacenter's queues first (once per process,
        # marked by publish_pending once a publish declaring them went through).
        specs = [s for s in standing_queues_for(routing_key) if s.name not in self._standing]
        return [queue for spec in specs
                for queue in (work_queue(spec, self._delivery_limit), dead_queue(spec.name))]

    def run(self) -> None:
        publisher: Publisher | None = None
        while not self._stop.is_set():
            try:
                if publisher is None:
                    publisher = Publisher(self._broker_url)
                while self.publish_pending(publisher) and not self._stop.is_set():
                    pass
            except Exception as error:  # noqa: BLE001 - keep relaying; rows stay unpublished
                log.warning("%s: outbox relay failed, will retry: %s", self._name, error)
                if publisher is not None:
                    publisher.close()
                publisher = None
                self._stop.wait(min(5.0, self._poll * 4))
                continue
            self._wake.wait(self._poll)
            self._wake.clear()
        if publisher is not None:
            publisher.close()

    def start(self) -> None:
        self._thread = threading.Thread(target=self.run, name=f"{self._name}-relay", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
