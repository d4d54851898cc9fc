"""Intake's handlers: the status read model, kept from every event."""

from __future__ import annotations

import time

from sqlalchemy import insert, select, update

from services.intake.tables import migration_events, migrations
from shared.contracts import EVENTS, Event
from shared.envelope import Envelope
from shared.inbox_outbox import UnitOfWork

# What an event says about the migration as a whole; other events leave the status alone.
STATUS_AFTER = {
    "migration.submitted": "submitted",
    "migration.resolved": "archiving",
    "migration.failed": "failed",
    "migration.completed": "completed",
}
FINAL = {"failed", "completed"}


def record_event(event: Event, envelope: Envelope, *, uow: UnitOfWork) -> None:
    """Append the event to its migration's history and move the migration's status."""
    with uow:
        if not uow.inbox.claim(envelope.id, "record_event"):
            return  # seen before: already recorded
        connection = uow.connection
        connection.execute(insert(migration_events).values(
            message_id=str(envelope.id), migration_id=envelope.migration_id,
            type=envelope.type, payload=envelope.payload,
            occurred_at=envelope.occurred_at.timestamp(),
        ))
        now = time.time()
        current = connection.execute(
            select(migrations.c.status).where(migrations.c.id == envelope.migration_id)
        ).scalar_one_or_none()
        status = STATUS_AFTER.get(envelope.type)
        reason = getattr(event, "reason", None) if envelope.type == "migration.failed" else None
        if current is None:
            connection.execute(insert(migrations).values(
                id=envelope.migration_id, customer_id=getattr(event, "customer_id", ""),
                status=status or "submitted", reason=reason, created_at=now, updated_at=now,
            ))
        elif status and current not in FINAL:
            connection.execute(
                update(migrations).where(migrations.c.id == envelope.migration_id)
                .values(status=status, reason=reason, updated_at=now)
            )
        uow.commit()


HANDLERS = {event_type: record_event for event_type in EVENTS}
