"""The archiver service's handlers: plain functions, registered by event type at the bottom.

They only record: a request row and, for a reuse key not seen before in this datacenter, an
archive job the workers (jobs.py) pick up. A key whose archive is done is answered at once.
"""

from __future__ import annotations

import time
import uuid
from typing import Any

from sqlalchemy import Connection, select, update

from services.archiver.records import completed_event, payload_snapshot
from services.archiver.sources import ArchiveOrder, SnapshotExport, validate_order
from services.archiver.tables import COMPLETED, FAILED, WAITING, archive_jobs, archive_requests
from shared.contracts import ArchiveFailed, ArchiveRequested, SnapshotReady, SnapshotReleased
from shared.db import insert_ignoring_conflicts
from shared.errors import PermanentError
from shared.jobs import DONE, PENDING, RUNNING, new_job_values, rearm_values
from shared.jobs import FAILED as JOB_FAILED
from shared.runtime import Context, Handler

Ctx = Context[None]  # the archiver's handlers need nothing besides their unit of work


class ReuseKeyConflictError(PermanentError):
    """Two different kinds of archive were requested under one reuse key."""


def record_archive_request(event: ArchiveRequested, ctx: Ctx) -> None:
    """A shared filesystem, database or database server root to archive."""
    order = ArchiveOrder(kind=event.kind, source=event.source)
    _record(order, event.request_id, event.reuse_key, event.datacenter, ctx)


def record_snapshot_ready(event: SnapshotReady, ctx: Ctx) -> None:
    """A local filesystem's snapshot (or, with driver `none`, the source as it is)."""
    snapshot = SnapshotExport(snapshot_id=event.snapshot_id, driver=event.driver, host=event.host,
                              export_name=event.export_name, port=event.port,
                              size_bytes=event.size_bytes)
    order = ArchiveOrder(kind="local_fs", source=event.source, snapshot=snapshot)
    _record(order, event.request_id, event.reuse_key, event.datacenter, ctx)


def _record(order: ArchiveOrder, request_id: str, reuse_key: str, datacenter: str,
            ctx: Ctx) -> None:
    validate_order(order)  # raises before anything is written
    connection = ctx.connection
    known = connection.execute(select(archive_requests)
                               .where(archive_requests.c.request_id == request_id)).first()
    if known is not None and known.state != FAILED:
        if known.archive_id is not None and order.snapshot is not None:
            _take_new_snapshot(connection, known.archive_id, order)
        return  # the same request sent again under a new message id
    new_id = uuid.uuid4().hex
    insert_ignoring_conflicts(connection, archive_jobs, new_job_values(
        new_id, ctx.migration_id, order.kind, order.model_dump(mode="json"),
        **_source_columns(order, datacenter, reuse_key)))
    # Locked until commit: the worker completing this job waits for us (or we for it), so
    # a request recorded as waiting is always seen by the completing transaction.
    job = connection.execute(
        select(archive_jobs).where(archive_jobs.c.datacenter == datacenter,
                                   archive_jobs.c.reuse_key == reuse_key)
        .with_for_update()).one()
    if job.kind != order.kind:
        raise ReuseKeyConflictError(
            f"reuse key {reuse_key!r} names a {job.kind} archive ({job.id}); request "
            f"{request_id} asks for a {order.kind} archive under the same key")
    created = job.id == new_id
    restart = job.state == JOB_FAILED
    # a new snapshot for a job not started yet (the snapshotter made a larger one): use it
    newer = job.state == PENDING and order.snapshot is not None and not created
    if restart or newer:
        # asked again after it failed for good (or retried by the snapshotter): run it
        # again, from this request's source
        connection.execute(update(archive_jobs).where(archive_jobs.c.id == job.id).values(
            **rearm_values(error=None, result=None, payload=order.model_dump(mode="json"),
                           **_source_columns(order, datacenter, reuse_key))))
    state = COMPLETED if job.state == DONE else WAITING
    values = {"archive_id": job.id, "migration_id": ctx.migration_id,
              "datacenter": datacenter, "kind": order.kind, "reuse_key": reuse_key,
              "state": state, "reused": not (created or restart),
              "answered_at": time.time() if state == COMPLETED else None}
    if known is None:
        connection.execute(archive_requests.insert().values(
            request_id=request_id, created_at=time.time(), **values))
    else:  # a request that failed, asked again (a retried snapshot): it waits again
        connection.execute(update(archive_requests)
                           .where(archive_requests.c.request_id == request_id)
                           .values(**values))
    if state == COMPLETED:
        ctx.emit(completed_event(job, request_id, reused=True))


def _take_new_snapshot(connection: Connection, archive_id: str, order: ArchiveOrder) -> None:
    """A request still waiting got a new snapshot (the snapshotter retried it with a larger
    COW before this archive failed on the old one): the job reads the new one from now on. A
    running attempt on the old one fails, and then runs again (Archiver.fail)."""
    assert order.snapshot is not None  # noqa: S101 (the caller checked)
    job = connection.execute(select(archive_jobs).where(archive_jobs.c.id == archive_id)
                             .with_for_update()).first()
    if job is None or job.state not in (PENDING, RUNNING):
        return
    if payload_snapshot(job.payload).get("snapshot_id") == order.snapshot.snapshot_id:
        return  # the same snapshot.ready again
    payload = order.model_dump(mode="json")
    # pending: due now, its attempts counted afresh; running: the worker holds the row
    values = (rearm_values(payload=payload) if job.state == PENDING
              else {"payload": payload, "updated_at": time.time()})
    connection.execute(update(archive_jobs).where(archive_jobs.c.id == archive_id)
                       .values(**values))


def note_snapshot_released(event: SnapshotReleased, ctx: Ctx) -> None:
    """An invalidated snapshot (its COW filled up) that a running or pending archive reads:
    marked in the job's payload, so the archive fails at once (pending) or when reading
    breaks (running), with will_retry=True (Archiver.fail). Other releases: nothing to do.
    Every datacenter's archiver gets this event; only the one holding the request acts."""
    if event.invalidated:
        _mark_invalidated(ctx.connection, event)


def _mark_invalidated(connection: Connection, event: SnapshotReleased) -> None:
    request = connection.execute(select(archive_requests).where(
        archive_requests.c.request_id == event.request_id)).first()
    if request is None or request.archive_id is None:
        return
    job = connection.execute(select(archive_jobs).where(
        archive_jobs.c.id == request.archive_id).with_for_update()).first()
    snapshot = payload_snapshot(job.payload if job is not None else None)
    if job is None or job.state not in (PENDING, RUNNING) or \
            snapshot.get("snapshot_id") != event.snapshot_id:
        return  # finished already, or it reads another (newer) snapshot
    snapshot["invalidated"] = event.reason or "invalidated by the snapshotter"
    connection.execute(update(archive_jobs).where(archive_jobs.c.id == job.id).values(
        payload={**job.payload, "snapshot": snapshot}, updated_at=time.time()))


def _source_columns(order: ArchiveOrder, datacenter: str, reuse_key: str) -> dict[str, Any]:
    return {"datacenter": datacenter, "reuse_key": reuse_key, "source_label": order.label[:255],
            "source_host": order.source.host[:255], "source_path": order.location}


def fail_request(event: Any, ctx: Ctx, error: BaseException) -> None:
    """The bus gave up on a request (invalid source, conflict): answer it with archive.failed."""
    if not isinstance(event, ArchiveRequested | SnapshotReady):
        return
    kind = event.kind if isinstance(event, ArchiveRequested) else "local_fs"
    recorded = insert_ignoring_conflicts(ctx.connection, archive_requests, {
        "request_id": event.request_id, "archive_id": None, "migration_id": ctx.migration_id,
        "datacenter": event.datacenter, "kind": kind, "reuse_key": event.reuse_key,
        "state": FAILED, "reused": False, "created_at": time.time(),
        "answered_at": time.time()})
    if recorded:
        ctx.emit(ArchiveFailed(datacenter=event.datacenter, request_id=event.request_id,
                               kind=kind, reason=f"{type(error).__name__}: {error}"[-4000:],
                               host=event.source.host))


HANDLERS: dict[str, Handler] = {
    ArchiveRequested.TYPE: record_archive_request,
    SnapshotReady.TYPE: record_snapshot_ready,
    SnapshotReleased.TYPE: note_snapshot_released,  # not datacenter-routed: bound plainly
}
ON_FAILURE = fail_request
