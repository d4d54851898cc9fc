"""The archive job's bookkeeping on the embedded database: leftovers swept at start."""

from __future__ import annotations

from pathlib import Path

from sqlalchemy import select, update

from services.archiver import SCHEMA as ARCHIVER_SCHEMA
from services.archiver.handlers import record_archive_request
from services.archiver.jobs import Archiver
from services.archiver.tables import archive_jobs
from shared.addresses import host_pool
from shared.contracts import ArchiveRequested, ArchiveSource
from shared.envelope import Envelope
from shared.runtime import deliver, open_database
from shared.settings import Settings


def test_start_sweeps_partials_of_archives_no_one_is_writing(tmp_path: Path) -> None:
    settings = Settings(state_dir=tmp_path, staging_dir=tmp_path / "staging")
    units = open_database(settings, ARCHIVER_SCHEMA)
    engine = units.engine
    for name in ("done", "running", "pending"):
        event = ArchiveRequested(datacenter="ey04", request_id=name, kind="shared_fs",
                                 reuse_key=name, source=ArchiveSource(host="local", path="/x"))
        deliver(record_archive_request, event, Envelope.wrap(event, migration_id="m"), units)
        with engine.begin() as connection:
            connection.execute(update(archive_jobs).where(archive_jobs.c.reuse_key == name)
                               .values(state=name))
    with engine.connect() as connection:
        ids = dict(connection.execute(select(archive_jobs.c.reuse_key, archive_jobs.c.id)).all())
    staging = settings.staging_dir / "ey04"
    staging.mkdir(parents=True)
    # Given partial files a killed worker left: of a finished, a running, a pending and an
    # unknown archive, and a sealed archive
    for archive_id in [*ids.values(), "0" * 32]:
        (staging / f"{archive_id}.tar.zst.abcd1234.partial").write_bytes(b"half")
    (staging / f"{ids['done']}.tar.zst").write_bytes(b"sealed")
    # When an archiver starts
    Archiver(settings, engine, "ey04", host_pool(settings)).sweep_partials()
    # Then only the running archive's partial and the sealed archive remain
    assert sorted(p.name for p in staging.iterdir()) == sorted([
        f"{ids['running']}.tar.zst.abcd1234.partial", f"{ids['done']}.tar.zst"])
    engine.dispose()
