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
import traceback
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
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

from shared import logs, metrics
from shared.errors import LeaseLostError, PermanentError, ServiceStoppingError
from shared.failpoints import failpoint
from shared.inbox_outbox import UnitOfWork, Units
from shared.retry import RetryPolicy

log = logging.getLogger(__name__)

PENDING, RUNNING, DONE, FAILED = "pending", "running", "done", "failed"
_RETRIED, _WAITING = "retried", "waiting"  # given back, after a failed attempt / without one


def _datacenter(job: Row[Any]) -> str | None:
    """The job's datacenter: its column, else its payload's (None where it has neither)."""
    value = job._mapping.get("datacenter")
    if value is None and isinstance(job.payload, Mapping):
        value = job.payload.get("datacenter")
    return None if value is None else str(value)


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


class Lease:
    """What a job function gets: its job row, a heartbeat that may raise LeaseLostError, and
    units of work on the service's database (for what a job records while it runs)."""

    def __init__(self, leases: Leases, job: Row[Any], owner: str, units: Units) -> None:
        self.leases = leases
        self.job = job
        self.owner = owner
        self.units = units
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

    def update(self, connection: Connection, **values: Any) -> None:
        """Write the job's own columns in the caller's transaction, guarded by this lease.
        Raises LeaseLostError."""
        self.leases.update(connection, self.job_id, self.owner, **values)

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


# -- outcomes: what one attempt at a job says happened; the worker applies them -------------

Record = Callable[[UnitOfWork], None]


@dataclass(frozen=True)
class Done:
    """The job is finished: the worker writes `state`, `result` and `values` to its row, runs
    `record` (the events and rows that go with it) and commits, all in one transaction."""

    result: Any = None
    state: str = DONE
    values: Mapping[str, Any] = field(default_factory=dict)
    record: Record | None = None


@dataclass(frozen=True)
class RetryIn:
    """Give the job back, to be claimed again in `seconds` (None: the policy's backoff).

    `counts_as_attempt=False` for waits that are no failed try (a full host, a restart);
    `restart=True` starts its count of attempts afresh (new input arrived). An attempt that
    counts and was the last one fails the job instead, `record` still runs."""

    seconds: float | None
    reason: str
    counts_as_attempt: bool = True
    restart: bool = False
    values: Mapping[str, Any] = field(default_factory=dict)
    record: Record | None = None
    error: BaseException | None = None  # what was raised: the job fails with it if last


@dataclass(frozen=True)
class Failed:
    """The job failed for good: the worker calls the service's failure hook, writes state
    `failed`, the error and `values`, runs `record`, and commits."""

    error: BaseException | str
    values: Mapping[str, Any] = field(default_factory=dict)
    record: Record | None = None


Outcome = Done | RetryIn | Failed
JobFunction = Callable[[Lease], Outcome]
# Called in the failing transaction; may add events and return a Failed carrying more
# columns, or a RetryIn when the failure turns out to be worth another run after all.
FailureHook = Callable[[Lease, BaseException, UnitOfWork], "Failed | RetryIn | None"]


def outcome_of(error: BaseException) -> Outcome:
    """What a raised error means for a job: the one mapping of errors to outcomes."""
    if isinstance(error, ServiceStoppingError):
        return RetryIn(0.0, str(error), counts_as_attempt=False)
    if isinstance(error, PermanentError):
        return Failed(error)
    return RetryIn(None, "".join(traceback.format_exception_only(error)).strip(), error=error)


class JobWorker:
    """`concurrency` threads that claim jobs from one table, run `work` on each and apply
    the outcome it returns (or the error it raises) under the one retry policy."""

    def __init__(self, leases: Leases, work: JobFunction, *, units: Units,
                 policy: RetryPolicy, name: str, fail: FailureHook | None = None,
                 concurrency: int = 1, poll_seconds: float = 1.0,
                 where: Callable[[], ColumnElement[bool] | None] | None = None,
                 on_stop: Callable[[], None] | None = None,
                 on_done: Callable[[Lease, Done], None] | None = None) -> None:
        self.leases = leases
        self.work = work
        self.units = units
        self.policy = policy
        self.fail = fail
        self.name = name
        self.concurrency = concurrency
        self.poll_seconds = poll_seconds
        self.where = where
        self.on_stop = on_stop
        self.on_done = on_done  # after a Done committed: the service's metrics
        self.service: str | None = None  # the service running it (set by runtime.Service)
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
        # claimed and nothing done: taken over when it expires
        failpoint("jobs.after_claim", scope=self.service)
        with logs.context(job_id=str(job.id), migration_id=str(job.migration_id),
                          datacenter=_datacenter(job)):
            self._run(Lease(self.leases, job, owner, self.units))
        return True

    def _run(self, lease: Lease) -> None:
        job = lease.job
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
            try:
                outcome = self.work(lease)
            except LeaseLostError as error:
                log.warning("%s: %s", self.name, error)
                return
            except Exception as error:  # noqa: BLE001 - the outcome decides what it means
                outcome = outcome_of(error)
            self.settle(lease, outcome)
        finally:
            beating.set()
            beater.join(timeout=5)

    def settle(self, lease: Lease, outcome: Outcome) -> None:
        """Apply an outcome to the leased job in one transaction. A lease lost meanwhile
        writes nothing (the job's new owner decides)."""
        attempts = int(lease.job.attempts)
        if (isinstance(outcome, RetryIn) and outcome.counts_as_attempt
                and not outcome.restart and self.policy.exhausted(attempts)):
            log.warning("%s: job %s: gave up after %d attempts", self.name, lease.job_id,
                        attempts)
            outcome = Failed(outcome.error or PermanentError(
                f"gave up after {attempts} attempts; the last: {outcome.reason}"),
                record=outcome.record)
        try:
            with self.units() as uow:
                applied = self._apply(lease, outcome, uow)
                uow.commit()
        except LeaseLostError as error:
            log.warning("%s: %s", self.name, error)
            return
        self._count(lease, outcome, applied)

    def _count(self, lease: Lease, outcome: Outcome, applied: str) -> None:
        """The metrics of a committed outcome (`applied`: what _apply wrote)."""
        labels = (self.service or self.name, _datacenter(lease.job) or "", str(lease.job.kind))
        if applied == FAILED:
            metrics.job_failures.labels(*labels).inc()
        elif applied == _RETRIED:
            metrics.job_retries.labels(*labels).inc()
        elif isinstance(outcome, Done) and self.on_done is not None:
            try:
                self.on_done(lease, outcome)
            except Exception as error:  # noqa: BLE001 - committed: a metric must not undo it
                log.warning("%s: job %s: its metrics failed: %s", self.name, lease.job_id,
                            error)

    def _apply(self, lease: Lease, outcome: Outcome, uow: UnitOfWork) -> str:
        """Write the outcome; returns the state written, or _RETRIED / _WAITING for a job
        given back after a failed attempt / without one."""
        connection = uow.connection
        if isinstance(outcome, Failed):
            error = outcome.error if isinstance(outcome.error, BaseException) else (
                PermanentError(outcome.error))
            log.error("%s: job %s failed: %s", self.name, lease.job_id, error)
            turned = self.fail(lease, error, uow) if self.fail is not None else None
            if isinstance(turned, RetryIn):
                return self._give_back(lease, turned, uow)
            values = {**outcome.values, **(turned.values if turned is not None else {})}
            self.leases.finish(connection, lease.job_id, lease.owner, state=FAILED,
                               error=str(error)[-4000:], **values)
            for record in (outcome.record, turned.record if turned is not None else None):
                if record is not None:
                    record(uow)
            return FAILED
        if isinstance(outcome, RetryIn):
            return self._give_back(lease, outcome, uow)
        values = dict(outcome.values)
        if outcome.result is not None:
            values["result"] = outcome.result
        self.leases.finish(connection, lease.job_id, lease.owner, state=outcome.state, **values)
        if outcome.record is not None:
            outcome.record(uow)
        return outcome.state

    def _give_back(self, lease: Lease, retry: RetryIn, uow: UnitOfWork) -> str:
        attempts = int(lease.job.attempts)
        if retry.restart:
            attempts = 0
        elif not retry.counts_as_attempt:
            attempts -= 1  # this claim counted one: it was no try
        delay = self.policy.delay(attempts) if retry.seconds is None else retry.seconds
        if retry.counts_as_attempt and not retry.restart:
            log.warning("%s: job %s attempt %d failed, again in %.1fs: %s", self.name,
                        lease.job_id, attempts, delay, retry.reason)
        self.leases.update(uow.connection, lease.job_id, lease.owner, state=PENDING,
                           lease_owner=None, lease_expires_at=None,
                           next_run_at=time.time() + delay, error=retry.reason[-4000:],
                           attempts=attempts, **retry.values)
        if retry.record is not None:
            retry.record(uow)
        return _RETRIED if retry.counts_as_attempt and not retry.restart else _WAITING

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
        if self.on_stop is not None:
            self.on_stop()  # say "stopping" to running work, so it gives its job back
        for thread in self._threads:
            thread.join(timeout=10)


def rearm_values(**values: Any) -> dict[str, Any]:
    """Column values that make a finished or failed job run again, its attempts counted
    afresh (new input arrived: a new request, a new snapshot, an operator's retry). For a
    handler's or command's own UPDATE of a job that no worker holds."""
    now = time.time()
    return {"state": PENDING, "attempts": 0, "next_run_at": now, "lease_owner": None,
            "lease_expires_at": None, "updated_at": now, **values}


def new_job_values(job_id: str, migration_id: str, kind: str, payload: Mapping[str, Any],
                   **extra: Any) -> dict[str, Any]:
    """Column values for a new pending job, due now."""
    now = time.time()
    return {"id": job_id, "migration_id": migration_id, "kind": kind, "state": PENDING,
            "payload": dict(payload), "attempts": 0, "next_run_at": now, "bytes_done": 0,
            "created_at": now, "updated_at": now, **extra}
