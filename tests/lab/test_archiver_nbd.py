"""The real archiver service archives a dm snapshot on a real kernel: snapshot.ready from the
real snapshotter, nbd over the SSH tunnel, mounted read-only here, tar + zstd here, released."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from services.archiver.bootstrap import bootstrap as bootstrap_archiver
from services.snapshotter.bootstrap import bootstrap as bootstrap_snapshotter
from shared.runtime import Service
from shared.settings import Settings
from tests.lab.conftest import lab_settings
from tests.lab.flow import answer, archived_hashes, host_leftovers, request, wait_event
from tests.lab.guest import Guest
from tests.support.helpers import wait_for

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def services(lab: Guest, tmp_path: Path) -> Iterator[tuple[Service, Service]]:
    """The real snapshotter and the real archiver (datacenter "lab") on one memory:// bus."""
    settings = lab_settings(lab.vm, tmp_path, staging_dir=tmp_path / "staging",
                            nbd_run_dir=tmp_path / "nbd")
    snapshotter = bootstrap_snapshotter(settings)
    archiver = bootstrap_archiver(settings, datacenter="lab", concurrency=1)
    snapshotter.start()
    archiver.start()
    try:
        yield snapshotter, archiver
    finally:
        archiver.stop()
        snapshotter.stop()
        archiver.engine.dispose()
        snapshotter.engine.dispose()


def test_archiver_service_archives_a_busy_origin_snapshot_through_nbd_and_it_is_released(
    lab: Guest, services: tuple[Service, Service], tmp_path: Path,
) -> None:
    snapshotter, archiver = services
    settings: Settings = archiver.settings
    # Given a mounted ext4 origin with a writer running and a file written before
    lab.start_writer("vm1")
    before = lab.write_random("/mnt/vm1/before.bin", 2)
    # When a snapshot is requested (as the resolver would) and becomes ready
    request_id = request(snapshotter, lab.vm.address, "/dev/mapper/lab-vm1")
    ready = wait_event(snapshotter, "snapshot.ready", request_id)
    # ... and the origin changes afterwards: a new file, the old one overwritten
    lab.write_random("/mnt/vm1/after.bin", 1)
    changed = lab.write_random("/mnt/vm1/before.bin", 2)
    # Then the archiver answers archive.completed for that snapshot
    done = answer(archiver, request_id)
    assert done["type"] == "archive.completed", done
    assert done["snapshot_id"] == ready.snapshot_id and done["kind"] == "local_fs"
    # ... its archive (zstd-compressed here) holds the snapshot moment
    archive_path = Path(done["path"])
    assert archive_path.parent == (settings.staging_dir / "lab").absolute()
    assert hashlib.sha256(archive_path.read_bytes()).hexdigest() == done["sha256"]
    hashes = archived_hashes(archive_path)
    assert hashes["before.bin"] == before != changed
    assert "after.bin" not in hashes and "writer.log" in hashes
    # ... and the snapshotter releases the snapshot: nothing of Ferry's is left on either side
    released = wait_event(snapshotter, "snapshot.released", request_id)
    assert released.snapshot_id == ready.snapshot_id and not released.invalidated
    assert lab.leftovers() == []
    assert host_leftovers(settings.nbd_run_dir or tmp_path) == []
    assert list((tmp_path / "nbd").iterdir()) == []
    last = lab.stop_writer("vm1")
    assert lab.writer_lines("vm1") == list(range(1, last + 1))


def mounted_by(run_dir: Path) -> str | None:
    """The mountpoint a (possibly dead) archiver recorded and still has mounted, if any."""
    for state_file in run_dir.glob("*/state.json"):
        try:
            mounted = json.loads(state_file.read_text()).get("mounted")
        except (OSError, ValueError):
            continue
        if mounted and f" {mounted} " in Path("/proc/mounts").read_text():
            return str(mounted)
    return None


def test_archiver_killed_while_the_snapshot_is_mounted_is_cleaned_and_another_completes(
    lab: Guest, rabbit_url: str, tmp_path: Path,
) -> None:
    # Given the snapshotter and an archiver process on a real broker, and a busy origin
    lab.start_writer("vm1")
    before = lab.write_random("/mnt/vm1/big.bin", 24)
    settings = lab_settings(lab.vm, tmp_path, broker_url=rabbit_url,
                            staging_dir=tmp_path / "staging", nbd_run_dir=tmp_path / "nbd")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "FERRY_BROKER_URL": rabbit_url,
           "FERRY_STATE_DIR": str(tmp_path), "FERRY_STAGING_DIR": str(tmp_path / "staging"),
           "FERRY_NBD_RUN_DIR": str(tmp_path / "nbd"),
           "FERRY_SSH_KEY_PATH": str(lab.vm.user_key_path),
           "FERRY_SSH_KNOWN_HOSTS_PATH": str(lab.vm.known_hosts_path),
           "FERRY_SSH_CONNECT_TIMEOUT": "20", "FERRY_LEASE_SECONDS": "6",
           "FERRY_JOB_POLL_SECONDS": "0.2", "FERRY_OUTBOX_POLL_SECONDS": "0.2",
           "FERRY_RETRY_DELAYS": "0.5,1", "FERRY_MAX_ATTEMPTS": "3"}
    snapshotter = bootstrap_snapshotter(settings)
    snapshotter.start()
    process = subprocess.Popen([sys.executable, "-m", "services.archiver", "--datacenter", "lab"],
                               cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                               stderr=open(tmp_path / "archiver.log", "w"))
    archiver: Service | None = None
    try:
        request_id = request(snapshotter, lab.vm.address, "/dev/mapper/lab-vm1")
        ready = wait_event(snapshotter, "snapshot.ready", request_id)
        # When the archiver process is SIGKILLed while it has the snapshot mounted
        wait_for(lambda: mounted_by(tmp_path / "nbd") is not None, 120,
                 "the archiver mounts the snapshot")
        dead_mount = mounted_by(tmp_path / "nbd")
        os.kill(process.pid, signal.SIGKILL)
        process.wait(timeout=30)
        assert dead_mount is not None and mounted_by(tmp_path / "nbd") == dead_mount
        # ... and another archiver starts
        archiver = bootstrap_archiver(settings, datacenter="lab", concurrency=1)
        archiver.start()
        # Then its reconciler undid the dead one's mount, loop and nbdfuse at start
        assert f" {dead_mount} " not in Path("/proc/mounts").read_text()
        assert not Path(dead_mount).parent.exists()
        # ... and it takes the job over once the lease expired, and completes it
        done = answer(archiver, request_id)
        assert done["type"] == "archive.completed", done
        assert done["snapshot_id"] == ready.snapshot_id
        assert archived_hashes(Path(done["path"]))["big.bin"] == before
        wait_event(snapshotter, "snapshot.released", request_id)
        assert lab.leftovers() == []
        assert host_leftovers(tmp_path / "nbd") == []
        assert list((tmp_path / "nbd").iterdir()) == []
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(timeout=30)
        if archiver is not None:
            archiver.stop()
            archiver.engine.dispose()
        snapshotter.stop()
        snapshotter.engine.dispose()
    lab.stop_writer("vm1")
