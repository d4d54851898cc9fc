"""One row per claim of a transfer: who ran it, how it ended, what rsync --stats said.

Every write is guarded by the job's lease, in the same transaction: a worker that lost the
job records nothing.
"""

from __future__ import annotations

import time
from enum import StrEnum

from sqlalchemy import Connection, func, select, update

from services.transfer.rsync import RsyncError, RsyncFailedError
from services.transfer.tables import transfer_attempts, transfers
from shared.inbox_outbox import UnitOfWork
from shared.jobs import FAILED, Lease, Record


class Ending(StrEnum):
    """How an attempt ended (`transfer_attempts.outcome`)."""

    RUNNING = "running"  # not yet: the attempt is under way, or its worker died
    TRANSFERRED = "transferred"
    RETRY = "retry"
    SHA256_MISMATCH = "sha256_mismatch"
    FAILED = "failed"
    INTERRUPTED = "interrupted"
    ABANDONED = "abandoned"  # its worker died; the next claim says so


class Attempt:
    def __init__(self, lease: Lease, number: int, started_at: float) -> None:
        self.lease = lease
        self.number = number
        self.started_at = started_at
        self.stats: dict[str, int] = {}

    @classmethod
    def start(cls, lease: Lease) -> Attempt:
        """Record a new attempt; one a killed worker left running is marked abandoned.
        Raises LeaseLostError."""
        a, now = transfer_attempts, time.time()
        with lease.units.engine.begin() as connection:
            lease.update(connection)  # still ours? (and the job row first: see ledger)
            connection.execute(
                update(a).where(a.c.job_id == lease.job_id, a.c.outcome == Ending.RUNNING)
                .values(outcome=Ending.ABANDONED, finished_at=now))
            number = int(connection.execute(
                select(func.coalesce(func.max(a.c.attempt), 0))
                .where(a.c.job_id == lease.job_id)).scalar_one()) + 1
            connection.execute(a.insert().values(
                job_id=lease.job_id, attempt=number, owner=lease.owner, started_at=now,
                outcome=Ending.RUNNING))
        return cls(lease, number, now)

    def first_started(self) -> float:
        """When the first attempt at this job started."""
        a = transfer_attempts
        with self.lease.units.engine.connect() as connection:
            return float(connection.execute(
                select(func.min(a.c.started_at)).where(a.c.job_id == self.lease.job_id)
            ).scalar_one())

    def record(self, connection: Connection, outcome: Ending,
               error: BaseException | str | None = None) -> None:
        """Write how this attempt ended, in the caller's (lease-guarded) transaction."""
        a = transfer_attempts
        exit_code = None
        if isinstance(error, RsyncError | RsyncFailedError):
            exit_code = error.exited
        connection.execute(
            update(a).where(a.c.job_id == self.lease.job_id, a.c.attempt == self.number)
            .values(outcome=outcome, finished_at=time.time(), exit_code=exit_code,
                    bytes_sent=self.stats.get("bytes_sent"),
                    literal_bytes=self.stats.get("literal_bytes"),
                    error=None if error is None else str(error)[-4000:]))

    def ended(self, outcome: Ending, error: BaseException | str) -> Record:
        """The `record` of an outcome that did not transfer: written in the worker's
        transaction, after the job row. An attempt the worker turned into the job's failure
        (the last one allowed) is recorded `failed`, whatever it asked for."""

        def record(uow: UnitOfWork) -> None:
            state = uow.connection.execute(
                select(transfers.c.state).where(transfers.c.id == self.lease.job_id)).scalar_one()
            self.record(uow.connection, Ending.FAILED if state == FAILED else outcome, error)

        return record
