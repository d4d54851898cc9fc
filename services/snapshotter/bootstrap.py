"""Wiring for the snapshotter service: its database, handlers, queue, job workers, the COW
watch and the reconciler."""

from __future__ import annotations

from services.snapshotter import SCHEMA
from services.snapshotter.drivers import StepHook
from services.snapshotter.handlers import HANDLERS
from services.snapshotter.jobs import SnapshotWork
from services.snapshotter.reconciler import reconcile, watch_cows
from services.snapshotter.tables import snapshot_jobs
from shared.addresses import host_pool
from shared.hosts import HostPool
from shared.jobs import JobWorker, Leases
from shared.periodic import Periodic
from shared.retry import RetryPolicy
from shared.runtime import Service, open_database, routing_keys
from shared.settings import Settings
from shared.topology import QueueSpec, queue_name

NAME = "snapshotter"


def bootstrap(settings: Settings, *, concurrency: int | None = None,
              hosts: HostPool | None = None, on_step: StepHook | None = None) -> Service:
    """The snapshotter on its database; `hosts` (the Xen hosts, else from the settings) are
    closed when it stops; `on_step` lets tests fail a create at a named step."""
    units = open_database(settings, SCHEMA)
    hosts = hosts if hosts is not None else host_pool(settings)
    work = SnapshotWork(settings, units, hosts, on_step=on_step)
    worker = JobWorker(
        Leases(units.engine, snapshot_jobs, settings.lease_seconds), work.run, units=units,
        policy=RetryPolicy.from_settings(settings), name=f"{NAME}-jobs", fail=work.fail,
        concurrency=concurrency or settings.concurrency, poll_seconds=settings.job_poll_seconds)
    return Service(
        NAME, settings, units, QueueSpec(queue_name(NAME), routing_keys(HANDLERS)), HANDLERS,
        workers=[worker],
        loops=[Periodic(f"{NAME}-cow-watch", settings.snapshot_watch_seconds,
                        lambda: watch_cows(work)),
               Periodic(f"{NAME}-reconciler", settings.reconcile_seconds,
                        lambda: reconcile(work))],
        on_closed=[hosts.close_all])
