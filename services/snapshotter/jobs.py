"""Leased snapshot work on the Xen hosts: create and export, release, retry with a larger COW.

Each attempt returns an outcome; the job worker writes it, with its events, in one
transaction. A claimed job in phase waiting/creating is created: it first takes a slot on
its host (at most `snapshots_per_host` admitted jobs per host, decided under a row lock on
the host; no slot: wait, without spending an attempt), then the driver snapshots the origin,
nbd-server exports it, and the outcome makes the job `active` with snapshot.ready. Every
attempt at creating makes a new snapshot id (`ferry-<job id>-<attempt>`), so a worker that
took over a dead one's job first removes the earlier claim's leftovers and never collides
with them.
A job in phase releasing/invalid is torn down; `invalid` (its COW filled up) is then
re-armed with a COW twice as large, up to `snapshot_cow_attempts` times. Releases spend no
attempts either.
"""

from __future__ import annotations

import contextlib
import logging
from typing import Any

from sqlalchemy import func, select

from services.snapshotter import exports
from services.snapshotter.devicemapper import SNAPSHOT_ID
from services.snapshotter.drivers import Driver, SnapshotSpec, StepHook, driver_for
from services.snapshotter.handlers import AFTER_FAILURE
from services.snapshotter.tables import (
    ACTIVE,
    CREATING,
    INVALID,
    RELEASED,
    RELEASING,
    WAITING,
    snapshot_hosts,
    snapshot_jobs,
)
from shared.contracts import (
    Event,
    SnapshotFailed,
    SnapshotReady,
    SnapshotReleased,
    SnapshotRequested,
)
from shared.db import insert_ignoring_conflicts
from shared.errors import FerryError, LeaseLostError
from shared.failpoints import failpoint
from shared.hosts import Host, HostPool
from shared.inbox_outbox import UnitOfWork, Units
from shared.jobs import FAILED, Done, Failed, Lease, Outcome, Record, RetryIn
from shared.settings import Settings

log = logging.getLogger(__name__)
RELEASE_RETRY_SECONDS = 30.0


class SnapshotWork:
    """The JobWorker's `work` and `fail` for snapshot jobs; the reconciler's hosts and
    drivers."""

    def __init__(self, settings: Settings, units: Units, hosts: HostPool,
                 on_step: StepHook | None = None) -> None:
        self.settings = settings
        self.units = units
        self.hosts = hosts
        self.on_step = on_step  # tests inject faults at a named step of a create

    def driver(self, name: str) -> Driver:
        return driver_for(name, self.settings.snapshot_cow_vg, self.settings.snapshot_cow_dir)

    def run(self, lease: Lease) -> Outcome:
        if lease.job.phase in (RELEASING, INVALID):
            return self._release(lease)
        return self._create(lease)

    # -- create -----------------------------------------------------------------------------

    def _admit(self, lease: Lease) -> tuple[bool, int]:
        """Take a slot on the job's host; (admitted, slots in use by others)."""
        job, t = lease.job, snapshot_jobs
        with lease.units() as uow:
            connection = uow.connection
            insert_ignoring_conflicts(connection, snapshot_hosts, {"xen_host": job.xen_host})
            connection.execute(select(snapshot_hosts).where(
                snapshot_hosts.c.xen_host == job.xen_host).with_for_update())
            used = int(connection.execute(select(func.count()).select_from(t).where(
                t.c.xen_host == job.xen_host, t.c.admitted.is_(True), t.c.id != job.id,
            )).scalar_one())
            admitted = bool(job.admitted) or used < self.settings.snapshots_per_host
            if admitted and not job.admitted:
                lease.update(connection, admitted=True)
            uow.commit()
        return admitted, used

    def _create(self, lease: Lease) -> Outcome:
        job = lease.job
        request = SnapshotRequested.model_validate(job.payload)
        driver = self.driver(job.driver)
        if driver.name != "none":
            admitted, used = self._admit(lease)
            if not admitted:  # no try at creating: the attempt is not spent
                return RetryIn(self.settings.snapshot_slot_wait_seconds,
                               f"waiting for a slot on {job.xen_host}: {used} of "
                               f"{self.settings.snapshots_per_host} snapshots active there",
                               counts_as_attempt=False)
        # Only attempts at creating count: a claim that did not (a wait, a release) made no
        # snapshot with its number, and gave the number back.
        sid = f"ferry-{job.id}-{job.attempts}"
        with lease.units() as uow:  # held by our lease before the host is touched
            lease.update(uow.connection, phase=CREATING, snapshot_id=sid, error=None)
            uow.commit()
        if driver.name == "none":
            return self._activate(lease, request, sid, None, request.size_bytes, 0)
        host = self.hosts.get(job.xen_host)
        self._remove_earlier_claims(host, driver, job.id, keep=None)
        # the COW is a share of the device, measured (a request may carry used bytes only)
        size = int(host.run(["blockdev", "--getsize64", request.device], timeout=60).stdout)
        cow = int(size * self.settings.snapshot_cow_share * 2 ** job.cow_attempt)
        snapshot = driver.create(host, SnapshotSpec(sid, request.device, cow), self.on_step)
        try:
            port = exports.start(host, sid, snapshot.export_device)
            lease.check()
        except BaseException:
            with contextlib.suppress(FerryError):
                exports.stop(host, sid)
                driver.release(host, sid)
            raise
        return self._activate(lease, request, sid, port, snapshot.size_bytes, snapshot.cow_bytes)

    def _remove_earlier_claims(self, host: Host, driver: Driver, job_id: str,
                               keep: str | None) -> None:
        mine = {sid for sid in driver.leftovers(host) | exports.configured(host)
                if (m := SNAPSHOT_ID.match(sid)) and m["job"] == job_id and sid != keep}
        for sid in sorted(mine):
            log.warning("snapshotter: removing %s on %s, left by an earlier claim", sid, host.name)
            exports.stop(host, sid)
            driver.release(host, sid)

    def _activate(self, lease: Lease, request: SnapshotRequested, sid: str, port: int | None,
                  size: int, cow_bytes: int) -> Done:
        """The job becomes `active` (holding its slot) and snapshot.ready goes out with it."""
        job = lease.job
        # created, not recorded: the next claim removes it (an earlier claim's) and makes anew
        failpoint("snapshotter.after_create")
        ready = SnapshotReady(
            datacenter=request.datacenter, request_id=request.request_id, snapshot_id=sid,
            driver=request.driver, host=request.xen_host, export_name=sid if port else "",
            port=port, size_bytes=size, reuse_key=request.reuse_key, source=request.source)
        log.info("snapshotter: %s ready on %s (port %s)", sid, job.xen_host, port)
        return Done(state=ACTIVE, record=emit(ready, job.migration_id), values={
            "phase": ACTIVE, "export_port": port, "cow_bytes": cow_bytes,
            "bytes_total": cow_bytes or None, "bytes_done": 0})

    # -- release ----------------------------------------------------------------------------

    def _release(self, lease: Lease) -> Outcome:
        job = lease.job
        driver = self.driver(job.driver)
        sid = job.snapshot_id
        reason = job.release_reason or "released"
        invalid = job.phase == INVALID
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
            return RetryIn(RELEASE_RETRY_SECONDS, f"release failed, retrying: {error}",
                           counts_as_attempt=False)
        return self._released(lease, sid or "", reason, invalid)

    def _released(self, lease: Lease, sid: str, reason: str, invalid: bool) -> Outcome:
        """What follows a release, with snapshot.released. A release is no try at creating:
        only creates count towards max_attempts."""
        job = lease.job
        failpoint("snapshotter.after_release")  # torn down, not recorded: released again
        log.info("snapshotter: %s released on %s: %s", sid, job.xen_host, reason)
        record = emit(SnapshotReleased(request_id=job.request_id, snapshot_id=sid,
                                       host=job.xen_host, reason=reason, invalidated=invalid),
                      job.migration_id)
        freed: dict[str, Any] = {"admitted": False, "export_port": None}
        if invalid and job.cow_attempt + 1 < self.settings.snapshot_cow_attempts:
            return RetryIn(0.0, reason, counts_as_attempt=False, record=record, values={
                **freed, "phase": WAITING, "cow_attempt": job.cow_attempt + 1,
                "release_reason": reason})
        if invalid:  # `fail` says snapshot.failed
            return Failed(f"{reason}; still too small after {job.cow_attempt + 1} COW sizes "
                          f"(FERRY_SNAPSHOT_COW_ATTEMPTS)", values=freed, record=record)
        return Done({"reason": reason}, values={**freed, "phase": RELEASED}, record=record)

    def fail(self, lease: Lease, error: BaseException, uow: UnitOfWork) -> Failed:
        """The job failed for good (a create that cannot succeed leaves nothing on the host;
        a COW still too small is released): snapshot.failed."""
        job = lease.job
        uow.outbox.add(SnapshotFailed(request_id=job.request_id, datacenter=job.datacenter,
                                      host=job.xen_host, reason=str(error)[:2000]),
                       migration_id=job.migration_id)
        return Failed(error, values={"phase": FAILED, "admitted": False})


def emit(event: Event, migration_id: str) -> Record:
    """A job outcome's record: `event` to the outbox, in the transaction of the outcome."""
    def record(uow: UnitOfWork) -> None:
        uow.outbox.add(event, migration_id=migration_id)

    return record
