"""The snapshotter service's handlers: plain functions, registered by event type at the bottom.

A request becomes a job row (the work on the Xen host is leased, in jobs.py). The end of
the archive that read a snapshot marks it for release.
"""

from __future__ import annotations

import time
import uuid
from typing import Any

from sqlalchemy import Connection, insert, select, update

from services.snapshotter.devicemapper import check_device
from services.snapshotter.tables import ACTIVE, RELEASING, WAITING, snapshot_jobs
from shared.addresses import parse_address
from shared.contracts import ArchiveCompleted, ArchiveFailed, SnapshotFailed, SnapshotRequested
from shared.errors import ConfigurationError, PermanentError, UnknownEventError
from shared.jobs import FAILED, PENDING, new_job_values
from shared.runtime import Context, Handler

AFTER_FAILURE = "archive failed"  # release reasons that start so get a validity check first


def request_problem(event: SnapshotRequested) -> str | None:
    """Why this request cannot be served, or None. Checked before anything runs on a host."""
    try:
        if event.xen_host != "local":
            parse_address(event.xen_host)
        if event.driver != "none":
            check_device(event.device)
        elif not (event.source.path or event.device):
            return "driver none needs source.path or a device to archive as it is"
    except (ConfigurationError, PermanentError) as error:
        return str(error)
    return None


def request_snapshot(event: SnapshotRequested, ctx: Context[None]) -> None:
    """Record a snapshot job (one per request id); a bad request fails at once, clearly."""
    known = ctx.connection.execute(select(snapshot_jobs.c.id).where(
        snapshot_jobs.c.request_id == event.request_id)).first()
    if known is not None:
        return
    problem = request_problem(event)
    values = new_job_values(
        uuid.uuid4().hex[:12], ctx.migration_id, "snapshot", event.model_dump(mode="json"),
        request_id=event.request_id, xen_host=event.xen_host, datacenter=event.datacenter,
        driver=event.driver, phase=WAITING, admitted=False, cow_attempt=0)
    if problem:
        values.update(state=FAILED, phase=FAILED, error=problem)
        ctx.emit(SnapshotFailed(request_id=event.request_id, datacenter=event.datacenter,
                                host=event.xen_host, reason=problem))
    ctx.connection.execute(insert(snapshot_jobs).values(values))


def release_reason(job: Any, event: ArchiveCompleted | ArchiveFailed) -> str | None:
    """Why the archive's end releases this job's snapshot, or None to leave it alone.

    - the event names another attempt's snapshot: stale, the current one is not done;
    - will_retry: the archive is coming back (a COW that filled up is re-requested by us);
    - the snapshot is not active (not exported yet, or already being released).
    """
    if event.snapshot_id and event.snapshot_id != job.snapshot_id:
        return None
    if job.state != ACTIVE:
        return None
    if isinstance(event, ArchiveFailed):
        if event.will_retry:
            return None
        return f"{AFTER_FAILURE}: {event.reason}"[:2000]
    return "archive completed"


def release_after_archive(event: ArchiveCompleted | ArchiveFailed, ctx: Context[None]) -> None:
    """archive.completed / archive.failed for a snapshot's request: release the snapshot.
    Other kinds of archive read no snapshot: nothing to do. Raises UnknownEventError for a
    local filesystem's archive of a request no snapshot was ever requested for."""
    if event.kind != "local_fs":
        return
    job = ctx.connection.execute(select(snapshot_jobs).where(
        snapshot_jobs.c.request_id == event.request_id)).first()
    if job is None:
        raise UnknownEventError(f"{ctx.envelope.type} {ctx.envelope.id}: request "
                                f"{event.request_id!r} of migration {ctx.migration_id!r} has "
                                f"no snapshot the snapshotter ever made")
    reason = release_reason(job, event) if job is not None else None
    if job is not None and reason is not None:
        mark_for_release(ctx.connection, job.id, job.snapshot_id, reason)


def mark_for_release(connection: Connection, job_id: str, snapshot_id: str | None,
                     reason: str, phase: str = RELEASING) -> bool:
    """Hand an active snapshot to the workers for release (phase `invalid`: release, then
    retry with a larger COW). False when it was not active any more (someone was first)."""
    t = snapshot_jobs
    done = connection.execute(
        update(t).where(t.c.id == job_id, t.c.state == ACTIVE, t.c.snapshot_id == snapshot_id)
        .values(state=PENDING, phase=phase, release_reason=reason, next_run_at=time.time(),
                updated_at=time.time()))
    return bool(done.rowcount == 1)


HANDLERS: dict[str, Handler] = {
    SnapshotRequested.TYPE: request_snapshot,
    ArchiveCompleted.TYPE: release_after_archive,
    ArchiveFailed.TYPE: release_after_archive,
}
