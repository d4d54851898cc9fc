"""Leased snapshot work on the Xen hosts: create and export, release, retry with a larger COW.

A claimed job in phase waiting/creating is created: it first takes a slot on its host (at
most `snapshots_per_host` admitted jobs per host, decided under a row lock on the host), then
the driver snapshots the origin, nbd-server exports it and, in the transaction that makes
the job `active`, snapshot.ready goes to the outbox. Each claim makes a new snapshot id
(`ferry-<job id>-<claim number>`), so a worker that took over a dead one's job first removes
the earlier claim's leftovers and never collides with them.
A job in phase releasing/invalid is torn down; `invalid` (its COW filled up) is then
re-armed with a COW twice as large, up to `snapshot_cow_attempts` times.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable
from typing import Any

from sqlalchemy import Engine, func, select

from services.snapshotter import exports
from services.snapshotter.devicemapper import SNAPSHOT_ID
from services.snapshotter.drivers import Driver, SnapshotSpec, StepHook, driver_for
from services.snapshotter.handlers import ACTIVE, AFTER_FAILURE
from services.snapshotter.tables import snapshot_hosts, snapshot_jobs
from shared.contracts import SnapshotFailed, SnapshotReady, SnapshotReleased, SnapshotRequested
from shared.db import insert_ignoring_conflicts
from shared.errors import FerryError, LeaseLostError
from shared.hosts import Host, HostPool
from shared.inbox_outbox import UnitOfWork
from shared.jobs import DONE, FAILED, PENDING, Lease
from shared.settings import Settings

log = logging.getLogger(__name__)
RELEASE_RETRY_SECONDS = 30.0


class SnapshotWork:
    """The JobWorker's `work` and `fail` for snapshot jobs."""

    def __init__(self, settings: Settings, engine: Engine, hosts: HostPool,
                 wake: Callable[[], None] = lambda: None, on_step: StepHook | None = None) -> None:
        self.settings = settings
        self.engine = engine
        self.hosts = hosts
        self.wake = wake
        self.on_step = on_step  # tests inject faults at a named step of a create

    def driver(self, name: str) -> Driver:
        return driver_for(name, self.settings.snapshot_cow_vg, self.settings.snapshot_cow_dir)

    def run(self, lease: Lease) -> None:
        if lease.job.phase in ("releasing", "invalid"):
            self._release(lease)
        else:
            self._create(lease)

    # -- create -----------------------------------------------------------------------------

    def _admit(self, lease: Lease) -> tuple[bool, int]:
        """Take a slot on the job's host; (admitted, slots in use by others)."""
        job, t = lease.job, snapshot_jobs
        with self.engine.begin() as connection:
            insert_ignoring_conflicts(connection, snapshot_hosts, {"xen_host": job.xen_host})
            connection.execute(select(snapshot_hosts).where(
                snapshot_hosts.c.xen_host == job.xen_host).with_for_update())
            used = connection.execute(select(func.count()).select_from(t).where(
                t.c.xen_host == job.xen_host, t.c.admitted.is_(True), t.c.id != job.id,
            )).scalar_one()
            if job.admitted:
                return True, int(used)
            if used >= self.settings.snapshots_per_host:
                return False, int(used)
            lease.leases.update(connection, job.id, lease.owner, admitted=True)
            return True, int(used)

    def _create(self, lease: Lease) -> None:
        job = lease.job
        request = SnapshotRequested.model_validate(job.payload)
        driver = self.driver(job.driver)
        if driver.name != "none":
            admitted, used = self._admit(lease)
            if not admitted:
                give_back(lease, self.settings.snapshot_slot_wait_seconds,
                          f"waiting for a slot on {job.xen_host}: {used} of "
                          f"{self.settings.snapshots_per_host} snapshots active there")
                return
        sid = f"ferry-{job.id}-{job.attempts}"
        with self.engine.begin() as connection:  # held by our lease before the host is touched
            lease.leases.update(connection, job.id, lease.owner, phase="creating",
                                snapshot_id=sid, error=None)
        host = self.hosts.get(job.xen_host)
        if driver.name == "none":
            self._activate(lease, request, sid, None, request.size_bytes, 0)
            return
        self._remove_earlier_claims(host, driver, job.id, keep=None)
        # the COW is a share of the device, measured (a request may carry used bytes only)
        size = int(host.run(["blockdev", "--getsize64", request.device], timeout=60).stdout)
        cow = int(size * self.settings.snapshot_cow_share * 2 ** job.cow_attempt)
        snapshot = driver.create(host, SnapshotSpec(sid, request.device, cow), self.on_step)
        try:
            port = exports.start(host, sid, snapshot.export_device)
            lease.check()
            self._activate(lease, request, sid, port, snapshot.size_bytes, snapshot.cow_bytes)
        except BaseException:
            with contextlib.suppress(FerryError):
                exports.stop(host, sid)
                driver.release(host, sid)
            raise

    def _remove_earlier_claims(self, host: Host, driver: Driver, job_id: str,
                               keep: str | None) -> None:
        mine = {sid for sid in driver.leftovers(host) | exports.configured(host)
                if (m := SNAPSHOT_ID.match(sid)) and m["job"] == job_id and sid != keep}
        for sid in sorted(mine):
            log.warning("snapshotter: removing %s on %s, left by an earlier claim", sid, host.name)
            exports.stop(host, sid)
            driver.release(host, sid)

    def _activate(self, lease: Lease, request: SnapshotRequested, sid: str, port: int | None,
                  size: int, cow_bytes: int) -> None:
        job = lease.job
        ready = SnapshotReady(
            datacenter=request.datacenter, request_id=request.request_id, snapshot_id=sid,
            driver=request.driver, host=request.xen_host, export_name=sid if port else "",
            port=port, size_bytes=size, reuse_key=request.reuse_key, source=request.source)
        with UnitOfWork(self.engine, on_commit=self.wake) as uow:
            lease.leases.finish(uow.connection, job.id, lease.owner, state=ACTIVE,
                                phase="active", export_port=port, cow_bytes=cow_bytes,
                                bytes_total=cow_bytes or None, bytes_done=0)
            uow.outbox.add(ready, migration_id=job.migration_id)
            uow.commit()
        log.info("snapshotter: %s ready on %s (port %s)", sid, job.xen_host, port)

    # -- release ----------------------------------------------------------------------------

    def _release(self, lease: Lease) -> None:
        job = lease.job
        driver = self.driver(job.driver)
        sid = job.snapshot_id
        reason = job.release_reason or "released"
        invalid = job.phase == "invalid"
        try:
            if sid and driver.name != "none":
                host = self.hosts.get(job.xen_host)
                if not invalid and reason.startswith(AFTER_FAILURE):
                    usage = driver.usage(host, sid)  # did the archive fail because the COW filled?
                    invalid = usage is not None and not usage.valid
                    if invalid:
                        reason = f"COW full: snapshot {sid} invalidated ({job.cow_bytes} bytes)"
                exports.stop(host, sid)
                driver.release(host, sid)
        except LeaseLostError:
            raise
        except FerryError as error:  # never give up on a release: the origin must come back
            give_back(lease, RELEASE_RETRY_SECONDS, f"release failed, retrying: {error}")
            return
        self._released(lease, sid or "", reason, invalid)

    def _released(self, lease: Lease, sid: str, reason: str, invalid: bool) -> None:
        job = lease.job
        released = SnapshotReleased(request_id=job.request_id, snapshot_id=sid,
                                    host=job.xen_host, reason=reason, invalidated=invalid)
        retry = invalid and job.cow_attempt + 1 < self.settings.snapshot_cow_attempts
        with UnitOfWork(self.engine, on_commit=self.wake) as uow:
            # a release is not a try at creating: only creates count towards max_attempts
            common: dict[str, Any] = {"admitted": False, "export_port": None,
                                      "attempts": job.attempts - 1}
            if retry:
                lease.leases.finish(uow.connection, job.id, lease.owner, state=PENDING,
                                    phase="waiting", cow_attempt=job.cow_attempt + 1,
                                    next_run_at=time.time(), release_reason=reason, **common)
            elif invalid:
                failure = (f"{reason}; still too small after {job.cow_attempt + 1} COW "
                           f"sizes (FERRY_SNAPSHOT_COW_ATTEMPTS)")
                lease.leases.finish(uow.connection, job.id, lease.owner, state=FAILED,
                                    phase="failed", error=failure, **common)
                uow.outbox.add(self._failed(job, failure), migration_id=job.migration_id)
            else:
                lease.leases.finish(uow.connection, job.id, lease.owner, state=DONE,
                                    phase="released", result={"reason": reason}, **common)
            uow.outbox.add(released, migration_id=job.migration_id)
            uow.commit()
        log.info("snapshotter: %s released on %s: %s", sid, job.xen_host, reason)

    @staticmethod
    def _failed(job: Any, reason: str) -> SnapshotFailed:
        return SnapshotFailed(request_id=job.request_id, datacenter=job.datacenter,
                              host=job.xen_host, reason=reason[:2000])

    def fail(self, lease: Lease, error: BaseException) -> None:
        """A create that cannot succeed: nothing is left on the host; snapshot.failed."""
        job = lease.job
        with UnitOfWork(self.engine, on_commit=self.wake) as uow:
            lease.leases.finish(uow.connection, job.id, lease.owner, state=FAILED,
                                phase="failed", admitted=False, error=str(error)[-4000:])
            uow.outbox.add(self._failed(job, str(error)), migration_id=job.migration_id)
            uow.commit()


def give_back(lease: Lease, delay: float, note: str) -> None:
    """Return the job to be claimed again after `delay`, without spending one of its
    attempts: waiting for a slot or retrying a release is not a failed try. Claims still
    number the snapshot ids, which stay unique because the next claim counts up again."""
    job = lease.job
    with lease.leases.engine.begin() as connection:
        lease.leases.update(connection, job.id, lease.owner, state=PENDING, lease_owner=None,
                            lease_expires_at=None, next_run_at=time.time() + delay,
                            error=note[-4000:], attempts=job.attempts - 1)
