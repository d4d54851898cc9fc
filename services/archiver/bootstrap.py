"""Wiring for an archiver worker: one datacenter's queue, its database, its handlers, and the
job worker threads that make that datacenter's archives (and only that datacenter's)."""

from __future__ import annotations

import logging
from typing import Any

from services.archiver.handlers import HANDLERS, fail_request
from services.archiver.jobs import Archiver
from services.archiver.snapshots import reconcile_mounts, run_dir
from services.archiver.tables import archive_jobs
from shared.addresses import host_pool
from shared.envelope import Envelope
from shared.jobs import JobWorker, Leases
from shared.periodic import Periodic
from shared.runtime import Service, open_database, routing_keys
from shared.settings import Settings
from shared.topology import QueueSpec, queue_name

log = logging.getLogger(__name__)
NAME = "archiver"


def bootstrap(settings: Settings, *, datacenter: str | None = None,
              concurrency: int | None = None) -> Service:
    """Raises ValueError when no datacenter is given (here or as FERRY_DATACENTER)."""
    dc = datacenter or settings.datacenter
    name = queue_name(NAME, dc)  # raises without a datacenter
    assert dc is not None  # noqa: S101 (queue_name checked it)
    engine = open_database(settings, NAME)
    archiver = Archiver(settings, engine, dc, host_pool(settings))
    worker = JobWorker(
        Leases(engine, archive_jobs, settings.lease_seconds), archiver.run, fail=archiver.fail,
        name=f"archiver-{dc}", concurrency=concurrency or settings.concurrency,
        poll_seconds=settings.job_poll_seconds, max_attempts=settings.max_attempts,
        retry_delays=settings.retry_delays,
        where=lambda: archive_jobs.c.datacenter == dc)
    service: Service

    def on_failure(event: Any, envelope: Envelope, error: BaseException) -> None:
        fail_request(event, envelope, error, uow=service.uow())

    service = Service(NAME, settings, engine, QueueSpec(name, routing_keys(HANDLERS, dc)),
                      HANDLERS, on_failure=on_failure, workers=[worker])
    archiver.on_commit = service.wake

    def sweep() -> None:
        archiver.sweep_partials()  # what a worker killed here left, its job since finished
        try:  # ... and the snapshots it left mounted, once before start() returns
            reconcile_mounts(run_dir(settings))
        except Exception as error:  # noqa: BLE001 - the periodic pass tries again
            log.warning("archiver: undoing dead workers' mounts failed: %s", error)

    service.on_start.append(sweep)
    # then every reconcile_seconds
    mounts = Periodic("archiver-nbd-reconcile", settings.reconcile_seconds,
                      lambda: reconcile_mounts(run_dir(settings)))
    service.on_start.append(mounts.start)
    service.on_stop.append(mounts.stop)
    return service
