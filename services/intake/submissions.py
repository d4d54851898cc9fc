"""Accepting a migration document: store it exactly as received, announce it."""

from __future__ import annotations

import json
import time
import uuid

from sqlalchemy import insert

from services.intake.tables import migrations
from shared.contracts import MigrationSubmitted
from shared.document import MigrationDocument
from shared.inbox_outbox import UnitOfWork


def accept_document(body: bytes, document: MigrationDocument, *, uow: UnitOfWork,
                    migration_id: str | None = None) -> str:
    """Record a validated document as received and emit `migration.submitted`, in one
    transaction. Returns the new migration's id."""
    migration_id = migration_id or f"mig-{uuid.uuid4().hex[:12]}"
    now = time.time()
    with uow:
        uow.connection.execute(insert(migrations).values(
            id=migration_id, customer_id=document.customer.id, status="submitted",
            document=body.decode("utf-8"), created_at=now, updated_at=now,
        ))
        raw = json.loads(body)  # the resolver validates the same document again
        uow.outbox.add(MigrationSubmitted(customer_id=document.customer.id, document=raw),
                       migration_id=migration_id)
        uow.commit()
    return migration_id
