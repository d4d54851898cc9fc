"""The resolver service's handlers: plain functions, registered by event type at the bottom.

`resolve_migration` turns a submitted document into allocations, a resolved document and
one archive job per source. Everything it changes (the inbox claim, every allocation, the
outgoing events) commits in one transaction, or nothing does.
"""

from __future__ import annotations

import logging
import time
import uuid
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Connection, Engine, select

from services.resolver.allocation import Allocator, PoolExhaustedError
from services.resolver.inventory import Inventory
from services.resolver.planning import Plan, plan_archives
from services.resolver.resolution import needs_of, resolve_document
from services.resolver.tables import ID, resolutions
from shared.contracts import MigrationFailed, MigrationResolved, MigrationSubmitted
from shared.db import dialect_insert
from shared.document import MigrationDocument, validate_document
from shared.envelope import Envelope
from shared.errors import ConfigurationError, PermanentError
from shared.inbox_outbox import UnitOfWork, inbox_table
from shared.runtime import ServiceHandler

log = logging.getLogger(__name__)

STAGE = "resolve"


@dataclass(frozen=True)
class Resolver:
    """What the handlers need besides their unit of work (wired by bootstrap)."""

    engine: Engine
    allocator: Allocator
    inventory: Inventory | None  # None: FERRY_INVENTORY unset; every migration fails saying so

    def seen(self, message_id: uuid.UUID, handler: str) -> bool:
        with self.engine.connect() as connection:
            return connection.execute(
                select(inbox_table.c.message_id).where(
                    inbox_table.c.message_id == str(message_id),
                    inbox_table.c.handler == handler)).first() is not None


def resolve_migration(event: MigrationSubmitted, envelope: Envelope, *, uow: UnitOfWork,
                      resolver: Resolver) -> None:
    """Allocate, resolve and plan a submitted migration; emit migration.resolved and a
    snapshot.requested / archive.requested per job.

    Raises PermanentError (the bus emits migration.failed through `fail_migration`) for an
    invalid document or an entity the inventory lacks, TransientError when the inventory is
    unreachable. An exhausted pool fails the migration here, holding nothing.
    """
    migration_id = envelope.migration_id
    if resolver.seen(envelope.id, "resolve_migration"):
        return  # handled before: skip asking the inventory again
    document = _parse(event, migration_id)
    if resolver.inventory is None:
        raise ConfigurationError("FERRY_INVENTORY is not set: the resolver cannot read the "
                                 "old site's inventory")
    # Asked before the transaction opens, so no lock waits on the inventory.
    plan = plan_archives(document, resolver.inventory, migration_id)
    try:
        with uow:
            if not uow.inbox.claim(envelope.id, "resolve_migration"):
                return
            allocated = resolver.allocator.allocate(uow.connection, migration_id,
                                                    needs_of(document))
            resolved = MigrationResolved(
                customer_id=event.customer_id, allocations=allocated.as_payload(),
                resolved_document=resolve_document(document, allocated), jobs=plan.jobs)
            _emit(uow, resolved, plan, envelope)
            _record(uow.connection, migration_id, event.customer_id, envelope.id, resolved)
            uow.commit()
    except PoolExhaustedError as error:
        log.warning("resolver: migration %s failed: %s", migration_id, error)
        # The allocation rolled back; this second transaction only says so, once.
        with uow:
            if not uow.inbox.claim(envelope.id, "resolve_migration"):
                return
            uow.outbox.add(MigrationFailed(stage=STAGE, reason=str(error)),
                           migration_id=migration_id, cause=envelope)
            uow.commit()


def fail_migration(event: Any, envelope: Envelope, error: BaseException, *,
                   uow: UnitOfWork) -> None:
    """The bus gave up on a message: say migration.failed once, naming what went wrong."""
    reason = str(error) if isinstance(error, PermanentError) else (
        f"gave up retrying: {type(error).__name__}: {error}")
    with uow:
        if not uow.inbox.claim(envelope.id, "fail_migration"):
            return
        uow.outbox.add(MigrationFailed(stage=STAGE, reason=reason),
                       migration_id=envelope.migration_id, cause=envelope)
        uow.commit()


def _parse(event: MigrationSubmitted, migration_id: str) -> MigrationDocument:
    if not 0 < len(migration_id) <= ID:
        raise PermanentError(f"migration id must be 1 to {ID} characters, "
                             f"got {len(migration_id)}")
    document = validate_document(event.document)  # DocumentInvalidError is permanent
    if document.customer.id != event.customer_id:
        raise PermanentError(f"customer_id {event.customer_id!r} of the message is not the "
                             f"document's customer {document.customer.id!r}")
    return document


def _emit(uow: UnitOfWork, resolved: MigrationResolved, plan: Plan, cause: Envelope) -> None:
    # migration.resolved first: whoever follows the migration hears of it before its jobs.
    migration_id = cause.migration_id
    uow.outbox.add(resolved, migration_id=migration_id, cause=cause)
    for snapshot in plan.snapshots:
        uow.outbox.add(snapshot, migration_id=migration_id, cause=cause)
    for archive in plan.archives:
        uow.outbox.add(archive, migration_id=migration_id, cause=cause)


def _record(connection: Connection, migration_id: str, customer_id: str,
            message_id: uuid.UUID, resolved: MigrationResolved) -> None:
    values = {"migration_id": migration_id, "customer_id": customer_id,
              "message_id": str(message_id), "allocations": resolved.allocations,
              "jobs": [job.model_dump(mode="json") for job in resolved.jobs],
              "resolved_at": time.time()}
    insert = dialect_insert(connection, resolutions).values(values)
    # A replay keeps the same allocations; the jobs are what the inventory says now.
    connection.execute(insert.on_conflict_do_update(
        index_elements=[resolutions.c.migration_id],
        set_={"message_id": insert.excluded.message_id, "jobs": insert.excluded.jobs,
              "allocations": insert.excluded.allocations,
              "resolved_at": insert.excluded.resolved_at}))


HANDLERS: dict[str, ServiceHandler] = {MigrationSubmitted.TYPE: resolve_migration}
