"""Wiring for the snapshotter service: its database, handlers, queue, job workers, the COW
watch and the reconciler."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from services.snapshotter.drivers import StepHook
from services.snapshotter.handlers import HANDLERS
from services.snapshotter.jobs import SnapshotWork
from services.snapshotter.reconciler import reconcile, watch_cows
from services.snapshotter.tables import snapshot_jobs
from shared.addresses import host_pool
from shared.hosts import HostPool
from shared.jobs import JobWorker, Leases
from shared.periodic import Periodic
from shared.runtime import Service, open_database, routing_keys
from shared.settings import Settings
from shared.topology import QueueSpec, queue_name

NAME = "snapshotter"


@dataclass
class SnapshotterService(Service):
    """A Service that also runs the COW watch and the reconciler while it runs."""

    work: SnapshotWork | None = None
    loops: list[Periodic] = field(default_factory=list)

    def start(self) -> None:
        super().start()
        for loop in self.loops:
            loop.start()

    def stop(self) -> None:
        for loop in self.loops:
            loop.stop()
        super().stop()
        if self.work is not None:
            self.work.hosts.close_all()


def bootstrap(settings: Settings, *, concurrency: int | None = None,
              hosts: HostPool | None = None, on_step: StepHook | None = None,
              **_: Any) -> SnapshotterService:
    engine = open_database(settings, NAME)
    service = SnapshotterService(NAME, settings, engine,
                                 QueueSpec(queue_name(NAME), routing_keys(HANDLERS)), HANDLERS)
    work = SnapshotWork(settings, engine, hosts or host_pool(settings), wake=service.wake,
                        on_step=on_step)
    service.work = work
    service.workers.append(JobWorker(
        Leases(engine, snapshot_jobs, settings.lease_seconds), work.run, fail=work.fail,
        name=f"{NAME}-jobs", concurrency=concurrency or settings.concurrency,
        poll_seconds=settings.job_poll_seconds, max_attempts=settings.max_attempts,
        retry_delays=settings.retry_delays))
    service.loops = [
        Periodic(f"{NAME}-cow-watch", settings.snapshot_watch_seconds, lambda: watch_cows(work)),
        Periodic(f"{NAME}-reconciler", settings.reconcile_seconds, lambda: reconcile(work)),
    ]
    return service
