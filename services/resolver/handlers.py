"""The resolver service's handlers: plain functions, registered by event type at the bottom.

`resolve_migration` turns a submitted document into allocations, a resolved document and
one archive job per source. Everything it changes (every allocation, the outgoing events)
commits in the runtime's one transaction, or nothing does.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
import uuid
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Connection, select

from services.resolver.allocation import Allocator, PoolExhaustedError
from services.resolver.inventory import Inventory
from services.resolver.planning import Plan, plan_archives
from services.resolver.resolution import needs_of, resolve_document
from services.resolver.tables import ID, resolutions
from shared.contracts import MigrationFailed, MigrationResolved, MigrationSubmitted
from shared.db import dialect_insert
from shared.document import MigrationDocument, validate_document
from shared.errors import ConfigurationError, PermanentError
from shared.runtime import Context, Handler

log = logging.getLogger(__name__)

STAGE = "resolve"


@dataclass(frozen=True)
class Resolver:
    """What the handlers need besides their unit of work (wired by bootstrap)."""

    allocator: Allocator
    inventory: Inventory | None  # None: FERRY_INVENTORY unset; every migration fails saying so


def resolve_migration(event: MigrationSubmitted, ctx: Context[Resolver]) -> None:
    """Allocate, resolve and plan a submitted migration; emit migration.resolved and a
    snapshot.requested / archive.requested per job.

    Raises PermanentError (the runtime emits migration.failed through `fail_migration`) for
    an invalid document, an entity the inventory lacks or old entities another customer
    owns (planning.NotOwnedError, before anything is allocated), TransientError when the
    inventory is unreachable. An exhausted pool fails the migration here, holding nothing.
    """
    resolver, migration_id = ctx.deps, ctx.migration_id
    document = _parse(event, migration_id)
    digest = document_digest(event.document)
    _refuse_another_document(ctx.connection, migration_id, event.customer_id, digest)
    if resolver.inventory is None:
        raise ConfigurationError("FERRY_INVENTORY is not set: the resolver cannot read the "
                                 "old site's inventory")
    plan = plan_archives(document, resolver.inventory, migration_id)
    allocating = ctx.connection.begin_nested()
    try:
        allocated = resolver.allocator.allocate(ctx.connection, migration_id,
                                                needs_of(document))
    except PoolExhaustedError as error:
        allocating.rollback()  # nothing held; the inbox claim stays, so this is said once
        log.warning("resolver: migration %s failed: %s", migration_id, error)
        ctx.emit(MigrationFailed(stage=STAGE, reason=str(error)))
        return
    allocating.commit()
    resolved = MigrationResolved(
        customer_id=event.customer_id, allocations=allocated.as_payload(),
        resolved_document=resolve_document(document, allocated), jobs=plan.jobs)
    _emit(ctx, resolved, plan)
    _record(ctx.connection, migration_id, event.customer_id, ctx.envelope.id, resolved, digest)


class ConflictingSubmissionError(PermanentError):
    """A migration.submitted for a migration id already resolved from another document (or
    for another customer): refused, and the migration that has the id is left alone."""


def document_digest(document: Any) -> str:
    """sha256 of the document's canonical JSON (key order and spacing do not count)."""
    canonical = json.dumps(document, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


def _refuse_another_document(connection: Connection, migration_id: str, customer_id: str,
                             digest: str) -> None:
    known = connection.execute(
        select(resolutions.c.customer_id, resolutions.c.document_sha256)
        .where(resolutions.c.migration_id == migration_id).with_for_update()).first()
    if known is None:
        return
    if known.customer_id != customer_id or known.document_sha256 not in (None, digest):
        raise ConflictingSubmissionError(
            f"migration {migration_id} was resolved from another document (customer "
            f"{known.customer_id!r}); a submission reusing its id is refused")


def fail_migration(event: Any, ctx: Context[Resolver], error: BaseException) -> None:
    """The bus gave up on a message: say migration.failed once, naming what went wrong —
    but never about a migration whose id a conflicting submission tried to reuse."""
    if isinstance(error, ConflictingSubmissionError):
        log.error("resolver: %s", error)
        return
    reason = str(error) if isinstance(error, PermanentError) else (
        f"gave up retrying: {type(error).__name__}: {error}")
    ctx.emit(MigrationFailed(stage=STAGE, reason=reason))


def _parse(event: MigrationSubmitted, migration_id: str) -> MigrationDocument:
    if not 0 < len(migration_id) <= ID:
        raise PermanentError(f"migration id must be 1 to {ID} characters, "
                             f"got {len(migration_id)}")
    document = validate_document(event.document)  # DocumentInvalidError is permanent
    if document.customer.id != event.customer_id:
        raise PermanentError(f"customer_id {event.customer_id!r} of the message is not the "
                             f"document's customer {document.customer.id!r}")
    return document


def _emit(ctx: Context[Resolver], resolved: MigrationResolved, plan: Plan) -> None:
    # migration.resolved first: whoever follows the migration hears of it before its jobs.
    ctx.emit(resolved)
    for snapshot in plan.snapshots:
        ctx.emit(snapshot)
    for archive in plan.archives:
        ctx.emit(archive)


def _record(connection: Connection, migration_id: str, customer_id: str,
            message_id: uuid.UUID, resolved: MigrationResolved, digest: str) -> None:
    values = {"migration_id": migration_id, "customer_id": customer_id,
              "document_sha256": digest,
              "message_id": str(message_id), "allocations": resolved.allocations,
              "jobs": [job.model_dump(mode="json") for job in resolved.jobs],
              "resolved_at": time.time()}
    insert = dialect_insert(connection, resolutions).values(values)
    # A replay keeps the same allocations; the jobs are what the inventory says now.
    connection.execute(insert.on_conflict_do_update(
        index_elements=[resolutions.c.migration_id],
        set_={"message_id": insert.excluded.message_id, "jobs": insert.excluded.jobs,
              "allocations": insert.excluded.allocations,
              "resolved_at": insert.excluded.resolved_at,
              "document_sha256": insert.excluded.document_sha256}))


HANDLERS: dict[str, Handler] = {MigrationSubmitted.TYPE: resolve_migration}
ON_FAILURE = fail_migration
