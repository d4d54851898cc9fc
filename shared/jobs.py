"""Leased jobs: long work (snapshots, archives, transfers) outside any held message.

A handler records a job row. Workers claim a job with a lease (`FOR UPDATE SKIP LOCKED` on
PostgreSQL; SQLite serialises writers), heartbeat while working, and a job whose lease
expired is taken over by another worker. Every write a worker makes is guarded by its
lease (`WHERE id = :id AND lease_owner = :me`), so a worker that lost its job writes nothing.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable, Mapping
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Column,
    ColumnElement,
    Connection,
    Engine,
    Float,
    Index,
    Integer,
    MetaData,
    Row,
    String,
    Table,
    Text,
    and_,
    or_,
    select,
    update,
)

from shared.errors import LeaseLostError, PermanentError

log = logging.getLogger(__name__)

PENDING, RUNNING, DONE, FAILED = "pending", "running", "done", "failed"


def job_table(name: str, metadata: MetaData, *extra: Column[Any]) -> Table:
    """A job table with the lease columns every worker relies on, plus `extra` columns."""
    return Table(
        name,
        metadata,
        Column("id", String(64), primary_key=True),
        Column("migration_id", String(64), nullable=False),
        Column("kind", String(32), nullable=False),
        Column("state", String(16), nullable=False, default=PENDING),
        Column("payload", JSON, nullable=False),
        Column("attempts", Integer, nullable=False, default=0),
        Column("lease_owner", String(128), nullable=True),
        Column("lease_expires_at", Float, nullable=True),
        Column("next_run_at", Float, nullable=False),
        Column("bytes_done", BigInteger, nullable=False, default=0),
        Column("bytes_total", BigInteger, nullable=True),
        Column("result", JSON, nullable=True),
        Column("error", Text, nullable=True),
        Column("created_at", Float, nullable=False),
        Column("updated_at", Float, nullable=False),
        *extra,
        Index(f"ix_{name}_claimable", "state", "next_run_at"),
    )


def worker_id() -> str:
    """host:pid:random — unique per worker thread, readable in the job row."""
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


class Leases:
    """Claim, heartbeat and finish jobs in one job table."""

    def __init__(self, engine: Engine, table: Table, lease_seconds: float) -> None:
        self.engine = engine
        self.table = table
        self.lease_seconds = lease_seconds

    def claim(self, owner: str, where: ColumnElement[bool] | None = None) -> Row[Any] | None:
        """Take the oldest runnable job (pending and due, or running with an expired lease)."""
        t, now = self.table, time.time()
        runnable = or_(
            and_(t.c.state == PENDING, t.c.next_run_at <= now),
            and_(t.c.state == RUNNING, t.c.lease_expires_at < now),
        )
        if where is not None:
            runnable = and_(runnable, where)
        candidate = (
            select(t.c.id).where(runnable).order_by(t.c.next_run_at, t.c.created_at).limit(1)
            .with_for_update(skip_locked=True).scalar_subquery()
        )
        statement = (
            update(t).where(t.c.id == candidate)
            .values(state=RUNNING, lease_owner=owner, lease_expires_at=now + self.lease_seconds,
                    attempts=t.c.attempts + 1, updated_at=now)
            .returning(*t.c)
        )
        with self.engine.begin() as connection:
            return connection.execute(statement).first()

    def _guarded(self, job_id: str, owner: str) -> ColumnElement[bool]:
        t = self.table
        return and_(t.c.id == job_id, t.c.lease_owner == owner, t.c.state == RUNNING)

    def heartbeat(self, job_id: str, owner: str, **values: Any) -> None:
        """Extend the lease and record progress columns. Raises LeaseLostError if it is gone."""
        now = time.time()
        with self.engine.begin() as connection:
            self.update(connection, job_id, owner,
                        lease_expires_at=now + self.lease_seconds, **values)

    def update(self, connection: Connection, job_id: str, owner: str, **values: Any) -> None:
        """Write the worker's own columns inside the caller's transaction, guarded by the lease.

        Raises LeaseLostError when another worker holds the job now.
        """
        values.setdefault("updated_at", time.time())
        result = connection.execute(
            update(self.table).where(self._guarded(job_id, owner)).values(**values)
        )
        if result.rowcount != 1:
            raise LeaseLostError(f"job {job_id}: lease lost by {owner}")

    def finish(self, connection: Connection, job_id: str, owner: str, *, state: str = DONE,
               **values: Any) -> None:
        """Mark the job done or failed in the caller's transaction. Raises LeaseLostError."""
        self.update(connection, job_id, owner, state=state, lease_owner=None,
                    lease_expires_at=None, **values)

    def retry_later(self, job_id: str, owner: str, delay: float, error: str) -> None:
        """Give the job back to be claimed again after `delay` seconds."""
        with self.engine.begin() as connection:
            self.update(connection, job_id, owner, state=PENDING, lease_owner=None,
                        lease_expires_at=None, next_run_at=time.time() + delay,
                        error=error[-4000:])


class Lease:
    """What a job function gets: its job row, and a heartbeat that may raise LeaseLostError."""

    def __init__(self, leases: Leases, job: Row[Any], owner: str) -> None:
        self.leases = leases
        self.job = job
        self.owner = owner
        self.lost = threading.Event()
        self._progress: dict[str, Any] = {}
        self._lock = threading.Lock()

    @property
    def job_id(self) -> str:
        return str(self.job.id)

    def progress(self, **values: Any) -> None:
        """Record progress columns; the heartbeat thread writes them with the next beat."""
        with self._lock:
            self._progress.update(values)

    def beat(self) -> None:
        with self._lock:
            values = dict(self._progress)
        try:
            self.leases.heartbeat(self.job_id, self.owner, **values)
        except LeaseLostError:
            self.lost.set()
            raise

    def check(self) -> None:
        """Raise LeaseLostError when the heartbeat found the job taken over."""
        if self.lost.is_set():
            raise LeaseLostError(f"job {self.job_id}: lease lost by {self.owner}")


JobFunction = Callable[[Lease], None]


class JobWorker:
    """`concurrency` threads that claim jobs from one table and run `work` on them.

    `work` finishes the job itself (in the transaction that also adds its outbox events).
    TransientError and unexpected errors give the job back with a growing delay; after
    `max_attempts`, or on PermanentError, `fail` is called to record the failure.
    """

    def __init__(self, leases: Leases, work: JobFunction, *,
                 fail: Callable[[Lease, BaseException], None],
                 name: str, concurrency: int = 1, poll_seconds: float = 1.0,
                 max_attempts: int = 5, retry_delays: tuple[float, ...] = (1.0, 5.0, 30.0),
                 where: Callable[[], ColumnElement[bool] | None] | None = None) -> None:
        self.leases = leases
        self.work = work
        self.fail = fail
        self.name = name
        self.concurrency = concurrency
        self.poll_seconds = poll_seconds
        self.max_attempts = max_attempts
        self.retry_delays = retry_delays
        self.where = where
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._threads: list[threading.Thread] = []

    def wake(self) -> None:
        self._wake.set()

    def run_one(self, owner: str) -> bool:
        """Claim and run one job; False when there was none."""
        job = self.leases.claim(owner, self.where() if self.where else None)
        if job is None:
            return False
        lease = Lease(self.leases, job, owner)
        beating = threading.Event()
        beat_every = max(0.2, self.leases.lease_seconds / 3)

        def heartbeat() -> None:
            while not beating.wait(beat_every):
                try:
                    lease.beat()
                except LeaseLostError:
                    return
                except Exception as error:  # noqa: BLE001 - database hiccup: try next beat
                    log.warning("%s: heartbeat for %s failed: %s", self.name, job.id, error)

        beater = threading.Thread(target=heartbeat, name=f"{self.name}-beat", daemon=True)
        beater.start()
        try:
            self.work(lease)
        except LeaseLostError as error:
            log.warning("%s: %s", self.name, error)
        except PermanentError as error:
            self._fail(lease, error)
        except Exception as error:  # noqa: BLE001 - transient or a bug: try again later
            if job.attempts >= self.max_attempts:
                self._fail(lease, error)
            else:
                delay = self.retry_delays[min(job.attempts - 1, len(self.retry_delays) - 1)]
                log.warning("%s: job %s attempt %d failed, again in %.1fs: %s", self.name,
                            job.id, job.attempts, delay, error)
                try:
                    self.leases.retry_later(lease.job_id, owner, delay, str(error))
                except LeaseLostError:
                    pass
        finally:
            beating.set()
            beater.join(timeout=5)
        return True

    def _fail(self, lease: Lease, error: BaseException) -> None:
        log.error("%s: job %s failed: %s", self.name, lease.job_id, error)
        try:
            self.fail(lease, error)
        except LeaseLostError:
            pass

    def _loop(self) -> None:
        owner = worker_id()
        while not self._stop.is_set():
            try:
                if self.run_one(owner):
                    continue
            except Exception as error:  # noqa: BLE001 - database down: keep trying
                log.warning("%s: claiming a job failed: %s", self.name, error)
            self._wake.wait(self.poll_seconds)
            self._wake.clear()

    def start(self) -> None:
        for index in range(self.concurrency):
            thread = threading.Thread(target=self._loop, name=f"{self.name}-{index}", daemon=True)
            thread.start()
            self._threads.append(thread)

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        for thread in self._threads:
            thread.join(timeout=10)


def new_job_values(job_id: str, migration_id: str, kind: str, payload: Mapping[str, Any],
                   **extra: Any) -> dict[str, Any]:
    """Column values for a new pending job, due now."""
    now = time.time()
    return {"id": job_id, "migration_id": migration_id, "kind": kind, "state": PENDING,
            "payload": dict(payload), "attempts": 0, "next_run_at": now, "bytes_done": 0,
            "created_at": now, "updated_at": now, **extra}
