"""The status read model, built by the real handler from real envelopes, read via the API."""

from __future__ import annotations

import json
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import func, insert, select

from services.intake.handlers import HANDLERS
from services.intake.tables import migration_events, migrations
from shared import runtime
from shared.contracts import (
    ArchiveCompleted,
    ArchiveFailed,
    ArchiveProgress,
    ArchiveRequested,
    ArchiveSource,
    Event,
    MigrationCompleted,
    MigrationFailed,
    MigrationResolved,
    PlannedJob,
    SnapshotReady,
    SnapshotReleased,
    SnapshotRequested,
    TransferCompleted,
    TransferFailed,
)
from shared.document import document_json_schema
from shared.envelope import Envelope
from shared.inbox_outbox import Units, inbox_table
from tests.integration.test_intake_api import AUTH, EXAMPLE_BODY, Intake, open_intake

T0 = datetime(2026, 11, 26, 12, 0, tzinfo=UTC)
SHA = "ab" * 32
LOCAL = ArchiveSource(host="xen-1", device="/dev/vg0/ey04-s50000-root", label="ey04-s50000:/")
SHARED = ArchiveSource(host="ey04-s50000", path="/data", label="ey04-e00075:/data")
DATABASE = ArchiveSource(host="mysql-mega-2-replica", database="foobar_production",
                         engine="mysql", label="foobar_production@mysql-mega-2-replica")
ALLOCATIONS = {"vms": {"vm_1": "tm21-s00101", "vm_5": "tm21-s00105"},
               "environments": {"env_1": "tm21-e00050"}, "vlan": 1234}


@pytest.fixture(params=["sqlite", "postgres"])
def intake(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Intake]:
    url = (f"sqlite:///{tmp_path}/intake.sqlite3" if request.param == "sqlite"
           else request.getfixturevalue("pg_url"))
    yield from open_intake(url)


def at(seconds: float, event: Event, migration_id: str) -> Envelope:
    """An envelope as its service would have published it, `seconds` after T0."""
    return Envelope(type=event.TYPE, migration_id=migration_id,
                    occurred_at=T0 + timedelta(seconds=seconds),
                    payload=event.model_dump(mode="json"))


def deliver(intake: Intake, *envelopes: Envelope) -> list[bool]:
    """What the consumer does with each message: the registered handler, through the
    runtime; False for each message the inbox had seen. Each migration named was accepted
    first, as POST /migrations does (intake believes no event about any other)."""
    units = Units(intake.engine)
    for migration_id in dict.fromkeys(e.migration_id for e in envelopes):
        accepted(intake, migration_id)
    return [runtime.deliver(HANDLERS[e.type], e.event(), e, units) for e in envelopes]


def accepted(intake: Intake, migration_id: str) -> None:
    with intake.engine.begin() as connection:
        if connection.execute(select(migrations.c.id).where(
                migrations.c.id == migration_id)).first() is None:
            connection.execute(insert(migrations).values(
                id=migration_id, customer_id="c", status="submitted", document="{}",
                created_at=0.0, updated_at=0.0))


def status(intake: Intake, migration_id: str) -> dict[str, Any]:
    response = intake.client.get(f"/migrations/{migration_id}", headers=AUTH)
    assert response.status_code == 200, response.text
    answer: dict[str, Any] = response.json()
    return answer


def planned(request_id: str, kind: str, source: ArchiveSource) -> PlannedJob:
    return PlannedJob(request_id=request_id, kind=kind, datacenter="ey04",  # type: ignore[arg-type]
                      reuse_key=f"key-{request_id}", source=source)


def archive_done(request_id: str, kind: str, raw: int, packed: int) -> ArchiveCompleted:
    return ArchiveCompleted(
        datacenter="ey04", request_id=request_id, archive_id=f"arc-{request_id}",
        kind=kind, reuse_key=f"key-{request_id}", path=f"/staging/{request_id}.tar.zst",  # type: ignore[arg-type]
        file_name=f"{request_id}.tar.zst", raw_bytes=raw, compressed_bytes=packed, sha256=SHA,
        started_at=T0, finished_at=T0 + timedelta(seconds=30))


def migration_story(migration_id: str) -> list[Envelope]:
    """A migration with three archives: one transferred, one failed for good, one whose
    archive retried and whose transfer then failed; progress arriving out of order."""
    mid = migration_id
    return [
        at(1, MigrationResolved(customer_id="cust-1042", allocations=ALLOCATIONS,
                                resolved_document={}, jobs=(
                                    planned("req-local", "local_fs", LOCAL),
                                    planned("req-shared", "shared_fs", SHARED),
                                    planned("req-db", "database", DATABASE))), mid),
        at(2, SnapshotRequested(request_id="req-local", datacenter="ey04", xen_host="xen-1",
                                device=LOCAL.device or "", size_bytes=10**9, driver="dm",
                                reuse_key="key-req-local", source=LOCAL), mid),
        at(3, SnapshotReady(datacenter="ey04", request_id="req-local", snapshot_id="snap-1",
                            driver="dm", host="xen-1", export_name="snap-1", port=10809,
                            size_bytes=10**9, reuse_key="key-req-local", source=LOCAL), mid),
        at(3, ArchiveRequested(datacenter="ey04", request_id="req-shared", kind="shared_fs",
                               reuse_key="key-req-shared", source=SHARED), mid),
        at(3, ArchiveRequested(datacenter="ey04", request_id="req-db", kind="database",
                               reuse_key="key-req-db", source=DATABASE), mid),
        at(5, ArchiveProgress(datacenter="ey04", request_id="req-local", stage="archive",
                              bytes_done=500, bytes_total=1000, mb_per_s=12.5), mid),
        # sent before the one above, delivered after it: must not move the bar back
        at(4, ArchiveProgress(datacenter="ey04", request_id="req-local", stage="archive",
                              bytes_done=100, bytes_total=1000, mb_per_s=3.0), mid),
        at(6, archive_done("req-local", "local_fs", raw=1000, packed=400), mid),
        at(7, SnapshotReleased(request_id="req-local", snapshot_id="snap-1", host="xen-1",
                               reason="archived"), mid),
        at(8, ArchiveProgress(datacenter="ey04", request_id="req-local", stage="transfer",
                              bytes_done=200, bytes_total=400, mb_per_s=7.0), mid),
        at(9, TransferCompleted(request_id="req-local", archive_id="arc-req-local",
                                destination="tm21:/incoming/req-local.tar.zst", bytes=400,
                                duration_s=2.0, mb_per_s=7.5, sha256=SHA), mid),
        at(10, ArchiveFailed(datacenter="ey04", request_id="req-db", kind="database",
                             reason="mysqldump exited 2", host="mysql-mega-2-replica",
                             command="mysqldump --single-transaction foobar_production",
                             stderr_tail="Access denied"), mid),
        at(11, ArchiveFailed(datacenter="ey04", request_id="req-shared", kind="shared_fs",
                             reason="tar exited 2", will_retry=True), mid),
        at(12, archive_done("req-shared", "shared_fs", raw=5000, packed=2000), mid),
        at(13, TransferFailed(request_id="req-shared", archive_id="arc-req-shared",
                              reason="rsync: connection reset", attempts=5), mid),
        at(14, MigrationFailed(stage="archive", reason="1 archive failed for good"), mid),
        at(15, MigrationCompleted(archives=1, bytes=400), mid),  # too late: failed is final
    ]


def test_status_view_follows_the_events_of_a_migration(intake: Intake) -> None:
    # Given a migration accepted through the API
    migration_id = intake.post(EXAMPLE_BODY).json()["id"]
    assert status(intake, migration_id)["status"] == "submitted"
    # When the events of its life are handled by intake's own handler
    story = migration_story(migration_id)
    deliver(intake, *story)
    view = status(intake, migration_id)
    # Then the migration shows its allocations and its final status
    assert view["allocations"] == ALLOCATIONS
    assert (view["status"], view["reason"]) == ("failed", "1 archive failed for good")
    jobs = {job["request_id"]: job for job in view["jobs"]}
    assert set(jobs) == {"req-local", "req-shared", "req-db"}
    # And the transferred job: state, its last bytes, the archive and the transfer results
    local = jobs["req-local"]
    assert (local["kind"], local["datacenter"], local["label"]) == ("local_fs", "ey04",
                                                                   "ey04-s50000:/")
    assert local["source"]["device"] == "/dev/vg0/ey04-s50000-root"
    assert (local["state"], local["stage"], local["bytes_done"], local["bytes_total"]) == (
        "transferred", "transfer", 400, 400)
    assert local["archive"]["raw_bytes"] == 1000 and local["archive"]["compressed_bytes"] == 400
    assert local["archive"]["path"] == "/staging/req-local.tar.zst"
    assert local["archive"]["sha256"] == SHA
    assert local["transfer"]["destination"] == "tm21:/incoming/req-local.tar.zst"
    assert local["snapshot"]["snapshot_id"] == "snap-1" and local["snapshot"]["release_reason"]
    assert local["errors"] == []
    # And the job that failed for good keeps the host, command and stderr of its failure
    database = jobs["req-db"]
    assert database["state"] == "failed"
    [error] = database["errors"]
    assert error["stage"] == "archive" and error["reason"] == "mysqldump exited 2"
    assert error["stderr_tail"] == "Access denied" and "mysqldump" in error["command"]
    # And the retried archive shows both failures in order, and where it ended
    shared = jobs["req-shared"]
    assert shared["state"] == "failed" and shared["archive"]["raw_bytes"] == 5000
    assert [(e["stage"], e.get("will_retry")) for e in shared["errors"]] == [
        ("archive", True), ("transfer", None)]
    # And the history lists every event but the progress reports, oldest first
    seen = [e["type"] for e in view["events"]]
    assert sorted(seen) == sorted(e.type for e in story if e.type != "archive.progress")
    assert seen[0] == "migration.resolved" and seen[-2:] == ["migration.failed",
                                                             "migration.completed"]
    times = [e["occurred_at"] for e in view["events"]]
    assert times == sorted(times)


def test_progress_delivered_late_does_not_move_the_bar_back(intake: Intake) -> None:
    migration_id = intake.post(EXAMPLE_BODY).json()["id"]
    story = migration_story(migration_id)
    # When the story stops after the late progress report (index 6)
    deliver(intake, *story[:7])
    local = {j["request_id"]: j for j in status(intake, migration_id)["jobs"]}["req-local"]
    # Then the newer report is what shows
    assert (local["state"], local["bytes_done"], local["bytes_total"], local["mb_per_s"]) == (
        "archiving", 500, 1000, 12.5)


def test_duplicate_delivery_changes_nothing(intake: Intake) -> None:
    # Given a migration whose whole story was handled
    migration_id = intake.post(EXAMPLE_BODY).json()["id"]
    story = migration_story(migration_id)
    assert all(deliver(intake, *story))
    before = status(intake, migration_id)
    with intake.engine.connect() as connection:
        counted = [connection.execute(select(func.count()).select_from(t)).scalar_one()
                   for t in (migration_events, inbox_table)]
    # When the broker delivers every message again, in reverse order
    assert deliver(intake, *reversed(story)) == [False] * len(story)
    # Then the view, the history and the inbox are exactly as they were
    assert status(intake, migration_id) == before
    with intake.engine.connect() as connection:
        assert [connection.execute(select(func.count()).select_from(t)).scalar_one()
                for t in (migration_events, inbox_table)] == counted


def test_job_heard_of_before_its_plan_takes_the_plan_and_keeps_its_state(
        intake: Intake) -> None:
    # Given an archive request delivered before the migration.resolved that planned it
    migration_id = intake.post(EXAMPLE_BODY).json()["id"]
    early = ArchiveRequested(datacenter="ey04", request_id="req-db", kind="database",
                             reuse_key="key-req-db",
                             source=DATABASE.model_copy(update={"label": "from the archiver"}))
    resolved = MigrationResolved(customer_id="cust-1042", allocations=ALLOCATIONS,
                                 resolved_document={},
                                 jobs=(planned("req-db", "database", DATABASE),))
    deliver(intake, at(5, early, migration_id), at(9, resolved, migration_id))
    # Then the job is the resolver's (its label) and still queued, not back to planned
    [job] = status(intake, migration_id)["jobs"]
    assert (job["label"], job["state"], job["kind"]) == (DATABASE.label, "queued", "database")
    assert status(intake, migration_id)["status"] == "archiving"


# --- reading back ---------------------------------------------------------------------------


def test_list_shows_migrations_newest_first(intake: Intake) -> None:
    ids = [intake.post(EXAMPLE_BODY).json()["id"] for _ in range(3)]
    listed = intake.client.get("/migrations", headers=AUTH).json()["migrations"]
    assert [m["id"] for m in listed] == ids[::-1]
    assert {m["status"] for m in listed} == {"submitted"}
    limited = intake.client.get("/migrations?limit=2&customer_id=cust-1042",
                                       headers=AUTH).json()["migrations"]
    assert [m["id"] for m in limited] == ids[:0:-1]
    assert intake.client.get("/migrations?customer_id=nobody",
                                    headers=AUTH).json() == {"migrations": []}
    bad = intake.client.get("/migrations?limit=0", headers=AUTH)
    assert bad.status_code == 422 and bad.json()["errors"][0]["path"] == "/query/limit"
    # And a mistyped parameter is an error, not silently ignored
    typo = intake.client.get("/migrations?limt=2", headers=AUTH)
    assert typo.status_code == 422 and typo.json()["errors"] == [
        {"path": "/query/limt", "message": "unknown query parameter 'limt'"}]


def test_unknown_migration_is_404(intake: Intake) -> None:
    response = intake.client.get("/migrations/mig-nothere", headers=AUTH)
    assert response.status_code == 404 and "mig-nothere" in response.json()["detail"]
    assert intake.client.get("/migrations/mig-nothere/document",
                                    headers=AUTH).status_code == 404


def test_schema_endpoint_serves_the_document_schema(intake: Intake) -> None:
    assert intake.client.get("/schema/migration-document").json() == json.loads(
        json.dumps(document_json_schema()))
    openapi = intake.client.get("/openapi.json").json()
    body = openapi["paths"]["/migrations"]["post"]["requestBody"]["content"]["application/json"]
    assert body["schema"] == {"$ref": "#/components/schemas/MigrationDocument"}
    assert "Vm" in openapi["components"]["schemas"]
