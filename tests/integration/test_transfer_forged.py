"""Transfer believes no archive.completed that names what is not the archive's to name: a
file outside staging, another archive's place at the destination, a request already sent.
Each is dead-lettered as refused, and the verified copy at the destination stays as it is."""

from __future__ import annotations

import os
from datetime import UTC, datetime
from pathlib import Path

import pytest

from ferry.dlq import DeadLetter, list_dead
from shared.contracts import ArchiveCompleted
from shared.digests import file_sha256
from shared.envelope import Envelope
from shared.runtime import Service
from shared.settings import Settings
from tests.integration.test_backbone import publish
from tests.integration.test_transfer import (
    MiB,
    Migration,
    emitted,
    make_archive,
    services,  # noqa: F401 - the fixture
    start,
    wait_job,
)
from tests.support.helpers import wait_for


def forged(migration: Migration, request_id: str, archive_id: str, path: Path,
           file_name: str) -> Envelope:
    now, size = datetime.now(UTC), path.stat().st_size
    envelope = Envelope.wrap(ArchiveCompleted(
        datacenter="ey04", request_id=request_id, archive_id=archive_id, kind="shared_fs",
        reuse_key=archive_id, path=str(path), file_name=file_name, raw_bytes=size,
        compressed_bytes=size, sha256=file_sha256(path), started_at=now, finished_at=now),
        migration_id=migration.id)
    publish(migration.broker_url, envelope)
    return envelope


@pytest.fixture
def finished(tmp_path: Path, services: list[Service]) -> tuple[Service, Migration, Path]:  # noqa: F811
    staging = tmp_path / "staging"
    staging.mkdir()
    settings = Settings(broker_url="memory://", state_dir=tmp_path / "state",
                        staging_dir=staging, outbox_poll_seconds=0.1, job_poll_seconds=0.1)
    service = start(settings, services)
    source, digest = make_archive(staging, 1 * MiB)
    migration = Migration("memory://")
    migration.resolve("r1")
    migration.archive("r1", "a1", source, digest)
    wait_job(service, "a1", "done")
    wait_for(lambda: emitted(service, "migration.completed"), what="migration completed")
    arrived = tmp_path / "state" / "destination" / migration.id / source.name
    assert file_sha256(arrived) == digest
    return service, migration, arrived


def test_forged_archive_completed_are_refused_and_the_verified_copy_stays(
        finished: tuple[Service, Migration, Path], tmp_path: Path) -> None:
    service, migration, arrived = finished
    verified, when = file_sha256(arrived), os.stat(arrived).st_mtime_ns
    outside = tmp_path / "secret.txt"  # a file on the transfer host, not in staging
    outside.write_bytes(b"not an archive\n")
    other, _ = make_archive(tmp_path / "staging", 1 * MiB, "other.tar.zst")
    envelopes = [
        # a file outside staging
        forged(migration, "r9", "a9", outside, "a9.tar.zst"),
        # a symlink in staging pointing out of it
        forged(migration, "r8", "a8", _link(tmp_path / "staging" / "link.tar.zst", outside),
               "a8.tar.zst"),
        # the verified archive's name at the destination, for another archive
        forged(migration, "r7", "a7", other, arrived.name),
        # the request already sent, as another archive
        forged(migration, "r1", "a6", other, "a6.tar.zst"),
    ]
    ids = {str(e.id) for e in envelopes}

    def ours() -> dict[str, DeadLetter]:  # the embedded broker is one per process
        return {letter.id: letter for letter in list_dead("memory://", service.queue.name)
                if letter.id in ids}

    wait_for(lambda: len(ours()) == len(envelopes), what="every forged event dead-lettered")
    letters = ours()
    assert {letter.reason for letter in letters.values()} == {"refused"}
    # The verified copy is untouched, nothing else was sent or failed
    assert (file_sha256(arrived), os.stat(arrived).st_mtime_ns) == (verified, when)
    assert sorted(p.name for p in arrived.parent.iterdir()) == [arrived.name]
    assert emitted(service, "transfer.failed") == [] == emitted(service, "migration.failed")


def _link(path: Path, target: Path) -> Path:
    path.symlink_to(target)
    return path
