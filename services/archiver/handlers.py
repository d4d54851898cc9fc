"""The archiver service's handlers: plain functions, registered by event type at the bottom.

They only record: a request row and, unless the request joins its reuse key's current
archive, a new archive job the workers (jobs.py) pick up. A request joins an archive that is
not finished yet (concurrent requests coalesce into one run, whatever the kind); a finished
one only when it is a shared database server's root within `archive_reuse_seconds`, not
dropped, its file still in staging, and then it is answered at once. Every other request
archives afresh: a second migration never gets the first one's (stale) copy.
"""

from __future__ import annotations

import logging
import time
import uuid
from typing import Any

from sqlalchemy import Connection, Row, select, update

from services.archiver.records import completed_event, payload_snapshot
from services.archiver.sources import ArchiveOrder, SnapshotExport, validate_order
from services.archiver.staging import not_reusable
from services.archiver.tables import (
    COMPLETED,
    FAILED,
    WAITING,
    archive_jobs,
    archive_keys,
    archive_requests,
)
from shared.contracts import (
    ArchiveFailed,
    ArchiveRequested,
    SnapshotReady,
    SnapshotReleased,
    TransferCompleted,
)
from shared.db import insert_ignoring_conflicts
from shared.errors import PermanentError
from shared.jobs import DONE, PENDING, RUNNING, new_job_values, rearm_values
from shared.jobs import FAILED as JOB_FAILED
from shared.runtime import Context, Handler
from shared.settings import Settings

log = logging.getLogger(__name__)

# The handlers' dependency: the service's settings (the reuse age)
Ctx = Context[Settings | None]
DEFAULT_REUSE_SECONDS = float(Settings.model_fields["archive_reuse_seconds"].default)


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
    # Locked until commit: concurrent requests for the key wait here, so they join one job
    key = _locked_key(connection, datacenter, reuse_key, order.kind)
    if key.kind != order.kind:
        raise ReuseKeyConflictError(
            f"reuse key {reuse_key!r} names {key.kind} archives ({key.archive_id}); request "
            f"{request_id} asks for a {order.kind} archive under the same key")
    # ... and so is the job it joins: the worker completing it waits for us (or we for
    # it), so a request recorded as waiting is always seen by the completing transaction
    job = _joinable(connection, key, reuse_seconds(ctx))
    created = job is None
    if job is None:  # nothing to join: a new archive, the key's current one from now on
        new_id = uuid.uuid4().hex
        connection.execute(archive_jobs.insert().values(new_job_values(
            new_id, ctx.migration_id, order.kind, order.model_dump(mode="json"),
            **_source_columns(order, datacenter, reuse_key))))
        connection.execute(update(archive_keys).where(
            archive_keys.c.datacenter == datacenter, archive_keys.c.reuse_key == reuse_key)
            .values(archive_id=new_id, updated_at=time.time()))
        job = connection.execute(select(archive_jobs).where(archive_jobs.c.id == new_id)).one()
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
              "answered_at": time.time() if state == COMPLETED else None,
              "transferred_at": None}
    if known is None:
        connection.execute(archive_requests.insert().values(
            request_id=request_id, created_at=time.time(), **values))
    else:  # a request that failed, asked again (a retried snapshot): it waits again
        connection.execute(update(archive_requests)
                           .where(archive_requests.c.request_id == request_id)
                           .values(**values))
    if state == COMPLETED:
        ctx.emit(completed_event(job, request_id, reused=True))


def reuse_seconds(ctx: Ctx) -> float:
    """How long a server root's archive is reused (the service's settings; a test that
    delivers without them gets the default)."""
    return ctx.deps.archive_reuse_seconds if ctx.deps is not None else DEFAULT_REUSE_SECONDS


def _locked_key(connection: Connection, datacenter: str, reuse_key: str,
                kind: str) -> Row[Any]:
    """The key's row, created if new (its kind fixed by this first request), locked until
    the transaction ends."""
    insert_ignoring_conflicts(connection, archive_keys, {
        "datacenter": datacenter, "reuse_key": reuse_key, "kind": kind, "archive_id": None,
        "updated_at": time.time()})
    return connection.execute(select(archive_keys).where(
        archive_keys.c.datacenter == datacenter, archive_keys.c.reuse_key == reuse_key)
        .with_for_update()).one()


def _joinable(connection: Connection, key: Row[Any], max_age: float) -> Row[Any] | None:
    """The key's current job if a new request may join it, locked; None when the request
    must archive afresh. A job not finished yet (or failed: it runs again) takes every
    request; a finished one only when it is a server root within its age, not dropped, its
    staging file still there (reusable)."""
    if key.archive_id is None:
        return None
    job = connection.execute(select(archive_jobs).where(archive_jobs.c.id == key.archive_id)
                             .with_for_update()).first()
    if job is None:
        return None
    if job.state != DONE:
        return job
    why_not = not_reusable(job, time.time(), max_age)
    if why_not:
        log.info("archive %s (%s) not reused: %s; archiving afresh", job.id, key.reuse_key,
                 why_not)
        return None
    return job


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


def note_transferred(event: TransferCompleted, ctx: Ctx) -> None:
    """The request's copy at the destination was verified: its staging file may go once the
    archive's other requests are too and it is past its reuse age (staging.collect, run by
    the archiver of the archive's datacenter, which alone has that staging). Not routed by
    datacenter: every archiver's queue gets it; a request this database does not hold (or
    that another archive answers now) changes nothing."""
    r = archive_requests
    ctx.connection.execute(update(r).where(
        r.c.request_id == event.request_id, r.c.archive_id == event.archive_id,
        r.c.transferred_at.is_(None)).values(transferred_at=time.time()))


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
    TransferCompleted.TYPE: note_transferred,  # likewise
}
ON_FAILURE = fail_request
