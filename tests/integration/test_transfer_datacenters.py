"""Transfer per datacenter, on RabbitMQ + PostgreSQL: each datacenter's transfer consumes
`transfer.<dc>`, claims only its datacenter's jobs and reads only `<staging>/<dc>`; a
datacenter whose transfer is not running keeps its archives in its queue until it starts.
The negative control shows what the old, datacenter-blind worker did to another
datacenter's archive: claimed it first (it is the oldest job) and failed it for good."""

from __future__ import annotations

import logging
import uuid
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select

from ferry.cli import main
from ferry.dlq import list_dead
from services.transfer.jobs import TransferContext, TransferLeases, destination_pool, run_transfer
from services.transfer.tables import transfers
from shared.bus import connect, declare_standing
from shared.contracts import ArchiveCompleted, ArchiveSource, MigrationResolved, PlannedJob
from shared.digests import file_sha256
from shared.envelope import Envelope
from shared.jobs import Failed, Lease, worker_id
from shared.runtime import Service
from shared.settings import Settings
from shared.topology import EVENTS_EXCHANGE
from tests.integration.test_backbone import publish
from tests.integration.test_transfer import emitted, make_archive, start, wait_job
from tests.integration.test_transfer import services as services  # noqa: F401 - fixture
from tests.support.helpers import wait_for

KiB = 1 << 10
DCS = ("ey04", "ey02")


@pytest.fixture
def settings(tmp_path: Path, rabbit_url: str, make_pg_database: Callable[[], str]) -> Settings:
    """Both datacenters' transfers on one transfer database and broker; each datacenter's
    staging its own directory under the staging root; their queues declared up front, as
    the resolver does from the inventory."""
    for dc in DCS:
        (tmp_path / "staging" / dc).mkdir(parents=True)
    values = Settings(broker_url=rabbit_url, transfer_database_url=make_pg_database(),
                      state_dir=tmp_path / "state", staging_dir=tmp_path / "staging",
                      destination=str(tmp_path / "destination"), retry_delays=[0.5, 1],
                      outbox_poll_seconds=0.1, job_poll_seconds=0.1, lease_seconds=3.0,
                      transfer_backoff_seconds=0.2, transfer_progress_seconds=0.5)
    declare_standing(rabbit_url, values, DCS)
    return values


class Migration:
    """One migration with requests in both datacenters, as the resolver and each
    datacenter's archivers publish it."""

    def __init__(self, settings: Settings, requests: dict[str, str]) -> None:
        self.settings = settings
        self.id = f"m-{uuid.uuid4().hex[:12]}"
        self.requests = requests  # request id -> datacenter

    def resolve(self) -> None:
        jobs = tuple(PlannedJob(request_id=r, kind="shared_fs", datacenter=dc, reuse_key=r,
                                source=ArchiveSource(host="local"))
                     for r, dc in self.requests.items())
        self._publish(MigrationResolved(customer_id="c", allocations={},
                                        resolved_document={}, jobs=jobs))

    def archive(self, request_id: str) -> Path:
        """Its archive, staged in its datacenter's staging, announced complete."""
        dc = self.requests[request_id]
        path, digest = make_archive(self.settings.staging_dir / dc, 64 * KiB,
                                    f"{request_id}.tar.zst")
        now = datetime.now(UTC)
        self._publish(ArchiveCompleted(
            datacenter=dc, request_id=request_id, archive_id=f"a-{request_id}",
            kind="shared_fs", reuse_key=request_id, path=str(path), file_name=path.name,
            raw_bytes=path.stat().st_size, compressed_bytes=path.stat().st_size,
            sha256=digest, started_at=now, finished_at=now))
        return path

    def _publish(self, event: Any) -> None:
        publish(self.settings.broker_url, Envelope.wrap(event, migration_id=self.id))


def jobs(service: Service) -> dict[str, Any]:
    with service.engine.connect() as connection:
        return {job.archive_id: job for job in connection.execute(select(transfers))}


def waiting(broker_url: str, queue: str) -> int:
    """Messages ready in `queue` (no consumer holds them)."""
    with connect(broker_url) as connection:
        channel = connection.channel()
        return int(channel.queue_declare(queue=queue, passive=True).message_count)


def test_a_datacenters_archives_wait_for_its_own_transfer_and_the_others_complete(
        settings: Settings, services: list[Service], tmp_path: Path) -> None:  # noqa: F811
    # Given ey04's transfer running and ey02's not (its queue declared, no consumer)
    ey04 = start(settings, services, datacenter="ey04")
    # When a migration with requests in both datacenters is planned and archived
    migration = Migration(settings, {"r4a": "ey04", "r4b": "ey04", "r2": "ey02"})
    migration.resolve()
    staged = {r: migration.archive(r) for r in migration.requests}
    # Then ey04's archives arrive, by ey04's transfer, its jobs ey04's
    for request in ("r4a", "r4b"):
        job = wait_job(ey04, f"a-{request}", "done")
        assert job.datacenter == "ey04" and job.attempts == 1
    # ... while ey02's archive waits in transfer.ey02 (the plan and its archive.completed):
    # no job was recorded for it, nothing failed, the migration is not complete
    assert waiting(settings.broker_url, "transfer.ey02") == 2
    assert "a-r2" not in jobs(ey04)
    assert emitted(ey04, "migration.completed") == [] == emitted(ey04, "transfer.failed")
    # When ey02's transfer starts
    ey02 = start(settings, services, datacenter="ey02")
    # Then ey02's archive is recorded as ey02's and sent, and the migration completes, once
    job = wait_job(ey02, "a-r2", "done")
    assert job.datacenter == "ey02"
    wait_for(lambda: len(emitted(ey02, "migration.completed")) == 1, what="migration completed")
    destination = tmp_path / "destination" / migration.id
    for request, path in staged.items():
        assert file_sha256(destination / path.name) == file_sha256(path), request
    assert len(emitted(ey02, "transfer.completed")) == 3
    assert emitted(ey02, "transfer.failed") == [] == emitted(ey02, "migration.failed")
    wait_for(lambda: waiting(settings.broker_url, "transfer.ey02") == 0, what="ey02 drained")
    for dc in DCS:
        assert list_dead(settings.broker_url, f"transfer.{dc}") == [], dc


def test_a_worker_given_the_other_datacenters_archive_never_claims_it(
        settings: Settings, services: list[Service]) -> None:  # noqa: F811
    # Given ey04's transfer, one worker thread, hearing ey02's archives too (a mis-bound
    # queue: its handler records the job, as the archive's, ey02's)
    with connect(settings.broker_url) as connection:
        connection.channel().queue_bind("transfer.ey04", EVENTS_EXCHANGE.name,
                                        "archive.completed.ey02")
    ey04 = start(settings, services, datacenter="ey04", concurrency=1)
    migration = Migration(settings, {"r2": "ey02", "r4": "ey04"})
    migration.resolve()
    other = migration.archive("r2")  # first: the oldest job, the one a blind worker takes
    wait_for(lambda: "a-r2" in jobs(ey04), what="ey02's job recorded")
    migration.archive("r4")
    # Then ey04's own archive is sent, and ey02's job was never claimed by it
    wait_job(ey04, "a-r4", "done")
    job = jobs(ey04)["a-r2"]
    assert (job.datacenter, job.state, job.attempts, job.lease_owner) == (
        "ey02", "pending", 0, None)
    # ... nor is it, by ey04's leases, ever
    leases = TransferLeases(ey04.engine, 3.0, 2, "ey04")
    assert leases.claim(worker_id()) is None
    # Negative control: the datacenter-blind leases of before take it, and an attempt from
    # ey04's staging fails it for good: the file is not in the staging it may read
    blind = TransferLeases(ey04.engine, 3.0, 2)
    claimed = blind.claim(owner := worker_id())
    assert claimed is not None and claimed.archive_id == "a-r2"
    context = TransferContext(settings, destination_pool(settings),
                              staging=settings.staging_dir.absolute() / "ey04")
    outcome = run_transfer(Lease(blind, claimed, owner, ey04.units), context)
    assert isinstance(outcome, Failed) and "not in the staging directory" in str(
        outcome.error), outcome
    assert str(other) in str(outcome.error)
    context.stop()


def test_transfer_claims_count_running_transfers_per_datacenter_link(
        settings: Settings, services: list[Service]) -> None:  # noqa: F811
    # Given one destination, a limit of one transfer per link, and ey02's link busy
    ey04 = start(settings, services, datacenter="ey04", concurrency=1)
    ey04.stop()  # its tables made; its workers stopped: the claims below are the test's
    services.remove(ey04)
    migration = Migration(settings, {})
    rows = [{"id": f"j-{dc}-{n}", "datacenter": dc} for dc in DCS for n in range(2)]
    now = datetime.now(UTC).timestamp()
    with ey04.engine.begin() as connection:
        for row in rows:
            connection.execute(transfers.insert().values(
                **row, migration_id=migration.id, kind="shared_fs", state="pending",
                payload={}, attempts=0, next_run_at=now, bytes_done=0, created_at=now,
                updated_at=now, archive_id=row["id"], destination=settings.destination,
                verify_failures=0))
    per_dc = {dc: TransferLeases(ey04.engine, 30.0, 1, dc) for dc in DCS}
    first = per_dc["ey02"].claim(worker_id())
    assert first is not None and first.datacenter == "ey02"
    # Then ey02's link is full, ey04's is not: each datacenter claims within its own link
    assert per_dc["ey02"].claim(worker_id()) is None
    second = per_dc["ey04"].claim(worker_id())
    assert second is not None and second.datacenter == "ey04"
    assert per_dc["ey04"].claim(worker_id()) is None
    ey04.engine.dispose()


def test_ferry_run_transfer_without_a_datacenter_is_refused_naming_the_option(
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    # Given no FERRY_DATACENTER
    monkeypatch.delenv("FERRY_DATACENTER", raising=False)
    monkeypatch.setenv("FERRY_BROKER_URL", "memory://")
    handlers = list(logging.getLogger().handlers)
    # When transfer is run without --datacenter, then it refuses before starting anything
    assert main(["run", "transfer"]) == 1
    assert "give --datacenter DC" in " ".join(capsys.readouterr().out.split())
    # And this process's logging is as it was (no handler left on the captured stderr)
    assert logging.getLogger().handlers == handlers


def test_jobs_recorded_before_take_their_archives_datacenter_on_upgrade(
        make_pg_database: Callable[[], str]) -> None:
    # Given a transfer database at the revision before, holding jobs of ey02's and ey04's
    # archives
    from alembic import command
    from alembic.config import Config
    from sqlalchemy import text

    from services.transfer import SCHEMA
    from shared.db import make_engine, upgrade

    engine = make_engine(make_pg_database())
    config = Config()
    config.set_main_option("script_location", str(SCHEMA.migrations))
    config.attributes["version_table"] = "alembic_version_transfer"
    with engine.connect() as connection:
        config.attributes["connection"] = connection
        command.upgrade(config, "transfer_0002")
        connection.execute(text(
            "INSERT INTO transfers (id, migration_id, kind, state, payload, attempts, "
            "next_run_at, bytes_done, created_at, updated_at, archive_id, destination, "
            "verify_failures) VALUES ('j1', 'm1', 'shared_fs', 'pending', "
            "'{\"datacenter\": \"ey02\"}', 0, 0, 0, 0, 0, 'a1', '/d', 0), ('j2', 'm2', "
            "'shared_fs', 'pending', '{\"datacenter\": \"ey04\"}', 0, 0, 0, 0, 0, 'a2', "
            "'/d', 0)"))
        connection.commit()
    # When it is upgraded, then each job is its archive's datacenter's: only its workers
    # claim it
    upgrade(engine, SCHEMA)
    with engine.connect() as connection:
        assert connection.execute(select(transfers.c.datacenter).order_by(transfers.c.id)
                                  ).scalars().all() == ["ey02", "ey04"]
    assert TransferLeases(engine, 3.0, 2, "ey03").claim(worker_id()) is None
    claimed = TransferLeases(engine, 3.0, 2, "ey02").claim(worker_id())
    assert claimed is not None and claimed.id == "j1"
    assert TransferLeases(engine, 3.0, 2, "ey02").claim(worker_id()) is None
    engine.dispose()
