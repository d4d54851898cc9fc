"""The other end of the snapshotter, for the lab tests: requests in, events out (read from
its outbox), and a stand-in archiver that reads a snapshot the way the real one does
(shared.nbd over the SSH tunnel, then tar --sort=name --numeric-owner)."""

from __future__ import annotations

import hashlib
import io
import json
import subprocess
import tarfile
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import zstandard
from sqlalchemy import select

from services.snapshotter.tables import snapshot_jobs
from shared.addresses import host_pool
from shared.bus import Publisher
from shared.contracts import (
    ArchiveCompleted,
    ArchiveFailed,
    ArchiveSource,
    Event,
    SnapshotReady,
    SnapshotReleased,
    SnapshotRequested,
)
from shared.envelope import Envelope
from shared.inbox_outbox import outbox_table
from shared.nbd import attach_export
from shared.runtime import Service


def publish(service: Service, event: Event) -> None:
    publisher = Publisher(service.settings.broker_url)
    try:
        envelope = Envelope.wrap(event, migration_id="m-lab")
        publisher.publish(envelope.to_json(), routing_key=envelope.routing_key)
    finally:
        publisher.close()


def request(service: Service, host: str, device: str, fs_type: str = "ext4") -> str:
    """Ask for a snapshot of `device` (the inventory's type `fs_type`, as the resolver
    sends it); the request id."""
    request_id = f"r-{uuid.uuid4().hex[:8]}"
    publish(service, SnapshotRequested(
        request_id=request_id, datacenter="lab", xen_host=host, device=device, size_bytes=0,
        driver="dm", reuse_key=f"key-{request_id}",
        source=ArchiveSource(host=host, device=device, label=f"lab:{device}",
                             fs_type=fs_type)))
    return request_id


def events(service: Service, event_type: str, request_id: str) -> list[Any]:
    with service.engine.connect() as connection:
        bodies = connection.execute(select(outbox_table.c.body).where(
            outbox_table.c.routing_key.startswith(event_type)).order_by(outbox_table.c.seq))
        found = [Envelope.from_json(body).event() for body in bodies.scalars()]
    return [e for e in found if getattr(e, "request_id", None) == request_id]


def wait_event(service: Service, event_type: str, request_id: str, count: int = 1,
               timeout: float = 90) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        state = job(service, request_id)  # read first: a failed job's events are in by then
        found = events(service, event_type, request_id)
        if len(found) >= count:
            return found[count - 1]
        if state is not None and state.state == "failed":
            break
        time.sleep(0.2)
    raise AssertionError(f"no {event_type} #{count} for {request_id} in {timeout}s; job: "
                         f"{job(service, request_id)}")


def job(service: Service, request_id: str) -> Any:
    with service.engine.connect() as connection:
        return connection.execute(select(snapshot_jobs).where(
            snapshot_jobs.c.request_id == request_id)).first()


def archive(service: Service, ready: SnapshotReady, run_dir: Path,
            fs_type: str = "ext4") -> dict[str, str]:
    """Read the snapshot through nbd over the SSH tunnel; {path in the archive: sha256}."""
    assert ready.port is not None
    hosts = host_pool(service.settings)
    try:
        with attach_export(hosts.get(ready.host), ready.export_name, ready.port,
                           fs_type=fs_type, run_dir=run_dir) as mounted:
            tar = subprocess.run(["tar", "--sort=name", "--numeric-owner", "-C", str(mounted),
                                  "-cf", "-", "."], capture_output=True, check=True, timeout=300)
    finally:
        hosts.close_all()
    return tar_hashes(tar.stdout)


def tar_hashes(tar: bytes) -> dict[str, str]:
    """{path in the tar archive: sha256} of its regular files."""
    hashes = {}
    with tarfile.open(fileobj=io.BytesIO(tar)) as archive_file:
        for member in archive_file.getmembers():
            data = archive_file.extractfile(member) if member.isfile() else None
            if data is not None:
                hashes[member.name.removeprefix("./")] = hashlib.sha256(data.read()).hexdigest()
    return hashes


def completed(ready: SnapshotReady) -> ArchiveCompleted:
    now = datetime.now(UTC)
    return ArchiveCompleted(
        datacenter="lab", request_id=ready.request_id, archive_id=f"a-{ready.snapshot_id}",
        kind="local_fs", reuse_key=ready.reuse_key, path="/tmp/x.tar.zst",
        file_name="x.tar.zst", raw_bytes=1, compressed_bytes=1, sha256="0" * 64,
        started_at=now, finished_at=now, snapshot_id=ready.snapshot_id)


def failed(ready: SnapshotReady, released: SnapshotReleased | None, reason: str) -> ArchiveFailed:
    """The archive of `ready` failed; will_retry when the snapshotter invalidated it."""
    invalidated = released is not None and released.invalidated
    return ArchiveFailed(datacenter="lab", request_id=ready.request_id, kind="local_fs",
                         reason=released.reason if invalidated and released else reason,
                         host=ready.host, will_retry=invalidated, snapshot_id=ready.snapshot_id)


def answer(archiver: Service, request_id: str, timeout: float = 180) -> dict[str, Any]:
    """The archiver's archive.completed / archive.failed for the request (from its outbox)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with archiver.engine.connect() as connection:
            bodies = connection.execute(select(outbox_table.c.body).where(
                outbox_table.c.routing_key.startswith("archive.")))
            for body in bodies.scalars():
                envelope = Envelope.from_json(body)
                if envelope.type in ("archive.completed", "archive.failed"):
                    payload = json.loads(body)["payload"]
                    if payload["request_id"] == request_id:
                        return {"type": envelope.type, **payload}
        time.sleep(0.3)
    raise AssertionError(f"no archive answer for {request_id} in {timeout}s")


def archived_hashes(path: Path) -> dict[str, str]:
    with path.open("rb") as compressed:
        return tar_hashes(zstandard.ZstdDecompressor().stream_reader(compressed).read())


def host_leftovers(run_dir: Path) -> list[str]:
    """Mounts, loops, nbdfuse and nbdkit processes of ours still on this machine."""
    found = [line for line in Path("/proc/mounts").read_text().splitlines()
             if str(run_dir) in line]
    found += [line for line in subprocess.run(["losetup", "-a"], capture_output=True,
                                              text=True, check=True).stdout.splitlines()
              if str(run_dir) in line]
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            argv = cmdline.read_bytes().split(b"\0")
        except OSError:
            continue
        if (argv[0].endswith((b"nbdfuse", b"nbdkit"))
                and any(str(run_dir).encode() in a for a in argv)):
            found.append(f"{argv[0].decode()} {cmdline.parent.name}")
    return found
