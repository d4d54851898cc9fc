"""Wiring for an archiver worker: one datacenter's queue, its database, its handlers, and the
job worker threads that make that datacenter's archives (and only that datacenter's)."""

from __future__ import annotations

import logging

from services.archiver import SCHEMA
from services.archiver.handlers import HANDLERS, ON_FAILURE
from services.archiver.jobs import Archiver
from services.archiver.snapshots import reconcile_mounts, run_dir
from services.archiver.staging import collect
from services.archiver.tables import archive_jobs
from shared import metrics
from shared.addresses import host_pool
from shared.hosts import HostPool
from shared.jobs import Done, JobWorker, Lease, Leases
from shared.periodic import Periodic
from shared.retry import RetryPolicy
from shared.runtime import Service, open_database, routing_keys
from shared.settings import Settings
from shared.topology import QueueSpec, queue_name

log = logging.getLogger(__name__)
NAME = "archiver"


def count_archive(lease: Lease, done: Done) -> None:
    """A sealed archive's metrics (the job worker calls it after the commit)."""
    values = done.values
    metrics.observe_archive(
        NAME, str(lease.job.datacenter), str(lease.job.kind),
        compressed_bytes=int(values.get("compressed_bytes") or 0),
        raw_bytes=int(values.get("raw_bytes") or 0),
        seconds=float(values.get("finished_at", 0.0)) - float(values.get("started_at", 0.0)))


def bootstrap(settings: Settings, *, datacenter: str | None = None,
              concurrency: int | None = None, hosts: HostPool | None = None) -> Service:
    """Raises ValueError when no datacenter is given (here or as FERRY_DATACENTER).
    `hosts`: where sources are read (default: `local` here, anything else over SSH)."""
    dc = datacenter or settings.datacenter
    name = queue_name(NAME, dc)  # raises without a datacenter
    assert dc is not None  # noqa: S101 (queue_name checked it)
    units = open_database(settings, SCHEMA)
    archiver = Archiver(settings, units.engine, dc, hosts or host_pool(settings))
    worker = JobWorker(
        Leases(units.engine, archive_jobs, settings.lease_seconds), archiver.run, units=units,
        policy=RetryPolicy.from_settings(settings), name=f"archiver-{dc}", fail=archiver.fail,
        concurrency=concurrency or settings.concurrency, poll_seconds=settings.job_poll_seconds,
        where=lambda: archive_jobs.c.datacenter == dc, on_done=count_archive)

    def sweep() -> None:
        archiver.sweep_partials()  # what a worker killed here left, its job since finished
        try:  # ... and the snapshots it left mounted, once before start() returns
            reconcile_mounts(run_dir(settings))
        except Exception as error:  # noqa: BLE001 - the periodic pass tries again
            log.warning("archiver: undoing dead workers' mounts failed: %s", error)

    mounts = Periodic("archiver-nbd-reconcile", settings.reconcile_seconds,  # then every so often
                      lambda: reconcile_mounts(run_dir(settings)))
    loops = [mounts]
    if settings.staging_gc_seconds:  # staging files transferred, verified, past their age
        loops.append(Periodic("archiver-staging-gc", settings.staging_gc_seconds,
                              lambda: collect(units.engine, settings, datacenter=dc)))
    return Service(NAME, settings, units, QueueSpec(name, routing_keys(HANDLERS, dc)), HANDLERS,
                   deps=settings, on_failure=ON_FAILURE, workers=[worker], loops=loops,
                   on_start=[sweep])
