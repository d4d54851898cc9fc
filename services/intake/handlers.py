"""Intake's handlers: the status read model, kept from every event.

One handler hears everything (`intake.status` is bound with "#"). It keeps each migration's
status and history, and one `migration_jobs` row per archive request: `migration.resolved`
lists them, and the snapshot.* / archive.* / transfer.* events that carry the same
request_id move them along. Events from different services may arrive out of order, so a
job's state is set by the newest event (by `occurred_at`) while the facts an event brings
(results, errors) are kept whatever order they arrive in.
"""

from __future__ import annotations

import time
from typing import Any

from sqlalchemy import Connection, insert, select, update

from services.intake.tables import migration_events, migration_jobs, migrations
from shared.contracts import (
    EVENTS,
    ArchiveCompleted,
    ArchiveFailed,
    ArchiveProgress,
    ArchiveRequested,
    Event,
    MigrationResolved,
    SnapshotReady,
    SnapshotReleased,
    SnapshotRequested,
    TransferCompleted,
    TransferFailed,
)
from shared.envelope import Envelope
from shared.errors import UnknownMigrationError
from shared.runtime import Context, Handler

# What an event says about the migration as a whole; other events leave the status alone.
STATUS_AFTER = {
    "migration.submitted": "submitted",
    "migration.resolved": "archiving",
    "migration.failed": "failed",
    "migration.completed": "completed",
}
FINAL = {"failed", "completed"}
MAX_JOB_ERRORS = 20  # a job retried for days keeps its newest errors, not an ever-growing list


def record_event(event: Event, ctx: Context[None]) -> None:
    """Record the event in its migration's history, its status and its jobs."""
    connection, envelope = ctx.connection, ctx.envelope
    if not isinstance(event, ArchiveProgress):
        # Progress comes every few seconds for hours: it moves a job's bytes, and would
        # drown the history.
        connection.execute(insert(migration_events).values(
            message_id=str(envelope.id), migration_id=envelope.migration_id,
            type=envelope.type, payload=envelope.payload,
            occurred_at=envelope.occurred_at.timestamp(),
        ))
    _move_migration(connection, event, envelope)
    if isinstance(event, MigrationResolved):
        _plan_jobs(connection, event, envelope)
    elif getattr(event, "request_id", None):
        _move_job(connection, event, envelope)


def _move_migration(connection: Connection, event: Event, envelope: Envelope) -> None:
    now = time.time()
    current = connection.execute(
        select(migrations.c.status).where(migrations.c.id == envelope.migration_id)
    ).scalar_one_or_none()
    status = STATUS_AFTER.get(envelope.type)
    reason = getattr(event, "reason", None) if envelope.type == "migration.failed" else None
    changes: dict[str, Any] = {}
    if isinstance(event, MigrationResolved):
        changes["allocations"] = event.allocations
    if current is None:
        # Intake stores every migration it accepts before announcing it: an event about any
        # other id is forged or misrouted, and must not make a migration appear.
        raise UnknownMigrationError(f"{envelope.type} {envelope.id} is about migration "
                                    f"{envelope.migration_id!r}, which intake never accepted")
    if status and current not in FINAL:
        changes.update(status=status, reason=reason)
    if changes:
        connection.execute(update(migrations).where(migrations.c.id == envelope.migration_id)
                           .values(updated_at=now, **changes))


def _plan_jobs(connection: Connection, event: MigrationResolved, envelope: Envelope) -> None:
    """Every archive the migration needs, as `planned`; the resolver is the authority on
    what each job is, even when a later event about it was delivered first."""
    for job in event.jobs:
        identity = {"kind": job.kind, "datacenter": job.datacenter, "label": job.source.label,
                    "source": job.source.model_dump(mode="json")}
        row = _locked_job(connection, envelope.migration_id, job.request_id)
        if row is None:
            connection.execute(insert(migration_jobs).values(
                migration_id=envelope.migration_id, request_id=job.request_id,
                # state_at 0: "planned" yields to any event about the job, whatever the
                # clocks of the services that sent them say.
                state="planned", state_at=0.0, **_new_job_defaults(), **identity,
            ))
        else:
            _update_job(connection, envelope.migration_id, job.request_id, identity)


def _move_job(connection: Connection, event: Event, envelope: Envelope) -> None:
    request_id: str = getattr(event, "request_id")  # noqa: B009 - checked by the caller
    at = envelope.occurred_at.timestamp()
    row = _locked_job(connection, envelope.migration_id, request_id)
    if row is None:  # heard of before migration.resolved: keep what this event tells
        connection.execute(insert(migration_jobs).values(
            migration_id=envelope.migration_id, request_id=request_id, state="planned",
            state_at=0.0, label="", **_new_job_defaults(),
        ))
        row = _locked_job(connection, envelope.migration_id, request_id)
        assert row is not None  # noqa: S101 - inserted just above in this transaction
    state, changes = _job_changes(event, envelope, dict(row._mapping))
    if state is not None and at >= row.state_at:
        changes.update(state=state, state_at=at)
    if "bytes_done" in changes and at < row.progress_at:
        for key in ("stage", "bytes_done", "bytes_total", "mb_per_s"):
            changes.pop(key, None)  # older than the progress already shown
    elif "bytes_done" in changes:
        changes["progress_at"] = at
    # Identity from any event fills only what migration.resolved has not told yet.
    for key in ("kind", "datacenter", "label", "source"):
        if key in changes and row._mapping[key]:
            del changes[key]
    _update_job(connection, envelope.migration_id, request_id, changes)


def _job_changes(event: Event, envelope: Envelope,
                 row: dict[str, Any]) -> tuple[str | None, dict[str, Any]]:
    """The state `event` moves its job to (None: no move) and the columns it sets."""
    at = envelope.occurred_at.isoformat()
    if isinstance(event, SnapshotRequested):
        return "snapshotting", {**_identity(event), "snapshot": {"driver": event.driver,
                                                                 "requested_at": at}}
    if isinstance(event, SnapshotReady):
        return "snapshotted", {**_identity(event), "snapshot": {
            **(row["snapshot"] or {}), "snapshot_id": event.snapshot_id, "driver": event.driver,
            "host": event.host, "size_bytes": event.size_bytes, "ready_at": at}}
    if isinstance(event, SnapshotReleased):
        return None, {"snapshot": {**(row["snapshot"] or {}), "snapshot_id": event.snapshot_id,
                                   "released_at": at, "release_reason": event.reason}}
    if isinstance(event, ArchiveRequested):
        return "queued", {**_identity(event), "kind": event.kind}
    if isinstance(event, ArchiveProgress):
        return ("archiving" if event.stage == "archive" else "transferring"), {
            "stage": event.stage, "bytes_done": event.bytes_done,
            "bytes_total": event.bytes_total, "mb_per_s": event.mb_per_s}
    if isinstance(event, ArchiveCompleted):
        archive = event.model_dump(mode="json", exclude={"request_id", "datacenter"})
        return "archived", {"kind": event.kind, "archive": archive, "stage": "archive",
                            "bytes_done": event.raw_bytes, "bytes_total": event.raw_bytes,
                            "mb_per_s": None}
    if isinstance(event, ArchiveFailed):
        error = event.model_dump(mode="json", exclude={"request_id", "datacenter", "kind"})
        return ("retrying" if event.will_retry else "failed"), {
            "kind": event.kind, "errors": _with_error(row, envelope, "archive", error)}
    if isinstance(event, TransferCompleted):
        transfer = event.model_dump(mode="json", exclude={"request_id"})
        return "transferred", {"transfer": transfer, "stage": "transfer",
                               "bytes_done": event.bytes, "bytes_total": event.bytes,
                               "mb_per_s": event.mb_per_s}
    if isinstance(event, TransferFailed):
        error = event.model_dump(mode="json", exclude={"request_id"})
        return "failed", {"errors": _with_error(row, envelope, "transfer", error)}
    return None, {}


def _identity(event: SnapshotRequested | SnapshotReady | ArchiveRequested) -> dict[str, Any]:
    return {"datacenter": event.datacenter, "label": event.source.label,
            "source": event.source.model_dump(mode="json")}


def _with_error(row: dict[str, Any], envelope: Envelope, stage: str,
                detail: dict[str, Any]) -> list[dict[str, Any]]:
    entry = {"stage": stage, "at": envelope.occurred_at.isoformat(), **detail}
    return [*row["errors"], entry][-MAX_JOB_ERRORS:]


def _new_job_defaults() -> dict[str, Any]:
    return {"bytes_done": 0, "progress_at": 0.0, "errors": [], "updated_at": time.time()}


def _locked_job(connection: Connection, migration_id: str, request_id: str) -> Any:
    # FOR UPDATE: two intake processes on one PostgreSQL database must not both append
    # an error to the same job from the same stale list (SQLite's BEGIN IMMEDIATE already
    # serialises writers).
    return connection.execute(
        select(migration_jobs)
        .where(migration_jobs.c.migration_id == migration_id,
               migration_jobs.c.request_id == request_id)
        .with_for_update()
    ).first()


def _update_job(connection: Connection, migration_id: str, request_id: str,
                changes: dict[str, Any]) -> None:
    connection.execute(
        update(migration_jobs)
        .where(migration_jobs.c.migration_id == migration_id,
               migration_jobs.c.request_id == request_id)
        .values(updated_at=time.time(), **changes)
    )


HANDLERS: dict[str, Handler] = {event_type: record_event for event_type in EVENTS}
