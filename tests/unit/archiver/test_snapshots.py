"""Local filesystem archives of dm/lvm snapshots: what an invalidated or replaced snapshot
does to the archive job (on the embedded database; the mount itself is proven in tests/lab)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Engine, select

from services.archiver import SCHEMA as ARCHIVER_SCHEMA
from services.archiver.bootstrap import bootstrap
from services.archiver.handlers import note_snapshot_released, record_snapshot_ready
from services.archiver.jobs import Archiver
from services.archiver.snapshots import SnapshotInvalidatedError
from services.archiver.tables import archive_jobs, archive_requests
from shared.addresses import host_pool
from shared.contracts import ArchiveSource, SnapshotReady, SnapshotReleased
from shared.envelope import Envelope
from shared.errors import TransientError
from shared.inbox_outbox import Units, outbox_table
from shared.jobs import Failed, JobWorker, Lease, Leases
from shared.retry import RetryPolicy
from shared.runtime import deliver, open_database
from shared.settings import Settings


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return Settings(state_dir=tmp_path, staging_dir=tmp_path / "staging")


@pytest.fixture
def units(settings: Settings) -> Iterator[Units]:
    units = open_database(settings, ARCHIVER_SCHEMA)
    yield units
    units.engine.dispose()


@pytest.fixture
def engine(units: Units) -> Engine:
    return units.engine


@pytest.fixture
def worker(settings: Settings, units: Units) -> JobWorker:
    """The archiver's job worker as bootstrap builds it, run by hand (no threads)."""
    archiver = Archiver(settings, units.engine, "ey04", host_pool(settings))
    return JobWorker(Leases(units.engine, archive_jobs, 30.0), archiver.run, units=units,
                     policy=RetryPolicy((0.1,), 3), name="archiver-test", fail=archiver.fail)


def send_ready(engine: Engine, snapshot_id: str, request_id: str = "r1") -> None:
    event = SnapshotReady(datacenter="ey04", request_id=request_id, snapshot_id=snapshot_id,
                          driver="dm", host="root@xen1", export_name=snapshot_id, port=10809,
                          size_bytes=1 << 30, reuse_key=f"local:{request_id}",
                          source=ArchiveSource(host="root@xen1", device="/dev/vg0/vm1"))
    deliver(record_snapshot_ready, event, Envelope.wrap(event, migration_id="m"), Units(engine))


def send_released(engine: Engine, snapshot_id: str, invalidated: bool = True) -> None:
    event = SnapshotReleased(request_id="r1", snapshot_id=snapshot_id, host="root@xen1",
                             reason="COW full: snapshot invalidated", invalidated=invalidated)
    deliver(note_snapshot_released, event, Envelope.wrap(event, migration_id="m"),
            Units(engine))


def claim(worker: JobWorker) -> Lease:
    job = worker.leases.claim("worker-1")
    assert job is not None
    return Lease(worker.leases, job, "worker-1", worker.units)


def answers(engine: Engine) -> list[dict[str, Any]]:
    with engine.connect() as connection:
        bodies = connection.execute(select(outbox_table.c.body)).scalars()
        return [json.loads(body) for body in bodies]


def job_row(engine: Engine) -> Any:
    with engine.connect() as connection:
        return connection.execute(select(archive_jobs)).one()


def test_archive_failing_on_an_invalidated_snapshot_says_it_will_be_retried(
    engine: Engine, worker: JobWorker,
) -> None:
    # Given an archive running on snapshot 1
    send_ready(engine, "ferry-j1-1")
    lease = claim(worker)
    # When the snapshotter invalidates snapshot 1 and reading it then fails for good
    send_released(engine, "ferry-j1-1")
    worker.settle(lease, Failed(TransientError("tar: read error")))
    # Then archive.failed names the snapshot and its invalidation, with will_retry
    [failed] = answers(engine)
    assert failed["type"] == "archive.failed"
    payload = failed["payload"]
    assert payload["will_retry"] and payload["snapshot_id"] == "ferry-j1-1"
    assert "COW full" in payload["reason"] and "tar: read error" in payload["reason"]
    assert job_row(engine).state == "failed"
    # ... and the next snapshot.ready for the failed request runs the job again from it
    send_ready(engine, "ferry-j1-2")
    job = job_row(engine)
    assert (job.state, job.attempts) == ("pending", 0)
    assert job.payload["snapshot"]["snapshot_id"] == "ferry-j1-2"
    assert not job.payload["snapshot"]["invalidated"]


def test_pending_archive_of_an_invalidated_snapshot_fails_at_once_with_will_retry(
    engine: Engine, settings: Settings, worker: JobWorker,
) -> None:
    # Given a pending archive whose snapshot the snapshotter invalidated
    send_ready(engine, "ferry-j1-1")
    send_released(engine, "ferry-j1-1")
    # When a worker runs it: it refuses to read it, at once (permanent), nothing is attached
    assert worker.run_one("worker-1")
    [failed] = answers(engine)
    assert failed["payload"]["will_retry"] and failed["payload"]["snapshot_id"] == "ferry-j1-1"
    assert failed["payload"]["reason"].startswith("SnapshotInvalidatedError: ")
    assert "COW full" in failed["payload"]["reason"]
    assert (job_row(engine).state, job_row(engine).attempts) == ("failed", 1)
    assert not list((settings.state_dir / "nbd").glob("*"))


def test_plain_release_or_release_of_another_snapshot_changes_nothing(engine: Engine) -> None:
    send_ready(engine, "ferry-j1-2")
    send_released(engine, "ferry-j1-2", invalidated=False)
    send_released(engine, "ferry-j1-1")  # an older attempt's snapshot
    assert job_row(engine).payload["snapshot"]["invalidated"] == ""


def test_new_snapshot_while_the_archive_runs_on_the_old_one_runs_it_again_without_answer(
    engine: Engine, worker: JobWorker,
) -> None:
    # Given an archive running on snapshot 1, whose request got snapshot 2 meanwhile
    send_ready(engine, "ferry-j1-1")
    lease = claim(worker)
    send_ready(engine, "ferry-j1-2")
    assert job_row(engine).state == "running"
    # When reading snapshot 1 fails for good
    worker.settle(lease, Failed(SnapshotInvalidatedError("gone")))
    # Then the job runs again from snapshot 2, and the request still waits, unanswered
    job = job_row(engine)
    assert (job.state, job.attempts, job.lease_owner) == ("pending", 0, None)
    assert job.payload["snapshot"]["snapshot_id"] == "ferry-j1-2"
    assert answers(engine) == []
    with engine.connect() as connection:
        assert connection.execute(select(archive_requests.c.state)).scalar_one() == "waiting"


def test_archiver_binds_snapshot_released_plainly_and_its_datacenter_events(
    settings: Settings,
) -> None:
    service = bootstrap(settings, datacenter="ey04")
    assert set(service.queue.routing_keys) == {
        "archive.requested.ey04", "snapshot.ready.ey04", "snapshot.released",
        "transfer.completed"}
    service.engine.dispose()


def test_released_for_an_unknown_request_is_ignored(engine: Engine) -> None:
    send_released(engine, "ferry-x-1")
    assert answers(engine) == []
