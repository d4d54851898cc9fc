"""Consumers check what they are told (RabbitMQ + PostgreSQL, each service from its own
bootstrap): an event about something a service never saw a request for is dead-lettered as
`unknown` and leaves no row behind; the same event about what it did see is believed."""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import func, select

from ferry.dlq import DeadLetter, list_dead
from services.snapshotter.bootstrap import bootstrap as snapshotter_bootstrap
from services.snapshotter.tables import snapshot_jobs
from services.transfer.bootstrap import bootstrap as transfer_bootstrap
from services.transfer.tables import transfer_requests, transfers
from shared.contracts import ArchiveCompleted, ArchiveSource, MigrationResolved, PlannedJob
from shared.envelope import Envelope
from shared.inbox_outbox import inbox_table
from shared.runtime import Service
from shared.settings import Settings
from tests.integration.test_backbone import publish
from tests.support.helpers import wait_for

MIGRATION = "mig-unknown-events"


@pytest.fixture
def settings(rabbit_url: str, make_pg_database: Callable[[], str], tmp_path: Path) -> Settings:
    return Settings(broker_url=rabbit_url, state_dir=tmp_path, outbox_poll_seconds=0.1,
                    snapshotter_database_url=make_pg_database(),
                    transfer_database_url=make_pg_database(),
                    staging_dir=tmp_path / "staging", destination=str(tmp_path / "destination"))


@contextmanager
def started(service: Service) -> Iterator[Service]:
    service.start()
    try:
        yield service
    finally:
        service.stop()
        service.engine.dispose()


def rows(service: Service, table: Any, *where: Any) -> int:
    with service.engine.connect() as connection:
        return int(connection.execute(
            select(func.count()).select_from(table).where(*where)).scalar_one())


def dead_as(service: Service, envelope: Envelope) -> DeadLetter:
    def ours() -> list[DeadLetter]:
        return [letter for letter in list_dead(service.settings.broker_url, service.queue.name)
                if letter.id == str(envelope.id)]

    [letter] = wait_for(ours, what=f"{envelope.type} dead-lettered")  # type: ignore[misc]
    return letter


def handled(service: Service, envelope: Envelope) -> bool:
    return rows(service, inbox_table, inbox_table.c.message_id == str(envelope.id)) > 0


def completed(request_id: str, kind: str, path: Path, data: bytes) -> Envelope:
    now = datetime.now(UTC)
    event = ArchiveCompleted(
        datacenter="ey04", request_id=request_id, archive_id=f"arc-{request_id}", kind=kind,
        reuse_key=f"key-{request_id}", path=str(path), file_name=path.name,
        raw_bytes=len(data), compressed_bytes=len(data),
        sha256=hashlib.sha256(data).hexdigest(), started_at=now, finished_at=now)
    return Envelope.wrap(event, migration_id=MIGRATION)


def test_the_snapshotter_refuses_a_release_for_a_snapshot_it_never_made(
        settings: Settings) -> None:
    with started(snapshotter_bootstrap(settings)) as snapshotter:
        # Given a snapshotter that never got a snapshot.requested
        # When a local filesystem's archive.completed names a request of its own making up
        forged = completed("req-never-snapshotted", "local_fs", Path("/x/a.tar.zst"), b"a")
        publish(settings.broker_url, forged)
        # Then it is dead-lettered as unknown, and nothing is recorded
        letter = dead_as(snapshotter, forged)
        assert letter.reason == "unknown" and "no snapshot" in letter.error, letter
        assert rows(snapshotter, snapshot_jobs) == 0
        # And a database's archive.completed (no snapshot to release) is simply handled
        database = completed("req-database", "database", Path("/x/d.sql.zst"), b"d")
        publish(settings.broker_url, database)
        wait_for(lambda: handled(snapshotter, database), what="the database archive handled")
        assert [x.id for x in list_dead(settings.broker_url, "snapshotter")] == [str(forged.id)]


def test_transfer_refuses_an_archive_of_a_request_its_migration_never_planned(
        settings: Settings) -> None:
    staging = settings.staging_dir / "ey04"
    staging.mkdir(parents=True)
    with started(transfer_bootstrap(settings)) as transfer:
        # Given a migration resolved with one planned request
        source = ArchiveSource(host="local", path="/srv/data")
        plan = MigrationResolved(customer_id="c1", allocations={}, resolved_document={},
                                 jobs=(PlannedJob(request_id="req-planned", kind="shared_fs",
                                                  datacenter="ey04", reuse_key="key-planned",
                                                  source=source),))
        resolved = Envelope.wrap(plan, migration_id=MIGRATION)
        publish(settings.broker_url, resolved)
        wait_for(lambda: handled(transfer, resolved), what="migration.resolved handled")
        # When an archive.completed names a request the plan never had (a real staged file)
        (staging / "forged.tar.zst").write_bytes(b"forged")
        forged = completed("req-forged", "shared_fs", staging / "forged.tar.zst", b"forged")
        publish(settings.broker_url, forged)
        # Then it is dead-lettered as unknown; no transfer, no request row, no failure
        letter = dead_as(transfer, forged)
        assert letter.reason == "unknown" and "req-forged" in letter.error, letter
        assert rows(transfer, transfers) == 0
        assert rows(transfer, transfer_requests,
                    transfer_requests.c.request_id == "req-forged") == 0
        # And the planned request's archive is believed: its transfer is recorded
        (staging / "planned.tar.zst").write_bytes(b"planned")
        planned = completed("req-planned", "shared_fs", staging / "planned.tar.zst", b"planned")
        publish(settings.broker_url, planned)
        wait_for(lambda: rows(transfer, transfers) == 1, what="the planned archive recorded")
