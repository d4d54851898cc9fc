"""The snapshot cycle on a real kernel: a mounted ext4 with a writer running the whole time
is snapshotted with raw dmsetup, read through nbd over the SSH tunnel, and released."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from shared.runtime import Service
from tests.lab.flow import archive, completed, job, publish, request, wait_event
from tests.lab.guest import Guest


def test_snapshot_of_a_busy_origin_archives_the_snapshot_moment_and_releases_cleanly(
    lab: Guest, make_snapshotter: Callable[..., Service], tmp_path: Path,
) -> None:
    # Given a mounted ext4 origin with a writer running and a file written before
    lab.start_writer("vm1")
    before = lab.write_random("/mnt/vm1/before.bin", 2)
    service = make_snapshotter()
    # When a snapshot is requested and becomes ready
    request_id = request(service, lab.vm.address, "/dev/mapper/lab-vm1")
    ready = wait_event(service, "snapshot.ready", request_id)
    assert ready.snapshot_id.startswith("ferry-") and ready.port
    # ... and the origin changes afterwards: a new file, the old one overwritten
    after = lab.write_random("/mnt/vm1/after.bin", 1)
    changed = lab.write_random("/mnt/vm1/before.bin", 2)
    # Then the archive read through nbd over the SSH tunnel holds the snapshot moment
    hashes = archive(service, ready, tmp_path / "nbd")
    assert hashes["before.bin"] == before != changed
    assert "after.bin" not in hashes and "writer.log" in hashes
    # When the archive completes
    publish(service, completed(ready))
    released = wait_event(service, "snapshot.released", request_id)
    assert released.snapshot_id == ready.snapshot_id and not released.invalidated
    # Then nothing of Ferry's is left on the host, and the origin has every write
    assert job(service, request_id).phase == "released"
    assert lab.leftovers() == []
    last = lab.stop_writer("vm1")
    assert lab.writer_lines("vm1") == list(range(1, last + 1))
    assert lab.sh("sha256sum /mnt/vm1/after.bin /mnt/vm1/before.bin").split()[::2] == [
        after, changed]
    assert lab.fsck_clean("vm1") == ""
    # (list(tmp_path/"nbd") is empty: shared.nbd undid its mount, loop and nbdfuse)
    assert list((tmp_path / "nbd").iterdir()) == []
