"""Staging on the embedded database: the room an archive counts on before it starts, and
what `ferry archives drop|refresh|show` do to an archive and its key."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Engine, select, update

from ferry.cli import main
from services.archiver import SCHEMA as ARCHIVER_SCHEMA
from services.archiver.handlers import note_transferred, record_archive_request
from services.archiver.jobs import Archiver
from services.archiver.sources import SourceCommand
from services.archiver.staging import StagingTooSmallError, reserve
from services.archiver.tables import archive_jobs, archive_requests
from shared.addresses import host_pool
from shared.contracts import ArchiveRequested, ArchiveSource, TransferCompleted
from shared.envelope import Envelope
from shared.hosts import LocalExecutor
from shared.inbox_outbox import Units
from shared.jobs import JobWorker, Lease, Leases, RetryIn
from shared.retry import RetryPolicy
from shared.runtime import deliver, open_database
from shared.settings import Settings


@pytest.fixture
def units(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Units]:
    monkeypatch.setenv("FERRY_STATE_DIR", str(tmp_path))
    monkeypatch.setenv("FERRY_STAGING_DIR", str(tmp_path / "staging"))
    monkeypatch.setenv("COLUMNS", "250")
    units = open_database(Settings(), ARCHIVER_SCHEMA)
    yield units
    units.engine.dispose()


def ask(units: Units, request_id: str, key: str, kind: str = "shared_fs",
        **source: Any) -> Any:
    """A request recorded as the consumer records it; its row."""
    event = ArchiveRequested(datacenter="ey04", request_id=request_id, kind=kind,  # type: ignore[arg-type]
                             reuse_key=key, source=ArchiveSource.model_validate(
                                 {"host": "vm1", "path": "/data", **source}))
    deliver(record_archive_request, event, Envelope.wrap(event, migration_id=f"m-{request_id}"),
            units, Settings())
    with units.engine.connect() as connection:
        return connection.execute(select(archive_requests).where(
            archive_requests.c.request_id == request_id)).one()


def jobs(engine: Engine) -> list[Any]:
    with engine.connect() as connection:
        return list(connection.execute(select(archive_jobs).order_by(archive_jobs.c.created_at)))


# -- room before an archive starts ----------------------------------------------------------


def claimed(units: Units, request_id: str, owner: str) -> Lease:
    ask(units, request_id, f"gfs:{request_id}")
    leases = Leases(units.engine, archive_jobs, 60.0)
    row = leases.claim(owner, archive_jobs.c.reuse_key == f"gfs:{request_id}")
    assert row is not None
    return Lease(leases, row, owner, units)


def test_an_archive_counts_what_running_ones_still_expect(units: Units, tmp_path: Path) -> None:
    staging = tmp_path / "staging" / "ey04"
    staging.mkdir(parents=True)
    disk = os.statvfs(staging)
    free = disk.f_bavail * disk.f_frsize
    # sizes as a share of this disk's free space, through the margin: each needs 55 % of it
    settings = Settings(staging_space_margin=free * 0.55)
    first, second = claimed(units, "a", "w1"), claimed(units, "b", "w2")
    # Given a running archive that counted on 55 % of the free space and wrote nothing yet
    assert reserve(first, staging, "ey04", 1, settings) is None
    # Then a second one, needing 55 % too, waits, no attempt spent, saying why
    waiting = reserve(second, staging, "ey04", 1, settings)
    assert isinstance(waiting, RetryIn) and not waiting.counts_as_attempt
    expected = jobs(units.engine)[0].staging_reserved
    assert f"running archives there still expect {expected}" in waiting.reason
    assert waiting.reason.startswith(f"waiting for {2 * expected} bytes free in staging "
                                     f"{staging} (")
    # When the first one has written most of it (what it wrote is on the disk already)
    with (staging / f"{first.job_id}.tar.zst.abcd1234.partial").open("wb") as partial:
        partial.truncate(int(free * 0.5))  # sparse: counted by size, costs this disk nothing
    # Then the second one fits
    assert reserve(second, staging, "ey04", 1, settings) is None


def test_a_reservation_of_an_expired_lease_or_an_earlier_attempt_counts_nothing(
    units: Units, tmp_path: Path,
) -> None:
    staging = tmp_path / "staging" / "ey04"
    staging.mkdir(parents=True)
    disk = os.statvfs(staging)
    settings = Settings(staging_space_margin=disk.f_bavail * disk.f_frsize * 0.55)
    first, second = claimed(units, "a", "w1"), claimed(units, "b", "w2")
    assert reserve(first, staging, "ey04", 1, settings) is None
    assert isinstance(reserve(second, staging, "ey04", 1, settings), RetryIn)
    with units.engine.begin() as connection:  # its worker died: the lease runs out
        connection.execute(update(archive_jobs).where(archive_jobs.c.id == first.job_id)
                           .values(lease_expires_at=time.time() - 1))
    assert reserve(second, staging, "ey04", 1, settings) is None
    with units.engine.begin() as connection:  # taken over: a later attempt, not yet counted
        connection.execute(update(archive_jobs).where(archive_jobs.c.id == first.job_id)
                           .values(lease_expires_at=time.time() + 60, attempts=2))
    third = claimed(units, "c", "w3")
    assert reserve(third, staging, "ey04", 0, settings) is None  # unknown size: not checked
    with units.engine.connect() as connection:
        row = connection.execute(select(archive_jobs).where(
            archive_jobs.c.id == third.job_id)).one()
    assert row.staging_reserved is None


def test_an_archive_larger_than_the_whole_staging_fails_at_once(units: Units,
                                                                 tmp_path: Path) -> None:
    staging = tmp_path / "staging" / "ey04"
    staging.mkdir(parents=True)
    disk = os.statvfs(staging)
    size = disk.f_blocks * disk.f_frsize
    with pytest.raises(StagingTooSmallError, match=f"but staging {staging} holds {size} bytes"):
        reserve(claimed(units, "a", "w1"), staging, "ey04", size, Settings())


# -- drop, refresh, show --------------------------------------------------------------------


def finish(engine: Engine, archive_id: str, path: Path, **values: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"x" * 100)
    with engine.begin() as connection:
        connection.execute(update(archive_jobs).where(archive_jobs.c.id == archive_id).values(
            state="done", file_path=str(path), raw_bytes=200, compressed_bytes=100,
            sha256="a" * 64, started_at=time.time() - 5, finished_at=time.time(), warnings=[],
            **values))
        connection.execute(update(archive_requests).where(
            archive_requests.c.archive_id == archive_id).values(state="completed"))


def transferred(units: Units, request: Any, **other: str) -> None:
    """transfer.completed for the request (or, with `other`, for what it names instead)."""
    names = {"request_id": request.request_id, "archive_id": request.archive_id, **other}
    event = TransferCompleted(**names, destination="/d", bytes=100, duration_s=1, mb_per_s=1,
                              sha256="a" * 64)
    deliver(note_transferred, event, Envelope.wrap(event, migration_id=request.migration_id),
            units, Settings())


ROOT = {"key": "root:db1", "kind": "db_server_root", "path": "/"}


def test_drop_refuses_an_archive_being_made_or_waiting_for_its_transfer(
    units: Units, tmp_path: Path, capsys: pytest.CaptureFixture[str],
) -> None:
    request = ask(units, "r1", **ROOT)
    # a pending archive: refused, nothing changes
    assert main(["archives", "drop", request.archive_id]) == 1
    assert "is pending: nothing dropped" in capsys.readouterr().out
    archive = tmp_path / "staging" / "ey04" / f"{request.archive_id}.tar.zst"
    manifest = archive.with_name(f"{archive.name}.manifest")
    finish(units.engine, request.archive_id, archive)
    manifest.write_text("beside it")
    # finished, but its request not transferred yet: refused, naming the request
    assert main(["archives", "drop", request.archive_id]) == 1
    out = capsys.readouterr().out
    assert "request(s) r1 (migration m-r1) still wait for its transfer" in out
    assert archive.is_file() and jobs(units.engine)[0].dropped_at is None
    # once transferred it is dropped: its files deleted, and no request reuses it
    transferred(units, request)
    assert main(["archives", "drop", request.archive_id]) == 0
    out = capsys.readouterr().out
    assert f"freed {archive} (100 bytes, archive {request.archive_id})" in out
    assert "2 file(s), 109 bytes freed" in out and not archive.exists()
    assert not manifest.exists()
    assert main(["archives", "list"]) == 0
    assert "done, dropped" in capsys.readouterr().out
    again = ask(units, "r2", **ROOT)
    assert again.archive_id != request.archive_id and not again.reused
    assert main(["archives", "drop", "no-such-archive"]) == 1


def test_drop_force_drops_an_archive_whose_transfer_never_comes(
    units: Units, tmp_path: Path, capsys: pytest.CaptureFixture[str],
) -> None:
    request = ask(units, "r1", **ROOT)
    archive = tmp_path / "staging" / "ey04" / f"{request.archive_id}.tar.zst"
    finish(units.engine, request.archive_id, archive)
    assert main(["archives", "drop", "--force", request.archive_id]) == 0
    assert not archive.exists() and jobs(units.engine)[0].dropped_at is not None


def test_refresh_makes_the_next_request_archive_afresh(
    units: Units, tmp_path: Path, capsys: pytest.CaptureFixture[str],
) -> None:
    first = ask(units, "r1", **ROOT)
    finish(units.engine, first.archive_id, tmp_path / "staging" / "ey04" / "a.tar.zst",
           excluded=["/home", "/root/.mysql_history"])
    assert ask(units, "r2", **ROOT).archive_id == first.archive_id  # within its age: reused
    # When an operator refreshes the key
    assert main(["archives", "refresh", "root:db1"]) == 0
    assert (f"ey04: root:db1 (archive {first.archive_id}): the next request archives afresh"
            in capsys.readouterr().out)
    # Then the next request gets a new archive
    third = ask(units, "r3", **ROOT)
    assert third.archive_id != first.archive_id and not third.reused
    assert main(["archives", "refresh", "root:nope"]) == 1
    assert "no reuse key 'root:nope'" in capsys.readouterr().out
    # and show tells what the first one left out, and which request was transferred
    transferred(units, first)
    assert main(["archives", "show", first.archive_id]) == 0
    shown = capsys.readouterr().out
    assert "excluded: ['/home', '/root/.mysql_history']" in shown
    assert "request r1 (migration m-r1): completed, transferred" in shown
    assert "request r2 (migration m-r2): completed, reused\n" in shown


def test_transfer_completed_for_another_archive_or_an_unknown_request_changes_nothing(
    units: Units,
) -> None:
    request = ask(units, "r1", "gfs:a")
    transferred(units, request, archive_id="another-archive")
    transferred(units, request, request_id="unknown")
    with units.engine.connect() as connection:
        [row] = connection.execute(select(archive_requests))
    assert row.transferred_at is None
    transferred(units, request)
    with units.engine.connect() as connection:
        [row] = connection.execute(select(archive_requests))
    assert row.transferred_at is not None


def test_what_the_source_command_left_out_is_recorded_with_the_archive(
    units: Units, tmp_path: Path,
) -> None:
    settings = Settings(staging_dir=tmp_path / "staging")
    lease = claimed(units, "a", "w1")
    archiver = Archiver(settings, units.engine, "ey04", host_pool(settings))
    archiver.staging.mkdir(parents=True)
    # Given a source command that leaves a scrub list out
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "data").write_text("data")
    command = SourceCommand(["tar", "-C", str(tmp_path / "src"), "-cf", "-", "."], (0,), "tar",
                            excluded=("/home", "/root/.bash_history"))
    # When its archive is made and recorded as the worker records it
    archive = archiver._stream(lease, LocalExecutor(), command, [])
    worker = JobWorker(lease.leases, archiver.run, units=units,
                       policy=RetryPolicy.from_settings(settings), name="test")
    worker.settle(lease, archiver._done(lease, archive, time.time(), [], None))
    # Then the archive's row lists what was left out, and counts on no staging space now
    [job] = [j for j in jobs(units.engine) if j.id == lease.job_id]
    assert job.state == "done" and job.excluded == ["/home", "/root/.bash_history"]
    assert job.staging_reserved is None and Path(job.file_path).is_file()


def test_the_attempts_start_is_written_with_its_reservation_and_not_while_it_waits(
    units: Units, tmp_path: Path,
) -> None:
    staging = tmp_path / "staging" / "ey04"
    staging.mkdir(parents=True)
    disk = os.statvfs(staging)
    settings = Settings(staging_space_margin=disk.f_bavail * disk.f_frsize * 0.55)
    first, second = claimed(units, "a", "w1"), claimed(units, "b", "w2")
    third = claimed(units, "c", "w3")
    assert reserve(first, staging, "ey04", 1, settings, started_at=100.0) is None
    assert isinstance(reserve(second, staging, "ey04", 1, settings, started_at=200.0), RetryIn)
    assert reserve(third, staging, "ey04", 0, settings, started_at=300.0) is None  # unchecked
    rows = {row.id: row for row in jobs(units.engine)}
    assert (rows[first.job_id].started_at, rows[first.job_id].bytes_done) == (100.0, 0)
    assert rows[first.job_id].staging_reserved is not None
    assert rows[second.job_id].started_at is None  # waiting: nothing of it is written
    assert rows[third.job_id].started_at == 300.0 and rows[third.job_id].staging_reserved is None
