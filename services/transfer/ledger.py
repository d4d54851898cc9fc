"""Which requests of a migration are transferred, and the events that say so.

Handlers and the worker both change this state; every change to a migration's requests
first locks its `transfer_migrations` row, so the transaction that completes the last
request sees every other one committed and announces `migration.completed` exactly once.
A transaction that writes a `transfers` row writes it before locking the migration (the
worker writes a finished job's row before its record runs), so two never wait on each other.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

from sqlalchemy import Connection, Row, func, select, update

from services.transfer.tables import transfer_migrations, transfer_requests, transfers
from shared.contracts import MigrationCompleted, MigrationFailed, TransferCompleted, TransferFailed
from shared.db import insert_ignoring_conflicts
from shared.envelope import Envelope
from shared.inbox_outbox import Outbox

EXPECTED, TRANSFERRING, TRANSFERRED = "expected", "transferring", "transferred"
FAILED, ARCHIVE_FAILED = "failed", "archive_failed"


def lock_migration(connection: Connection, migration_id: str) -> Row[Any]:
    """The migration's row, created if new, locked until the transaction ends."""
    insert_ignoring_conflicts(connection, transfer_migrations, {
        "migration_id": migration_id, "resolved": False, "created_at": time.time()})
    t = transfer_migrations
    return connection.execute(
        select(t).where(t.c.migration_id == migration_id).with_for_update()).one()


def put_request(connection: Connection, migration_id: str, request_id: str,
                **values: Any) -> None:
    """Create or update one request's row (the migration must be locked)."""
    values["updated_at"] = time.time()
    created = insert_ignoring_conflicts(connection, transfer_requests, {
        "migration_id": migration_id, "request_id": request_id, "state": EXPECTED, **values})
    if not created:
        r = transfer_requests
        connection.execute(update(r).where(r.c.migration_id == migration_id,
                                           r.c.request_id == request_id).values(**values))


def requests_of(connection: Connection, job_id: str, *, not_in: tuple[str, ...] = ()
                ) -> list[Row[Any]]:
    r = transfer_requests
    query = select(r).where(r.c.job_id == job_id).order_by(r.c.request_id)
    if not_in:
        query = query.where(r.c.state.not_in(not_in))
    return list(connection.execute(query).all())


def announce_transferred(connection: Connection, outbox: Outbox, job: Row[Any],
                         result: Mapping[str, Any], cause: Envelope | None = None) -> None:
    """Mark the job's not yet transferred requests transferred, one transfer.completed each,
    then complete the migration if that was its last request (the migration is locked)."""
    for request in requests_of(connection, job.id, not_in=(TRANSFERRED,)):
        put_request(connection, job.migration_id, request.request_id, state=TRANSFERRED,
                    reason=None)
        outbox.add(TransferCompleted(
            request_id=request.request_id, archive_id=job.archive_id,
            destination=str(result["destination"]), bytes=int(result["bytes"]),
            duration_s=float(result["duration_s"]), mb_per_s=float(result["mb_per_s"]),
            sha256=str(result["sha256"])), migration_id=job.migration_id, cause=cause)
    complete_if_done(connection, outbox, job.migration_id, cause)


def announce_failed(connection: Connection, outbox: Outbox, job: Row[Any], reason: str,
                    cause: Envelope | None = None) -> None:
    """One transfer.failed per request of the job, and the migration fails (once)."""
    for request in requests_of(connection, job.id, not_in=(TRANSFERRED, FAILED)):
        put_request(connection, job.migration_id, request.request_id, state=FAILED,
                    reason=reason[-2000:])
        outbox.add(TransferFailed(request_id=request.request_id, archive_id=job.archive_id,
                                  reason=reason[-2000:], attempts=int(job.attempts)),
                   migration_id=job.migration_id, cause=cause)
    fail_migration(connection, outbox, job.migration_id, "transfer", reason, cause)


def fail_migration(connection: Connection, outbox: Outbox, migration_id: str, stage: str,
                   reason: str, cause: Envelope | None = None) -> None:
    """migration.failed, the first time only (the migration is locked)."""
    m = transfer_migrations
    failed = connection.execute(
        update(m).where(m.c.migration_id == migration_id, m.c.failed_at.is_(None))
        .values(failed_at=time.time())).rowcount
    if failed == 1:
        outbox.add(MigrationFailed(stage=stage, reason=reason[-2000:]),
                   migration_id=migration_id, cause=cause)


def complete_if_done(connection: Connection, outbox: Outbox, migration_id: str,
                     cause: Envelope | None = None) -> None:
    """migration.completed once the migration is resolved and every request of it is
    transferred; at most once (the migration is locked)."""
    m, r = transfer_migrations, transfer_requests
    resolved = connection.execute(
        select(m.c.resolved).where(m.c.migration_id == migration_id)).scalar_one()
    left = connection.execute(select(func.count()).select_from(r).where(
        r.c.migration_id == migration_id, r.c.state != TRANSFERRED)).scalar_one()
    if not resolved or left:
        return
    done = connection.execute(
        update(m).where(m.c.migration_id == migration_id, m.c.completed_at.is_(None))
        .values(completed_at=time.time())).rowcount
    if done != 1:
        return
    job_ids = select(r.c.job_id).where(r.c.migration_id == migration_id).distinct()
    archives, total = connection.execute(
        select(func.count(), func.coalesce(func.sum(transfers.c.bytes_total), 0))
        .where(transfers.c.id.in_(job_ids))).one()
    outbox.add(MigrationCompleted(archives=int(archives), bytes=int(total)),
               migration_id=migration_id, cause=cause)
