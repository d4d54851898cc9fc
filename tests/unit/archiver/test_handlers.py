"""Archive requests recorded on the embedded database: requests for a key join its archive
while it is being made; once finished, only a server root's is reused (within its age)."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Engine, select, update

from services.archiver import SCHEMA as ARCHIVER_SCHEMA
from services.archiver.handlers import (
    ON_FAILURE,
    ReuseKeyConflictError,
    record_archive_request,
    record_snapshot_ready,
)
from services.archiver.records import completed_event
from services.archiver.sources import SourceInvalidError
from services.archiver.tables import archive_jobs, archive_requests
from shared.contracts import ArchiveRequested, ArchiveSource, SnapshotReady
from shared.envelope import Envelope
from shared.inbox_outbox import Units, outbox_table
from shared.runtime import deliver, deliver_failure, open_database
from shared.settings import Settings


@pytest.fixture
def units(tmp_path: Path) -> Iterator[Units]:
    units = open_database(Settings(state_dir=tmp_path), ARCHIVER_SCHEMA)
    yield units
    units.engine.dispose()


@pytest.fixture
def engine(units: Units) -> Engine:
    return units.engine


def request(request_id: str, key: str = "fs:vm1:/data", kind: str = "shared_fs",
            **source: Any) -> tuple[ArchiveRequested, Envelope]:
    fields = {"host": "vm1", "path": "/data", **source}
    event = ArchiveRequested(datacenter="ey04", request_id=request_id, kind=kind,  # type: ignore[arg-type]
                             reuse_key=key, source=ArchiveSource.model_validate(fields))
    return event, Envelope.wrap(event, migration_id=f"m-{request_id}")


def handle(engine: Engine, event: ArchiveRequested, envelope: Envelope) -> bool:
    return deliver(record_archive_request, event, envelope, Units(engine))


def ready(engine: Engine, event: SnapshotReady, envelope: Envelope) -> bool:
    return deliver(record_snapshot_ready, event, envelope, Units(engine))


def rows(engine: Engine, table: Any) -> list[Any]:
    with engine.connect() as connection:
        return list(connection.execute(select(table)))


def events(engine: Engine) -> list[dict[str, Any]]:
    return [json.loads(row.body) for row in rows(engine, outbox_table)]


def test_requests_for_one_key_share_one_pending_archive_job(engine: Engine) -> None:
    # Given two migrations asking for the same shared filesystem
    handle(engine, *request("r1"))
    handle(engine, *request("r2"))
    # Then one job exists, both requests wait on it, nothing is answered yet
    [job] = rows(engine, archive_jobs)
    assert job.state == "pending" and job.datacenter == "ey04" and job.source_path == "/data"
    assert job.payload["source"]["host"] == "vm1"
    answers = {r.request_id: (r.archive_id, r.state, r.reused)
               for r in rows(engine, archive_requests)}
    assert answers == {"r1": (job.id, "waiting", False), "r2": (job.id, "waiting", True)}
    assert events(engine) == []


def finish(engine: Engine, path: Path, finished_at: float | None = None) -> None:
    """The (one) job done, its file at `path`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"archive")
    with engine.begin() as connection:
        connection.execute(update(archive_jobs).values(
            state="done", file_path=str(path), raw_bytes=10, compressed_bytes=5,
            sha256="a" * 64, started_at=time.time() - 5,
            finished_at=time.time() if finished_at is None else finished_at, warnings=[]))


def test_request_for_a_finished_server_root_is_answered_at_once(engine: Engine,
                                                                tmp_path: Path) -> None:
    handle(engine, *request("r1", key="root:db1", kind="db_server_root", path="/"))
    finish(engine, tmp_path / "ey04" / "a.tar.zst")
    # When another customer on that server asks for its root within the reuse age
    event, envelope = request("r2", key="root:db1", kind="db_server_root", path="/")
    handle(engine, event, envelope)
    # Then archive.completed goes out for it in the same transaction, marked reused
    [completed] = events(engine)
    assert completed["type"] == "archive.completed" and completed["migration_id"] == "m-r2"
    assert completed["payload"]["request_id"] == "r2" and completed["payload"]["reused"] is True
    assert completed["payload"]["file_name"] == "a.tar.zst"
    assert completed["causation_id"] == str(envelope.id)
    assert len(rows(engine, archive_jobs)) == 1


@pytest.mark.parametrize("kind, source", [
    ("shared_fs", {"path": "/data"}), ("database", {"database": "shop", "engine": "mysql"})])
def test_request_for_a_finished_archive_of_another_kind_archives_afresh(
    engine: Engine, tmp_path: Path, kind: str, source: dict[str, Any],
) -> None:
    handle(engine, *request("r1", key="k", kind=kind, **source))
    finish(engine, tmp_path / "ey04" / "a.tar.zst")
    # When a second migration asks for the same source after its archive finished
    handle(engine, *request("r2", key="k", kind=kind, **source))
    # Then a new job archives it again: nothing is answered from the old copy
    assert events(engine) == []
    first, second = sorted(rows(engine, archive_jobs), key=lambda j: j.created_at)
    assert (first.state, second.state) == ("done", "pending")
    answers = {r.request_id: (r.archive_id, r.state, r.reused)
               for r in rows(engine, archive_requests)}
    assert answers == {"r1": (first.id, "waiting", False), "r2": (second.id, "waiting", False)}


@pytest.mark.parametrize("why", ["too old", "file gone", "dropped"])
def test_a_server_root_not_reusable_any_more_is_archived_afresh(
    engine: Engine, tmp_path: Path, why: str,
) -> None:
    root = {"key": "root:db1", "kind": "db_server_root", "path": "/"}
    handle(engine, *request("r1", **root))
    archive = tmp_path / "ey04" / "a.tar.zst"
    # a day and a second ago: past the default age of 24 h
    finish(engine, archive, finished_at=time.time() - 86401 if why == "too old" else None)
    if why == "file gone":
        archive.unlink()
    if why == "dropped":
        with engine.begin() as connection:
            connection.execute(update(archive_jobs).values(dropped_at=time.time()))
    handle(engine, *request("r2", **root))
    assert events(engine) == []
    assert sorted(j.state for j in rows(engine, archive_jobs)) == ["done", "pending"]


def test_redelivered_and_resent_requests_have_one_effect(engine: Engine) -> None:
    event, envelope = request("r1")
    assert handle(engine, event, envelope)
    assert not handle(engine, event, envelope)  # the same message again
    # resent under a new message id: handled, and changes nothing
    assert handle(engine, event, Envelope.wrap(event, migration_id="m-r1"))

    assert len(rows(engine, archive_requests)) == 1 and len(rows(engine, archive_jobs)) == 1


def test_keys_are_per_datacenter(engine: Engine) -> None:
    event, envelope = request("r1")
    other = event.model_copy(update={"datacenter": "tm21", "request_id": "r2"})
    handle(engine, event, envelope)
    handle(engine, other, Envelope.wrap(other, migration_id="m"))

    assert sorted(j.datacenter for j in rows(engine, archive_jobs)) == ["ey04", "tm21"]


def test_invalid_source_writes_nothing_and_failure_hook_answers_once(engine: Engine) -> None:
    event, envelope = request("r1", kind="database", key="db:x", path=None,
                              database="$(touch /tmp/pwned)", engine="mysql")
    with pytest.raises(SourceInvalidError, match="not a plain name"):
        handle(engine, event, envelope)
    assert rows(engine, archive_jobs) == [] and rows(engine, archive_requests) == []
    # When the bus gives up on it (twice: a replayed dead letter)
    error = SourceInvalidError("database name '$(touch /tmp/pwned)' is not a plain name")
    assert deliver_failure(ON_FAILURE, event, envelope, error, Units(engine))
    assert not deliver_failure(ON_FAILURE, event, envelope, error, Units(engine))
    [failed] = events(engine)
    assert failed["type"] == "archive.failed" and failed["payload"]["host"] == "vm1"
    assert "not a plain name" in failed["payload"]["reason"]
    [answer] = rows(engine, archive_requests)
    assert answer.state == "failed" and answer.archive_id is None


def test_one_key_for_two_kinds_is_refused(engine: Engine) -> None:
    handle(engine, *request("r1", key="k"))
    with pytest.raises(ReuseKeyConflictError, match="names shared_fs archives"):
        handle(engine, *request("r2", key="k", kind="db_server_root"))


def test_request_for_a_failed_archive_runs_it_again(engine: Engine) -> None:
    handle(engine, *request("r1"))
    with engine.begin() as connection:
        connection.execute(update(archive_jobs).values(state="failed", attempts=3, error="boom"))

    handle(engine, *request("r2", path="/data2"))

    [job] = rows(engine, archive_jobs)
    assert (job.state, job.attempts, job.error, job.source_path) == ("pending", 0, None, "/data2")
    assert {r.request_id: r.state for r in rows(engine, archive_requests)}["r2"] == "waiting"


def test_snapshot_ready_becomes_a_local_fs_archive_job(engine: Engine) -> None:
    event = SnapshotReady(datacenter="ey04", request_id="r9", snapshot_id="s1", driver="none",
                          host="local", size_bytes=0, reuse_key="local:vm1:/",
                          source=ArchiveSource(host="local", path="/srv/vm1"))
    ready(engine, event, Envelope.wrap(event, migration_id="m"))

    [job] = rows(engine, archive_jobs)
    assert job.kind == "local_fs" and job.payload["snapshot"]["driver"] == "none"
    assert uuid.UUID(job.id).hex == job.id  # a fresh random id, not the reuse key


def snapshot_ready(snapshot_id: str) -> tuple[SnapshotReady, Envelope]:
    event = SnapshotReady(datacenter="ey04", request_id="r9", snapshot_id=snapshot_id,
                          driver="dm", host="xen1", port=10809, size_bytes=1 << 30,
                          export_name=snapshot_id,
                          reuse_key="local:vm1:/",
                          source=ArchiveSource(host="xen1", device="/dev/vg0/vm1-root"))
    return event, Envelope.wrap(event, migration_id="m-9")


def test_failed_local_fs_request_retried_with_a_new_snapshot_runs_again_from_it(
    engine: Engine,
) -> None:
    # Given a local_fs archive that failed reading its snapshot (its COW filled up)
    ready(engine, *snapshot_ready("ferry-j1-1"))
    with engine.begin() as connection:
        connection.execute(update(archive_jobs).values(state="failed", attempts=1))
        connection.execute(update(archive_requests).values(state="failed"))
    # When the snapshotter sends snapshot.ready again for the request, with a new snapshot
    ready(engine, *snapshot_ready("ferry-j1-2"))
    # Then the request waits again and the job runs again, on the new snapshot
    [job] = rows(engine, archive_jobs)
    assert job.state == "pending" and job.payload["snapshot"]["snapshot_id"] == "ferry-j1-2"
    [answer] = rows(engine, archive_requests)
    assert answer.state == "waiting" and answer.archive_id == job.id and not answer.reused


def test_answers_for_a_local_fs_archive_name_the_snapshot_it_read(engine: Engine) -> None:
    ready(engine, *snapshot_ready("ferry-j1-1"))
    with engine.begin() as connection:
        connection.execute(update(archive_jobs).values(
            state="done", file_path="/s/ey04/a.tar.zst", raw_bytes=1, compressed_bytes=1,
            sha256="b" * 64, started_at=1.0, finished_at=2.0, warnings=[]))
        job = connection.execute(select(archive_jobs)).one()

    assert completed_event(job, "r9", reused=False).snapshot_id == "ferry-j1-1"
