"""The transfer service against a real sshd on 127.0.0.1 and real rsync: archives arrive,
verified; an interrupted copy resumes; damage is repaired; a strange host key is refused."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select

from services.transfer.bootstrap import bootstrap
from services.transfer.commands import requeue_transfers
from services.transfer.tables import transfer_attempts, transfers
from shared.contracts import (
    ArchiveCompleted,
    ArchiveSource,
    Event,
    MigrationResolved,
    PlannedJob,
)
from shared.digests import file_sha256
from shared.envelope import Envelope
from shared.inbox_outbox import outbox_table
from shared.runtime import Service
from shared.settings import Settings
from tests.integration.test_backbone import publish
from tests.support.helpers import wait_for
from tests.support.sshd import SshServer, generate_key

MiB = 1 << 20


@pytest.fixture(scope="module")
def server() -> Iterator[SshServer]:
    with SshServer() as sshd:
        yield sshd


def make_archive(directory: Path, size: int, name: str = "a1.tar.zst") -> tuple[Path, str]:
    """A random (incompressible, like a compressed archive) staging file and its sha256."""
    path, digest = directory / name, hashlib.sha256()
    with path.open("wb") as file:
        for _ in range(0, size, 8 * MiB):
            chunk = os.urandom(min(8 * MiB, size - file.tell()))
            digest.update(chunk)
            file.write(chunk)
    return path, digest.hexdigest()


def remote_settings(server: SshServer, root: Path, tmp_path: Path, **overrides: Any) -> Settings:
    values: dict[str, Any] = {
        "broker_url": "memory://", "state_dir": tmp_path / "state", "staging_dir": tmp_path,
        "destination": f"{server.user}@{server.host}:{server.port}:{root}",
        "ssh_key_path": server.user_key_path, "ssh_known_hosts_path": server.known_hosts_path,
        "ssh_connect_timeout": 5, "outbox_poll_seconds": 0.1, "job_poll_seconds": 0.1,
        "lease_seconds": 3.0, "transfer_backoff_seconds": 0.2,
        "transfer_progress_seconds": 0.5, "transfer_timeout_seconds": 30,
    }
    values.update(overrides)
    return Settings(**values)


class Migration:
    """One migration's events, as the resolver and the archiver would publish them."""

    def __init__(self, broker_url: str, migration_id: str | None = None) -> None:
        self.broker_url = broker_url
        self.id = migration_id or f"m-{uuid.uuid4().hex[:12]}"

    def resolve(self, *request_ids: str) -> Envelope:
        jobs = tuple(PlannedJob(request_id=r, kind="shared_fs", datacenter="ey04", reuse_key=r,
                                source=ArchiveSource(host="local")) for r in request_ids)
        return self._publish(MigrationResolved(
            customer_id="c", allocations={}, resolved_document={}, jobs=jobs))

    def archive(self, request_id: str, archive_id: str, path: Path, sha256: str) -> Envelope:
        now = datetime.now(UTC)
        return self._publish(ArchiveCompleted(
            datacenter="ey04", request_id=request_id, archive_id=archive_id, kind="shared_fs",
            reuse_key=archive_id, path=str(path), file_name=path.name,
            raw_bytes=path.stat().st_size, compressed_bytes=path.stat().st_size, sha256=sha256,
            started_at=now, finished_at=now))

    def _publish(self, event: Event) -> Envelope:
        envelope = Envelope.wrap(event, migration_id=self.id)
        publish(self.broker_url, envelope)
        return envelope


@pytest.fixture
def services() -> Iterator[list[Service]]:
    started: list[Service] = []
    yield started
    for service in started:
        service.stop()
        service.engine.dispose()


def start(settings: Settings, services: list[Service], **options: Any) -> Service:
    service = bootstrap(settings, **options)
    service.start()
    services.append(service)
    return service


def send_one(settings: Settings, services: list[Service], source: Path,
             sha256: str) -> tuple[Service, Migration]:
    """The service started, then a migration of one request r1 whose archive a1 is `source`."""
    service = start(settings, services)
    migration = Migration("memory://")
    migration.resolve("r1")
    migration.archive("r1", "a1", source, sha256)
    return service, migration


def job_of(service: Service, archive_id: str) -> Any:
    with service.engine.connect() as connection:
        return connection.execute(
            select(transfers).where(transfers.c.archive_id == archive_id)).first()


def bytes_done(service: Service, archive_id: str) -> int:
    job = job_of(service, archive_id)
    return 0 if job is None else int(job.bytes_done)


def wait_job(service: Service, archive_id: str, state: str, timeout: float = 60) -> Any:
    def reached() -> Any:
        job = job_of(service, archive_id)
        if job is not None and job.state == "failed" and state != "failed":
            raise AssertionError(f"transfer failed: {job.error}")
        return job if job is not None and job.state == state else None

    return wait_for(reached, timeout=timeout, what=f"transfer of {archive_id} {state}")


def attempts(service: Service, job_id: str) -> list[Any]:
    a = transfer_attempts
    with service.engine.connect() as connection:
        return list(connection.execute(
            select(a).where(a.c.job_id == job_id).order_by(a.c.attempt)).all())


def emitted(service: Service, kind: str) -> list[dict[str, Any]]:
    with service.engine.connect() as connection:
        bodies = connection.execute(select(outbox_table.c.body).where(
            outbox_table.c.routing_key == kind).order_by(outbox_table.c.seq)).scalars()
        return [json.loads(body) for body in bodies]


def rsync_ssh_pids() -> list[int]:
    """The ssh clients that this test process's rsyncs started (not the test sshd's tree)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            status = (entry / "status").read_text()
            fields = dict(line.split(":\t", 1) for line in status.splitlines() if ":\t" in line)
            parent = int(fields["PPid"])
            parent_status = Path(f"/proc/{parent}/status").read_text()
            grandparent = int(parent_status.split("PPid:\t", 1)[1].split()[0])
        except (OSError, KeyError, ValueError, IndexError):
            continue
        if (fields.get("Name", "").strip() == "ssh" and "Name:\trsync" in parent_status
                and grandparent == os.getpid()):
            found.append(int(entry.name))
    return found


def test_archive_of_200_mib_is_transferred_and_verified(
    server: SshServer, tmp_path: Path, services: list[Service],
) -> None:
    # Given a 200 MiB archive in staging and the transfer service sending to the sshd
    source, digest = make_archive(tmp_path, 200 * MiB)
    root = tmp_path / "new-site"
    # When the migration expects one request and its archive is completed
    service, migration = send_one(remote_settings(server, root, tmp_path), services, source,
                                  digest)
    # Then the file arrives whole, its sha256 checked at the destination
    job = wait_job(service, "a1", "done")
    arrived = root / migration.id / source.name
    assert file_sha256(arrived) == digest == job.result["sha256"]
    assert job.bytes_done == job.bytes_total == 200 * MiB
    [sent] = emitted(service, "transfer.completed")
    assert sent["payload"]["request_id"] == "r1" and sent["payload"]["bytes"] == 200 * MiB
    assert sent["payload"]["destination"].endswith(f"{root}/{migration.id}/{source.name}")
    assert sent["payload"]["mb_per_s"] > 0
    assert [e["payload"] for e in emitted(service, "migration.completed")] == [
        {"archives": 1, "bytes": 200 * MiB}]
    [attempt] = attempts(service, job.id)
    assert attempt.outcome == "transferred" and attempt.bytes_sent >= 200 * MiB


def test_connection_killed_at_half_resumes_and_sends_less_than_60_percent_again(
    server: SshServer, tmp_path: Path, services: list[Service],
) -> None:
    # Given a 64 MiB archive sent at 8 MiB/s, so "about half" is a moment we can hit
    size = 64 * MiB
    source, digest = make_archive(tmp_path, size)
    root = tmp_path / "new-site"
    service, migration = send_one(
        remote_settings(server, root, tmp_path, transfer_bwlimit_kbps=8192), services, source,
        digest)
    # When the connection dies (its ssh killed) once half the file is at the destination
    arriving = root / migration.id / source.name
    wait_for(lambda: arriving.exists() and arriving.stat().st_size >= size // 2, timeout=30,
             what="half the archive at the destination")
    pids = rsync_ssh_pids()
    assert len(pids) == 1, f"expected one rsync ssh of this worker, found {pids}"
    os.kill(pids[0], signal.SIGKILL)
    # Then the retry resumes, sending less than 60 % of the file again, and it verifies
    job = wait_job(service, "a1", "done", timeout=60)
    first, second = attempts(service, job.id)
    assert first.outcome == "retry" and first.exit_code in {10, 12, 255}, first
    assert second.outcome == "transferred"
    assert 0.25 * size < second.bytes_sent < 0.6 * size, f"resent {second.bytes_sent} of {size}"
    assert second.literal_bytes < 0.6 * size
    assert file_sha256(arriving) == digest
    assert len(emitted(service, "transfer.completed")) == 1
    progress = emitted(service, "archive.progress.ey04")
    assert progress and all(p["payload"]["stage"] == "transfer" for p in progress)
    assert any(p["payload"]["eta_s"] for p in progress)


def test_corrupted_byte_at_the_destination_is_detected_and_repaired(
    server: SshServer, tmp_path: Path, services: list[Service],
) -> None:
    # Given an archive transferred and verified
    source, digest = make_archive(tmp_path, 8 * MiB)
    root = tmp_path / "new-site"
    service, migration = send_one(remote_settings(server, root, tmp_path), services, source,
                                  digest)
    job = wait_job(service, "a1", "done")
    # When one byte of the copy flips silently (size and mtime unchanged)
    arrived = root / migration.id / source.name
    stat = arrived.stat()
    with arrived.open("r+b") as file:
        file.seek(4 * MiB)
        byte = file.read(1)
        file.seek(4 * MiB)
        file.write(bytes([byte[0] ^ 0xFF]))
    os.utime(arrived, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    # And the migration's transfers are checked again (`ferry transfer verify`)
    assert requeue_transfers(service.engine, migration.id) == 1
    service.wake()
    # Then the sha256 at the destination catches it, the copy is resent from zero and verifies
    wait_for(lambda: len(attempts(service, job.id)) == 3, what="the check and the resend")
    wait_job(service, "a1", "done")
    outcomes = [a.outcome for a in attempts(service, job.id)]
    assert outcomes == ["transferred", "sha256_mismatch", "transferred"]
    assert "sha256 at" in attempts(service, job.id)[1].error
    assert file_sha256(arrived) == digest
    assert len(emitted(service, "migration.completed")) == 1


@pytest.mark.parametrize("case", ["unknown", "changed"])
def test_unknown_or_changed_host_key_is_refused_and_nothing_is_sent(
    case: str, server: SshServer, tmp_path: Path, services: list[Service],
) -> None:
    # Given a known_hosts file without the sshd's key, or with another key for it
    known_hosts = tmp_path / "known_hosts"
    if case == "unknown":
        known_hosts.write_text(f"other.example {server.host_key_pub}\n")
    else:
        impostor = generate_key(tmp_path / "impostor_key")
        known_hosts.write_text(f"[{server.host}]:{server.port} {impostor}\n")
    source, digest = make_archive(tmp_path, 1 * MiB)
    root = tmp_path / "new-site"
    service, _ = send_one(
        remote_settings(server, root, tmp_path, ssh_known_hosts_path=known_hosts), services,
        source, digest)
    # Then the transfer fails at once with an error that names the host key, nothing sent
    job = wait_job(service, "a1", "failed")
    expected = "host key unknown" if case == "unknown" else "host key CHANGED"
    assert expected in job.error and "refusing to connect" in job.error
    assert job.attempts == 1
    [failed] = emitted(service, "transfer.failed")
    assert expected in failed["payload"]["reason"]
    assert emitted(service, "migration.failed")[0]["payload"]["stage"] == "transfer"
    assert not root.exists()


def test_local_destination_of_the_embedded_default_uses_the_same_path(
    tmp_path: Path, services: list[Service],
) -> None:
    # Given no FERRY_DESTINATION: the embedded default's local directory
    settings = Settings(broker_url="memory://", state_dir=tmp_path / "state",
                        staging_dir=tmp_path, outbox_poll_seconds=0.1, job_poll_seconds=0.1)
    source, digest = make_archive(tmp_path, 4 * MiB)
    service, migration = send_one(settings, services, source, digest)
    # Then the archive is copied by rsync there and verified
    job = wait_job(service, "a1", "done")
    arrived = tmp_path / "state" / "destination" / migration.id / source.name
    assert file_sha256(arrived) == digest and job.result["destination"] == str(arrived)
    assert len(emitted(service, "migration.completed")) == 1


def test_staging_file_whose_sha256_is_not_the_recorded_one_is_never_sent(
    server: SshServer, tmp_path: Path, services: list[Service],
) -> None:
    # Given an archive.completed whose sha256 is not its staging file's
    source, _ = make_archive(tmp_path, 1 * MiB)
    root = tmp_path / "new-site"
    service, migration = send_one(remote_settings(server, root, tmp_path), services, source,
                                  "0" * 64)
    # Then the transfer fails before anything is sent, naming both digests
    job = wait_job(service, "a1", "failed")
    assert [a.outcome for a in attempts(service, job.id)] == ["failed"]
    assert "has sha256" in job.error and "recorded " + "0" * 64 in job.error
    assert emitted(service, "transfer.failed")[0]["payload"]["attempts"] == 1
    assert not (root / migration.id / source.name).exists()


def test_stopped_service_gives_its_transfer_back_and_the_next_one_resumes_it(
    server: SshServer, tmp_path: Path, services: list[Service],
) -> None:
    # Given a transfer under way
    size = 32 * MiB
    source, digest = make_archive(tmp_path, size)
    root = tmp_path / "new-site"
    settings = remote_settings(server, root, tmp_path, transfer_bwlimit_kbps=8192)
    first, migration = send_one(settings, services, source, digest)
    wait_for(lambda: bytes_done(first, "a1") >= size // 4, timeout=30, what="a quarter sent")
    # When the service is stopped, then rsync is stopped and the job is pending again,
    # without counting as a failed attempt
    first.stop()
    services.remove(first)
    job = job_of(first, "a1")
    assert job.state == "pending" and job.attempts == 0
    assert [a.outcome for a in attempts(first, job.id)] == ["interrupted"]
    first.engine.dispose()
    # When the service starts again, then it resumes the copy and completes it
    second = start(settings, services)
    wait_job(second, "a1", "done")
    resumed = attempts(second, job.id)[1]
    assert resumed.outcome == "transferred" and resumed.bytes_sent < 0.9 * size
    assert file_sha256(root / migration.id / source.name) == digest
