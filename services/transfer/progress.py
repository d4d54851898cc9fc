"""Transfer progress: into the job row with each heartbeat, and as archive.progress events
no more often than every `every` seconds (a status view needs no more, the outbox no more)."""

from __future__ import annotations

import logging
import time

from services.transfer.ledger import requests_of
from services.transfer.rsync import Progress
from shared.contracts import ArchiveProgress
from shared.errors import LeaseLostError
from shared.jobs import Lease

log = logging.getLogger(__name__)


class ProgressReporter:
    def __init__(self, lease: Lease, every: float) -> None:
        self._lease = lease
        self._every = every
        self._last_event = time.monotonic()

    def update(self, progress: Progress) -> None:
        """Take one rsync progress line. Raises LeaseLostError once the job is another
        worker's (so rsync is stopped)."""
        self._lease.check()
        values = {"bytes_done": progress.bytes_done, "mb_per_s": round(progress.mb_per_s, 3),
                  "eta_seconds": progress.eta_s}
        self._lease.progress(**values)
        now = time.monotonic()
        if now - self._last_event < self._every:
            return
        self._last_event = now
        try:
            self._announce(progress, values)
        except LeaseLostError:
            raise
        except Exception as error:  # noqa: BLE001 - a missed progress event must not stop rsync
            log.warning("transfer %s: progress not recorded: %s", self._lease.job_id, error)

    def _announce(self, progress: Progress, values: dict[str, float | int | None]) -> None:
        job = self._lease.job
        with self._lease.units() as uow:  # the job's own progress, in its own transaction
            self._lease.update(uow.connection, **values)
            for request in requests_of(uow.connection, job.id):
                uow.outbox.add(ArchiveProgress(
                    datacenter=job.payload["datacenter"], request_id=request.request_id,
                    stage="transfer", bytes_done=progress.bytes_done,
                    bytes_total=job.bytes_total, mb_per_s=round(progress.mb_per_s, 3),
                    eta_s=progress.eta_s), migration_id=job.migration_id)
            uow.commit()
