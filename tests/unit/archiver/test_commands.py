"""`ferry archives list|show`: what an operator sees of archives and their requests."""

from __future__ import annotations

from pathlib import Path

import pytest
from sqlalchemy import update

from ferry.cli import main
from services.archiver import SCHEMA as ARCHIVER_SCHEMA
from services.archiver.handlers import record_archive_request
from services.archiver.tables import archive_jobs
from shared.contracts import ArchiveRequested, ArchiveSource
from shared.envelope import Envelope
from shared.runtime import deliver, open_database
from shared.settings import Settings


def test_list_and_show_tell_state_sizes_requests_and_warnings(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
) -> None:
    # Given one finished archive answering two requests
    monkeypatch.setenv("FERRY_STATE_DIR", str(tmp_path))
    monkeypatch.setenv("COLUMNS", "250")
    units = open_database(Settings(), ARCHIVER_SCHEMA)
    engine = units.engine
    for request_id in ("r1", "r2"):
        event = ArchiveRequested(datacenter="ey04", request_id=request_id, kind="shared_fs",
                                 reuse_key="gfs:data", source=ArchiveSource(
                                     host="vm1", path="/data", label="ey04-e00075:/data"))
        deliver(record_archive_request, event,
                Envelope.wrap(event, migration_id=f"m-{request_id}"), units)
    with engine.begin() as connection:
        connection.execute(update(archive_jobs).values(
            state="done", raw_bytes=5_000_000, compressed_bytes=2_000_000, started_at=10.0,
            finished_at=52.0, warnings=["tar exited 1 (files changed while being read)"]))
        archive_id = connection.execute(archive_jobs.select()).one().id
    engine.dispose()
    # When an operator lists archives and shows this one
    assert main(["archives", "list", "--datacenter", "ey04"]) == 0
    listed = capsys.readouterr().out
    assert main(["archives", "show", archive_id]) == 0
    shown = capsys.readouterr().out
    # Then the list has its source, sizes, duration and request count; show has the rest
    assert "ey04-e00075:/data" in listed and "5.0 MB" in listed and "2.0 MB" in listed
    assert "42s" in listed and "files changed" in listed
    assert "reuse_key: gfs:data" in shown
    assert "request r1 (migration m-r1): waiting\n" in shown
    assert "request r2 (migration m-r2): waiting, reused" in shown
    assert main(["archives", "show", "no-such-archive"]) == 1
