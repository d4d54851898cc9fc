"""The transfer service's handlers: plain functions, registered by event type at the bottom.

They only record: a transfer job per archive per migration, and which requests a migration
expects. The sending happens in services.transfer.jobs, under a lease.
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

from sqlalchemy import Connection, select, update

from services.transfer import ledger
from services.transfer.destination import Destination, safe_component
from services.transfer.tables import transfer_migrations, transfer_requests, transfers
from shared.contracts import ArchiveCompleted, ArchiveFailed, MigrationResolved, TransferFailed
from shared.db import insert_ignoring_conflicts
from shared.errors import PermanentError, RefusedEventError, UnknownEventError
from shared.jobs import DONE, FAILED, new_job_values
from shared.runtime import Context, Handler


def transfer_id(migration_id: str, archive_id: str) -> str:
    """One transfer per archive per migration, whichever request names it first."""
    digest = hashlib.sha256(f"{migration_id}\0{archive_id}".encode()).hexdigest()
    return f"tr-{digest[:40]}"


@dataclass(frozen=True)
class Receiving:
    """What the handlers need: the destination archives go to, and the staging root
    (FERRY_STAGING_DIR), whose `<dc>` directory is the only place an archive of datacenter
    `<dc>` may be sent from. `datacenter`: the one this transfer serves (None: every one,
    from the whole staging root, all on one host)."""

    destination: Destination
    staging: Path
    datacenter: str | None = None

    def staging_of(self, datacenter: str) -> Path:
        """Where an archive of `datacenter` must be staged to be sent."""
        return self.staging if self.datacenter is None else self.staging / datacenter


def staged(path: str, staging: Path, archive_id: str) -> Path:
    """The archive's staging file, symlinks resolved; raises RefusedEventError when it is
    not inside `staging`."""
    resolved = Path(path).resolve()
    if not resolved.is_relative_to(staging.resolve()):
        raise RefusedEventError(f"archive {archive_id}: {path} is not in the staging "
                                f"directory {staging}: refused")
    return resolved


def record_expected_requests(event: MigrationResolved, ctx: Context[Receiving]) -> None:
    """Remember every archive request of the migration: it completes when all transferred."""
    connection, migration_id = ctx.connection, ctx.migration_id
    ledger.lock_migration(connection, migration_id)
    for job in event.jobs:
        insert_ignoring_conflicts(connection, transfer_requests, {
            "migration_id": migration_id, "request_id": job.request_id, "kind": job.kind,
            "state": ledger.EXPECTED, "updated_at": time.time()})
    m = transfer_migrations
    connection.execute(update(m).where(m.c.migration_id == migration_id).values(resolved=True))
    # its archives may all have been transferred before this message arrived
    ledger.complete_if_done(connection, ctx.outbox, migration_id, ctx.envelope)


def check_known(connection: Connection, event: ArchiveCompleted | ArchiveFailed,
                ctx: Context[Receiving]) -> None:
    """Raise UnknownEventError for an archive's end about a request its migration never
    planned. Before migration.resolved arrived (a retried message may come later) nothing
    can be told yet: the request is believed, and counted once the plan arrives."""
    m, r = transfer_migrations, transfer_requests
    resolved = connection.execute(select(m.c.resolved).where(
        m.c.migration_id == ctx.migration_id)).scalar()
    if not resolved:
        return
    planned = connection.execute(select(r.c.request_id).where(
        r.c.migration_id == ctx.migration_id, r.c.request_id == event.request_id)).first()
    if planned is None:
        raise UnknownEventError(f"{ctx.envelope.type} {ctx.envelope.id}: request "
                                f"{event.request_id!r} is not one migration "
                                f"{ctx.migration_id!r} planned")


def record_archive(event: ArchiveCompleted, ctx: Context[Receiving]) -> None:
    """A transfer job for the archive (one per migration) to the destination, linked to
    this request. Raises UnsafeNameError, PermanentError for a path it will not send,
    RefusedEventError for an event that names another archive's place or a file outside
    staging, UnknownEventError for a request its resolved migration never planned."""
    connection, migration_id = ctx.connection, ctx.migration_id
    safe_component(migration_id, "migration id")
    safe_component(event.file_name, "archive file name")
    if not PurePosixPath(event.path).is_absolute():
        raise PermanentError(f"archive {event.archive_id}: staging path {event.path!r} "
                             "is not absolute")
    # the archive's own datacenter's staging, whichever datacenter's queue brought it: its
    # job is claimed only by that datacenter's workers (jobs.TransferLeases)
    staged(event.path, ctx.deps.staging_of(event.datacenter), event.archive_id)
    job_id = transfer_id(migration_id, event.archive_id)
    _refuse_another_archive(connection, migration_id, job_id, event)
    check_known(connection, event, ctx)  # after the refusals: those say more
    payload = {"archive_id": event.archive_id, "path": event.path,
               "file_name": event.file_name, "sha256": event.sha256,
               "bytes": event.compressed_bytes, "datacenter": event.datacenter,
               "kind": event.kind, "manifest_sha256": event.manifest_sha256}
    # the job row before the migration's lock, as the worker takes them (see ledger)
    insert_ignoring_conflicts(connection, transfers, new_job_values(
        job_id, migration_id, event.kind, payload, bytes_total=event.compressed_bytes,
        archive_id=event.archive_id, destination=ctx.deps.destination.text, verify_failures=0,
        datacenter=event.datacenter))
    ledger.lock_migration(connection, migration_id)
    ledger.put_request(connection, migration_id, event.request_id, kind=event.kind,
                       archive_id=event.archive_id, job_id=job_id, state=ledger.TRANSFERRING)
    job = connection.execute(select(transfers).where(transfers.c.id == job_id)).one()
    if job.state == DONE:  # another request's archive, already sent: count this one too
        ledger.announce_transferred(connection, ctx.outbox, job, job.result, ctx.envelope)
    elif job.state == FAILED:
        ledger.announce_failed(connection, ctx.outbox, job, job.error or "failed", ctx.envelope)


def _refuse_another_archive(connection: Connection, migration_id: str, job_id: str,
                            event: ArchiveCompleted) -> None:
    """A file name at the destination belongs to one archive, and a request transferred
    stays transferred: nothing replaces a copy already sent (and verified)."""
    t, r = transfers, transfer_requests
    other = connection.execute(select(t.c.archive_id).where(
        t.c.migration_id == migration_id, t.c.id != job_id,
        t.c.payload["file_name"].as_string() == event.file_name)).first()
    if other is not None:
        raise RefusedEventError(f"archive {event.archive_id}: {event.file_name} is archive "
                                f"{other.archive_id}'s name at the destination: refused")
    done = connection.execute(select(r.c.archive_id).where(
        r.c.migration_id == migration_id, r.c.request_id == event.request_id,
        r.c.state == ledger.TRANSFERRED)).first()
    if done is not None and done.archive_id != event.archive_id:
        raise RefusedEventError(f"request {event.request_id} was transferred as archive "
                                f"{done.archive_id}; archive {event.archive_id} for it is "
                                f"refused")


def record_archive_failure(event: ArchiveFailed, ctx: Context[Receiving]) -> None:
    """An archive that will never come fails its migration (once)."""
    if event.will_retry:
        return
    connection, migration_id = ctx.connection, ctx.migration_id
    check_known(connection, event, ctx)
    ledger.lock_migration(connection, migration_id)
    ledger.put_request(connection, migration_id, event.request_id, kind=event.kind,
                       state=ledger.ARCHIVE_FAILED, reason=event.reason[-2000:])
    ledger.fail_migration(connection, ctx.outbox, migration_id, "archive",
                          f"{event.kind} {event.request_id}: {event.reason}", ctx.envelope)


def record_failed_message(event: Any, ctx: Context[Receiving], error: BaseException) -> None:
    """The bus's failure hook: an archive.completed that cannot be recorded (say, a file name
    unfit for the destination) fails its request and migration instead of vanishing. One
    refused as untrustworthy, or about a request never planned, changes nothing: it is only
    dead-lettered."""
    if not isinstance(event, ArchiveCompleted) or isinstance(error, RefusedEventError
                                                             | UnknownEventError):
        return
    connection, migration_id, reason = ctx.connection, ctx.migration_id, str(error)
    ledger.lock_migration(connection, migration_id)
    ledger.put_request(connection, migration_id, event.request_id, kind=event.kind,
                       archive_id=event.archive_id, state=ledger.FAILED, reason=reason[-2000:])
    ctx.emit(TransferFailed(request_id=event.request_id, archive_id=event.archive_id,
                            reason=reason[-2000:], attempts=0))
    ledger.fail_migration(connection, ctx.outbox, migration_id, "transfer", reason,
                          ctx.envelope)


HANDLERS: dict[str, Handler] = {
    MigrationResolved.TYPE: record_expected_requests,
    ArchiveCompleted.TYPE: record_archive,
    ArchiveFailed.TYPE: record_archive_failure,
}
ON_FAILURE = record_failed_message
