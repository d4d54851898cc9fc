"""Handlers and the transfer ledger on a real SQLite database: which requests are
transferred, and migration.completed / migration.failed announced exactly once."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import func, select, update

from services.transfer import SCHEMA as TRANSFER_SCHEMA
from services.transfer.attempts import Attempt
from services.transfer.destination import UnsafeNameError, parse_destination
from services.transfer.handlers import HANDLERS, ON_FAILURE, Receiving, transfer_id
from services.transfer.jobs import TransferLeases, fail_transfer, transferred
from services.transfer.tables import transfer_requests, transfers
from shared import runtime
from shared.contracts import (
    ArchiveCompleted,
    ArchiveFailed,
    ArchiveSource,
    Event,
    MigrationResolved,
    PlannedJob,
)
from shared.db import make_engine, upgrade
from shared.envelope import Envelope
from shared.inbox_outbox import Units, outbox_table
from shared.jobs import RUNNING, JobWorker, Lease
from shared.retry import RetryPolicy
from shared.settings import Settings

SHA = "ab" * 32
DEST = "/srv/dest"
DESTINATION = parse_destination(DEST, Settings())
RECEIVING = Receiving(DESTINATION, Path("/staging"))


@pytest.fixture
def units(tmp_path: Path) -> Iterator[Units]:
    engine = make_engine(f"sqlite:///{tmp_path}/transfer.sqlite3")
    upgrade(engine, TRANSFER_SCHEMA)
    yield Units(engine)
    engine.dispose()


def resolved(*request_ids: str, migration: str = "m-1") -> Envelope:
    jobs = tuple(PlannedJob(request_id=r, kind="shared_fs", datacenter="ey04", reuse_key=r,
                            source=ArchiveSource(host="local")) for r in request_ids)
    event = MigrationResolved(customer_id="c", allocations={}, resolved_document={}, jobs=jobs)
    return Envelope.wrap(event, migration_id=migration)


def completed(request_id: str, archive_id: str, *, size: int = 1000, file_name: str = "",
              migration: str = "m-1", path: str = "", sha256: str = SHA) -> Envelope:
    now = datetime.now(UTC)
    event = ArchiveCompleted(
        datacenter="ey04", request_id=request_id, archive_id=archive_id, kind="shared_fs",
        reuse_key=archive_id, path=path or f"/staging/{archive_id}.tar.zst",
        file_name=file_name or f"{archive_id}.tar.zst", raw_bytes=size, compressed_bytes=size,
        sha256=sha256, started_at=now, finished_at=now)
    return Envelope.wrap(event, migration_id=migration)


def deliver(units: Units, envelope: Envelope) -> bool:
    """Handle one message as the consumer would; False for a duplicate."""
    return runtime.deliver(HANDLERS[envelope.type], envelope.event(), envelope, units, RECEIVING)


def finish(units: Units, migration: str, archive_id: str) -> None:
    """What the worker does after a verified copy, without the copy."""
    leases = TransferLeases(units.engine, 30, 2)
    row = leases.claim("worker-1", transfers.c.id == transfer_id(migration, archive_id))
    assert row is not None
    lease = Lease(leases, row, "worker-1", units)
    outcome = transferred(lease, Attempt.start(lease), DESTINATION,
                          f"{DEST}/{migration}/{archive_id}.tar.zst", SHA)
    worker = JobWorker(leases, lambda _: outcome, units=units, name="test",
                       policy=RetryPolicy.exponential(1, 1, 3), fail=fail_transfer)
    worker.settle(lease, outcome)


def events(units: Units, kind: str) -> list[dict[str, Any]]:
    with units.engine.connect() as connection:
        bodies = connection.execute(select(outbox_table.c.body).where(
            outbox_table.c.routing_key == kind).order_by(outbox_table.c.seq)).scalars()
        return [json.loads(body) for body in bodies]


def count(units: Units, table: Any) -> int:
    with units.engine.connect() as connection:
        return int(connection.execute(select(func.count()).select_from(table)).scalar_one())


def test_redelivered_archive_completed_records_one_transfer(units: Units) -> None:
    envelope = completed("r1", "a1")
    assert deliver(units, envelope)
    assert not deliver(units, envelope)
    assert count(units, transfers) == 1 and count(units, transfer_requests) == 1
    with units.engine.connect() as connection:
        job = connection.execute(select(transfers)).one()
    assert job.destination == DEST and job.bytes_total == 1000 and job.payload["sha256"] == SHA


def test_migration_completes_once_when_every_expected_request_is_transferred(units: Units) -> None:
    # Given a migration expecting r1 and r2 (one shared archive a1) and r3 (archive a2)
    deliver(units, resolved("r1", "r2", "r3"))
    deliver(units, completed("r1", "a1", size=100))
    deliver(units, completed("r3", "a2", size=50))
    # When a1 is sent, then only r1 is transferred and the migration is not complete
    finish(units, "m-1", "a1")
    assert [e["payload"]["request_id"] for e in events(units, "transfer.completed")] == ["r1"]
    assert events(units, "migration.completed") == []
    # When r2 names the archive already sent, then it counts as transferred at once
    deliver(units, completed("r2", "a1", size=100))
    assert count(units, transfers) == 2  # still one transfer for a1
    assert [e["payload"]["request_id"] for e in events(units, "transfer.completed")] == [
        "r1", "r2"]
    # When the last archive is sent, then migration.completed, with totals, exactly once
    finish(units, "m-1", "a2")
    done = events(units, "migration.completed")
    assert [e["payload"] for e in done] == [{"archives": 2, "bytes": 150}]
    assert done[0]["migration_id"] == "m-1"
    deliver(units, resolved("r1", "r2", "r3"))  # a different message, same content
    assert len(events(units, "migration.completed")) == 1


def test_archives_sent_before_the_migration_resolved_complete_it_on_resolution(
    units: Units,
) -> None:
    deliver(units, completed("r1", "a1"))
    finish(units, "m-1", "a1")
    assert events(units, "migration.completed") == []  # nobody said r1 was all
    deliver(units, resolved("r1"))
    assert len(events(units, "migration.completed")) == 1


def test_final_archive_failures_fail_the_migration_once(units: Units) -> None:
    deliver(units, resolved("r1", "r2"))
    for request_id, will_retry in [("r1", True), ("r1", False), ("r2", False)]:
        deliver(units, Envelope.wrap(ArchiveFailed(
            datacenter="ey04", request_id=request_id, kind="database", reason="mysqldump: 2",
            will_retry=will_retry), migration_id="m-1"))
    failed = events(units, "migration.failed")
    assert [e["payload"] for e in failed] == [
        {"stage": "archive", "reason": "database r1: mysqldump: 2"}]


def test_archive_named_unsafely_is_refused_and_fails_its_request(units: Units) -> None:
    # Given an archive.completed whose file name would leave the migration's directory
    envelope = completed("r1", "a1", file_name="../../etc/passwd")
    # When it is handled, then it is refused naming the problem, and nothing is recorded
    with pytest.raises(UnsafeNameError, match="archive file name '../../etc/passwd'"):
        deliver(units, envelope)
    assert count(units, transfers) == 0
    # And the bus's failure hook turns it into transfer.failed and migration.failed
    event: Event = envelope.event()
    assert runtime.deliver_failure(ON_FAILURE, event, envelope, UnsafeNameError("bad name"),
                                   units, RECEIVING)
    assert events(units, "transfer.failed")[0]["payload"]["reason"] == "bad name"
    assert events(units, "migration.failed")[0]["payload"]["stage"] == "transfer"


def test_claims_never_run_more_transfers_per_destination_than_allowed(units: Units) -> None:
    # Given three archives for one destination and a limit of two running transfers
    for index in range(3):
        deliver(units, completed(f"r{index}", f"a{index}"))
    leases = TransferLeases(units.engine, lease_seconds=30, max_parallel=2)
    # When three workers claim, then only two get a job
    claimed = [leases.claim(f"w{index}") for index in range(3)]
    assert [row is not None for row in claimed] == [True, True, False]
    # When one running transfer's lease expires (its worker died), then its job is taken over
    first = claimed[0]
    assert first is not None
    with units.engine.begin() as connection:
        connection.execute(update(transfers).where(transfers.c.id == first.id)
                           .values(lease_expires_at=time.time() - 1))
    taken = leases.claim("w3")
    assert taken is not None and taken.id == first.id and taken.state == RUNNING
    assert leases.claim("w4") is None
