"""One row per claim of a transfer: who ran it, how it ended, what rsync --stats said.

Every write is guarded by the job's lease, in the same transaction: a worker that lost the
job records nothing.
"""

from __future__ import annotations

import time
from typing import Any

from sqlalchemy import Connection, Engine, func, select, update

from services.transfer.rsync import RsyncError, RsyncFailedError
from services.transfer.tables import transfer_attempts
from shared.jobs import PENDING, Lease, Leases

RUNNING_OUTCOME = "running"


class Attempt:
    def __init__(self, engine: Engine, leases: Leases, lease: Lease, number: int,
                 started_at: float) -> None:
        self.engine = engine
        self.leases = leases
        self.lease = lease
        self.number = number
        self.started_at = started_at
        self.stats: dict[str, int] = {}

    @classmethod
    def start(cls, engine: Engine, leases: Leases, lease: Lease) -> Attempt:
        """Record a new attempt; one a killed worker left running is marked abandoned.
        Raises LeaseLostError."""
        a, now = transfer_attempts, time.time()
        with engine.begin() as connection:
            leases.update(connection, lease.job_id, lease.owner)  # still ours?
            connection.execute(
                update(a).where(a.c.job_id == lease.job_id, a.c.outcome == RUNNING_OUTCOME)
                .values(outcome="abandoned", finished_at=now))
            number = int(connection.execute(
                select(func.coalesce(func.max(a.c.attempt), 0))
                .where(a.c.job_id == lease.job_id)).scalar_one()) + 1
            connection.execute(a.insert().values(
                job_id=lease.job_id, attempt=number, owner=lease.owner, started_at=now,
                outcome=RUNNING_OUTCOME))
        return cls(engine, leases, lease, number, now)

    def first_started(self) -> float:
        """When the first attempt at this job started."""
        a = transfer_attempts
        with self.engine.connect() as connection:
            return float(connection.execute(
                select(func.min(a.c.started_at)).where(a.c.job_id == self.lease.job_id)
            ).scalar_one())

    def record(self, connection: Connection, outcome: str,
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

    def end(self, outcome: str, error: BaseException | str | None = None) -> None:
        """Record the end while still holding the lease. Raises LeaseLostError."""
        with self.engine.begin() as connection:
            self.leases.update(connection, self.lease.job_id, self.lease.owner)
            self.record(connection, outcome, error)

    def give_back(self, delay: float, error: BaseException | str, outcome: str,
                  **job_values: Any) -> None:
        """The job becomes claimable again after `delay` seconds; this attempt ends with
        `outcome`. Raises LeaseLostError."""
        with self.engine.begin() as connection:
            self.leases.update(connection, self.lease.job_id, self.lease.owner, state=PENDING,
                               lease_owner=None, lease_expires_at=None,
                               next_run_at=time.time() + delay, error=str(error)[-4000:],
                               **job_values)
            self.record(connection, outcome, error)
