"""What the API shows: the status read model as response models, read from intake's tables."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from pydantic import BaseModel, Field
from sqlalchemy import Connection, select

from services.intake.tables import migration_events, migration_jobs, migrations


class Accepted(BaseModel):
    id: str
    status_url: str


class ErrorDetail(BaseModel):
    detail: str


class ProblemList(BaseModel):
    """The problems found in a request, each with an RFC 6901 JSON Pointer `path`: the first
    100 of a document's (`total` counts them all), or every one of a request's parameters."""

    errors: list[Problem]
    total: int | None = None
    truncated: bool = False


class Problem(BaseModel):
    path: str
    message: str


class MigrationSummary(BaseModel):
    id: str
    customer_id: str
    status: str = Field(description="submitted, archiving, completed or failed")
    reason: str | None
    created_at: datetime
    updated_at: datetime
    status_url: str


class MigrationList(BaseModel):
    migrations: list[MigrationSummary]


class JobView(BaseModel):
    request_id: str
    kind: str | None = Field(description="local_fs, shared_fs, database or db_server_root")
    datacenter: str | None
    label: str
    source: dict[str, Any] | None
    state: str = Field(description="planned, snapshotting, snapshotted, queued, archiving, "
                                   "archived, retrying, transferring, transferred or failed")
    stage: str | None = Field(description="what bytes_done counts: archive or transfer")
    bytes_done: int
    bytes_total: int | None
    mb_per_s: float | None
    snapshot: dict[str, Any] | None
    archive: dict[str, Any] | None
    transfer: dict[str, Any] | None
    errors: list[dict[str, Any]]
    updated_at: datetime


class EventSeen(BaseModel):
    id: str
    type: str
    occurred_at: datetime


class MigrationStatus(MigrationSummary):
    allocations: dict[str, Any] | None
    jobs: list[JobView]
    events: list[EventSeen]


ProblemList.model_rebuild()


def status_url(migration_id: str) -> str:
    return f"/migrations/{migration_id}"


def _when(timestamp: float) -> datetime:
    return datetime.fromtimestamp(timestamp, UTC)


def _summary(row: Any) -> dict[str, Any]:
    return {"id": row.id, "customer_id": row.customer_id, "status": row.status,
            "reason": row.reason, "created_at": _when(row.created_at),
            "updated_at": _when(row.updated_at), "status_url": status_url(row.id)}


def list_migrations(connection: Connection, *, limit: int,
                    customer_id: str | None = None) -> MigrationList:
    """The newest `limit` migrations, newest first (optionally of one customer)."""
    m = migrations
    query = select(m.c.id, m.c.customer_id, m.c.status, m.c.reason, m.c.created_at,
                   m.c.updated_at).order_by(m.c.created_at.desc(), m.c.id).limit(limit)
    if customer_id is not None:
        query = query.where(m.c.customer_id == customer_id)
    rows = connection.execute(query).all()
    return MigrationList(migrations=[MigrationSummary(**_summary(row)) for row in rows])


def migration_status(connection: Connection, migration_id: str) -> MigrationStatus | None:
    """The migration, its allocations, jobs and history; None when there is no such one."""
    m = migrations
    row = connection.execute(
        select(m.c.id, m.c.customer_id, m.c.status, m.c.reason, m.c.created_at,
               m.c.updated_at, m.c.allocations).where(m.c.id == migration_id)
    ).first()
    if row is None:
        return None
    j = migration_jobs
    jobs = connection.execute(
        select(j).where(j.c.migration_id == migration_id).order_by(j.c.kind, j.c.request_id)
    ).all()
    e = migration_events
    events = connection.execute(
        select(e.c.message_id, e.c.type, e.c.occurred_at)
        .where(e.c.migration_id == migration_id).order_by(e.c.occurred_at, e.c.message_id)
    ).all()
    return MigrationStatus(
        **_summary(row), allocations=row.allocations,
        jobs=[JobView(**{**job._mapping, "updated_at": _when(job.updated_at)}) for job in jobs],
        events=[EventSeen(id=ev.message_id, type=ev.type, occurred_at=_when(ev.occurred_at))
                for ev in events],
    )


def migration_exists(connection: Connection, migration_id: str) -> bool:
    return connection.execute(
        select(migrations.c.id).where(migrations.c.id == migration_id)).first() is not None


def stored_document(connection: Connection, migration_id: str) -> str | None:
    """The document exactly as it was submitted; None for an unknown migration (or one
    intake heard of only from events)."""
    document: str | None = connection.execute(
        select(migrations.c.document).where(migrations.c.id == migration_id)
    ).scalar_one_or_none()
    return document
