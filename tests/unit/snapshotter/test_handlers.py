"""The snapshotter's handlers on the embedded database (SQLite), delivered as the runtime
does: one job per request however often it comes, a bad request failed at once, an archive's
end marking its snapshot for release."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from sqlalchemy import select, update

from services.snapshotter import SCHEMA as SNAPSHOTTER_SCHEMA
from services.snapshotter.handlers import release_after_archive, request_snapshot
from services.snapshotter.tables import snapshot_jobs
from shared.contracts import ArchiveCompleted, ArchiveSource, SnapshotRequested
from shared.envelope import Envelope
from shared.inbox_outbox import Units, outbox_table
from shared.runtime import deliver, open_database
from shared.settings import Settings


def units_in(tmp_path: Path) -> Units:
    return open_database(Settings(state_dir=tmp_path), SNAPSHOTTER_SCHEMA)


def requested(device: str = "/dev/vg0/vm1-root") -> SnapshotRequested:
    return SnapshotRequested(request_id="r1", datacenter="ey04", xen_host="root@xen1:22",
                             device=device, size_bytes=0, driver="dm", reuse_key="k",
                             source=ArchiveSource(host="xen1"))


def jobs(units: Units) -> list[Any]:
    with units.engine.connect() as connection:
        return list(connection.execute(select(snapshot_jobs)).all())


def outbox(units: Units) -> list[Envelope]:
    with units.engine.connect() as connection:
        return [Envelope.from_json(body) for body in connection.execute(
            select(outbox_table.c.body).order_by(outbox_table.c.seq)).scalars()]


def test_a_request_redelivered_or_sent_again_records_one_job(tmp_path: Path) -> None:
    # Given a request
    units = units_in(tmp_path)
    envelope = Envelope.wrap(requested(), migration_id="m1")
    again = Envelope.wrap(requested(), migration_id="m1")  # the resolver asked twice
    # When it is delivered twice, then sent again
    delivered = [deliver(request_snapshot, requested(), each, units)
                 for each in (envelope, envelope, again)]
    # Then the inbox skipped the duplicate and the request id the resend: one job
    assert delivered == [True, False, True]
    [job] = jobs(units)
    assert (job.state, job.phase, job.attempts) == ("pending", "waiting", 0)
    assert outbox(units) == []


def test_a_bad_request_fails_at_once_with_snapshot_failed(tmp_path: Path) -> None:
    units = units_in(tmp_path)
    envelope = Envelope.wrap(requested(device="-rf /"), migration_id="m1")
    deliver(request_snapshot, requested(device="-rf /"), envelope, units)
    [job] = jobs(units)
    assert (job.state, job.phase) == ("failed", "failed") and "not a device path" in job.error
    [failed] = outbox(units)
    assert failed.type == "snapshot.failed" and failed.causation_id == envelope.id


def test_the_end_of_the_archive_marks_the_active_snapshot_for_release(tmp_path: Path) -> None:
    # Given an active snapshot
    units = units_in(tmp_path)
    deliver(request_snapshot, requested(), Envelope.wrap(requested(), migration_id="m1"), units)
    with units.engine.begin() as connection:
        connection.execute(update(snapshot_jobs).values(state="active", phase="active",
                                                        snapshot_id="ferry-0123456789ab-1"))
    # When its archive completes
    now = datetime.now(UTC)
    completed = ArchiveCompleted(
        datacenter="ey04", request_id="r1", archive_id=uuid.uuid4().hex, kind="local_fs",
        reuse_key="k", path="/x", file_name="x", raw_bytes=1, compressed_bytes=1,
        sha256="0" * 64, started_at=now, finished_at=now, snapshot_id="ferry-0123456789ab-1")
    deliver(release_after_archive, completed, Envelope.wrap(completed, migration_id="m1"), units)
    # Then a worker is to release it
    [job] = jobs(units)
    assert (job.state, job.phase, job.release_reason) == ("pending", "releasing",
                                                          "archive completed")
