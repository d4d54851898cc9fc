"""What keeps the Xen hosts and the tables in agreement, in two periodic loops.

- The COW watch (every `snapshot_watch_seconds`): an active snapshot whose COW filled up is
  invalid (every read of it fails): it is handed to the workers as phase `invalid`, torn
  down, and re-requested with a larger COW. Fill levels go to bytes_done/bytes_total.
- The reconciler (at start, then every `reconcile_seconds`): on every host the tables know,
  Ferry's devices, COW files/LVs and nbd-servers that no job holds (active, being created
  or released under a live lease) are torn down, which also resumes an origin left
  suspended by a dead worker; an active job whose snapshot is gone is released.
The host is scanned before the tables are read: a job always records its snapshot id
under its lease before it touches the host, so nothing found can be mistaken for an orphan.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from sqlalchemy import Engine, and_, or_, select, update

from services.snapshotter import exports
from services.snapshotter.handlers import mark_for_release
from services.snapshotter.jobs import SnapshotWork
from services.snapshotter.tables import ACTIVE, INVALID, RELEASING, snapshot_jobs
from shared.errors import FerryError
from shared.jobs import DONE, FAILED, PENDING, RUNNING

log = logging.getLogger(__name__)
REMEMBER_HOSTS_SECONDS = 7 * 86400  # hosts of jobs this recent are visited


def watch_cows(work: SnapshotWork) -> int:
    """One round of the COW watch; returns how many snapshots it found invalid."""
    t, invalid, marked = snapshot_jobs, 0, False
    with work.units.engine.connect() as connection:
        active = connection.execute(select(t).where(t.c.state == ACTIVE,
                                                    t.c.driver != "none")).all()
    for job in active:
        try:
            usage = work.driver(job.driver).usage(work.hosts.get(job.xen_host), job.snapshot_id)
        except FerryError as error:
            log.warning("snapshotter: COW watch of %s on %s: %s", job.snapshot_id,
                        job.xen_host, error)
            continue
        with work.units.engine.begin() as connection:
            if usage is None:
                marked |= mark_for_release(
                    connection, job.id, job.snapshot_id,
                    f"snapshot {job.snapshot_id} vanished from {job.xen_host}")
            elif not usage.valid:
                invalid += 1
                marked |= mark_for_release(
                    connection, job.id, job.snapshot_id,
                    f"COW full: snapshot {job.snapshot_id} invalidated "
                    f"({usage.total_bytes or job.cow_bytes} bytes of COW)", INVALID)
            else:
                connection.execute(update(t).where(
                    t.c.id == job.id, t.c.state == ACTIVE, t.c.snapshot_id == job.snapshot_id,
                ).values(bytes_done=usage.used_bytes, bytes_total=usage.total_bytes))
    if marked:
        work.units.wake()  # the workers release them now, not at their next poll
    return invalid


def held_snapshots(engine: Engine, address: str) -> set[str]:
    """Snapshot ids on `address` that a job holds: active, or worked on under a live lease,
    or waiting for a worker to release them."""
    t, now = snapshot_jobs, time.time()
    with engine.connect() as connection:
        rows = connection.execute(select(t.c.snapshot_id).where(
            t.c.xen_host == address, t.c.snapshot_id.is_not(None),
            or_(t.c.state == ACTIVE,
                and_(t.c.state == RUNNING, t.c.lease_expires_at >= now),
                and_(t.c.state == PENDING, t.c.phase.in_((RELEASING, INVALID)))),
        )).scalars().all()
    return {str(sid) for sid in rows}


def reconcile(work: SnapshotWork) -> dict[str, list[str]]:
    """One round over every recent host; {host: snapshot ids torn down}."""
    t = snapshot_jobs
    with work.units.engine.connect() as connection:
        hosts = connection.execute(select(t.c.xen_host, t.c.driver).distinct().where(
            t.c.driver != "none",
            or_(t.c.state.not_in((DONE, FAILED)),
                t.c.updated_at >= time.time() - REMEMBER_HOSTS_SECONDS),
        )).all()
    removed: dict[str, list[str]] = {}
    for address in sorted({row.xen_host for row in hosts}):
        drivers = sorted({row.driver for row in hosts if row.xen_host == address})
        try:
            removed[address] = reconcile_host(work, address, drivers)
        except FerryError as error:
            log.warning("snapshotter: reconciling %s failed: %s", address, error)
    return removed


def reconcile_host(work: SnapshotWork, address: str, drivers: list[str]) -> list[str]:
    """Tear down what no job holds on one host; release active jobs whose snapshot is gone."""
    host = work.hosts.get(address)
    scanned_at = time.time()
    found: dict[str, Any] = {}
    for name in drivers:
        driver = work.driver(name)
        for sid in driver.leftovers(host):
            found[sid] = driver
    serving = set(exports.server_pids(host).values()) | exports.configured(host)
    held = held_snapshots(work.units.engine, address)
    torn = []
    for sid in sorted((set(found) | serving) - held):
        log.warning("snapshotter: %s on %s is held by no job: tearing it down", sid, address)
        exports.stop(host, sid)
        if sid in found:
            found[sid].release(host, sid)
        torn.append(sid)
    t = snapshot_jobs
    with work.units() as uow:  # its commit wakes the workers, which release what is marked
        for job in uow.connection.execute(select(t).where(  # active since before the scan
                t.c.xen_host == address, t.c.state == ACTIVE, t.c.updated_at < scanned_at)).all():
            if job.driver != "none" and job.snapshot_id not in found:
                mark_for_release(uow.connection, job.id, job.snapshot_id,
                                 f"snapshot {job.snapshot_id} not found on {address} "
                                 f"(reconciler)")
        uow.commit()
    return torn
