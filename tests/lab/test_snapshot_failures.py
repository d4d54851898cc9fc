"""What goes wrong on a real kernel: a failure or a kill right after the origin was
suspended, a COW too small for the writer, the per-host limit, an archiver killed while it
had a snapshot mounted."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from services.snapshotter.drivers import DmDriver, SnapshotSpec
from services.snapshotter.jobs import SnapshotWork
from services.snapshotter.reconciler import reconcile
from shared.addresses import host_pool
from shared.nbd import reconcile as reconcile_mounts
from shared.runtime import Service
from tests.lab.conftest import lab_settings
from tests.lab.flow import (
    archive,
    completed,
    events,
    failed,
    host_leftovers,
    job,
    publish,
    request,
    wait_event,
)
from tests.lab.guest import Guest
from tests.support.helpers import wait_for

ROOT = Path(__file__).resolve().parents[2]


class InjectedFault(Exception):
    pass


def fail_after_suspend(step: str) -> None:
    if step == "suspended":
        raise InjectedFault("injected: the COW device broke right after the suspend")


def test_failure_after_suspend_resumes_the_origin_at_once(lab: Guest, tmp_path: Path) -> None:
    # Given a busy origin
    lab.start_writer("vm1")
    settings = lab_settings(lab.vm, tmp_path)
    host = host_pool(settings).get(lab.vm.address)
    # When the create fails right after `dmsetup suspend`
    with pytest.raises(InjectedFault):
        DmDriver(None, "/var/lib/ferry/cow").create(
            host, SnapshotSpec("ferry-0123456789ab-1", "/dev/mapper/lab-vm1", 8 << 20),
            fail_after_suspend)
    # Then the origin runs again, is writable within seconds, and nothing is left
    assert not lab.suspended("lab-vm1")
    assert lab.writable_within("vm1") < 10
    assert lab.leftovers() == []
    last = lab.stop_writer("vm1")
    assert lab.writer_lines("vm1") == list(range(1, last + 1))
    host.close()


def _spawn(tmp_path: Path, settings_env: dict[str, str], *args: str) -> subprocess.Popen[str]:
    env = {**os.environ, **settings_env, "PYTHONPATH": str(ROOT)}
    return subprocess.Popen([sys.executable, "-m", "tests.lab.hold", *args], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=open(tmp_path / "hold.log", "w"),
                            text=True)


def _wait_line(process: subprocess.Popen[str], prefix: str, timeout: float = 120) -> str:
    deadline = time.monotonic() + timeout
    assert process.stdout is not None
    while time.monotonic() < deadline:
        line = process.stdout.readline()
        if line.startswith(prefix):
            return line.strip()
        if not line and process.poll() is not None:
            break
    raise AssertionError(f"the held process never printed {prefix}")


def test_snapshotter_killed_after_suspend_is_repaired_by_the_reconciler(
    lab: Guest, make_snapshotter: Callable[..., Service], tmp_path: Path,
) -> None:
    # Given a snapshotter process that stops right after suspending a busy origin
    lab.start_writer("vm1")
    service = make_snapshotter(concurrency=1)
    service.workers[0].stop()  # this one only records the request: the process below works
    request_id = request(service, lab.vm.address, "/dev/mapper/lab-vm1")
    env = {"FERRY_SNAPSHOTTER_DATABASE_URL": str(service.engine.url),
           "FERRY_SSH_KEY_PATH": str(lab.vm.user_key_path),
           "FERRY_SSH_KNOWN_HOSTS_PATH": str(lab.vm.known_hosts_path),
           "FERRY_LEASE_SECONDS": "6", "FERRY_JOB_POLL_SECONDS": "0.2",
           "FERRY_RECONCILE_SECONDS": "3600", "FERRY_SNAPSHOT_COW_DIR": "/var/lib/ferry/cow"}
    held = _spawn(tmp_path, env, "snapshotter")
    try:
        _wait_line(held, "SUSPENDED")
        assert lab.suspended("lab-vm1")
        # When it is killed there (SIGKILL: no finally runs)
        held.kill()
        held.wait(timeout=30)
    finally:
        if held.poll() is None:
            held.kill()
    assert lab.suspended("lab-vm1")
    # Then once its lease expired (6 s here), the reconciler resumes the origin and removes
    # the rest: the origin is writable within seconds of the reconciler's round
    time.sleep(6.5)
    hosts = host_pool(service.settings)
    started = time.monotonic()
    torn = reconcile(SnapshotWork(service.settings, service.units, hosts))
    hosts.close_all()
    assert torn == {lab.vm.address: [job(service, request_id).snapshot_id]}
    assert not lab.suspended("lab-vm1")
    assert time.monotonic() - started + lab.writable_within("vm1") < 30
    assert lab.leftovers() == []
    # ... and the job, taken over by a live worker, completes
    other = make_snapshotter(concurrency=1)
    ready = wait_event(other, "snapshot.ready", request_id)
    publish(other, completed(ready))
    wait_event(other, "snapshot.released", request_id)
    assert lab.leftovers() == []
    last = lab.stop_writer("vm1")
    assert lab.writer_lines("vm1") == list(range(1, last + 1))
    assert lab.fsck_clean("vm1") == ""


def test_cow_too_small_is_invalidated_and_retried_with_a_larger_cow(
    lab: Guest, make_snapshotter: Callable[..., Service], tmp_path: Path,
) -> None:
    # Given a COW of 4 MiB (4 % of the 96 MiB origin) and a writer
    lab.start_writer("vm1")
    service = make_snapshotter(snapshot_cow_share=0.04)
    request_id = request(service, lab.vm.address, "/dev/mapper/lab-vm1")
    first = wait_event(service, "snapshot.ready", request_id)
    assert job(service, request_id).cow_bytes == 4 << 20
    # When the VM writes more than the COW holds
    lab.write_random("/mnt/vm1/burst.bin", 6)
    # Then the snapshot is found invalid, torn down and released as such
    released = wait_event(service, "snapshot.released", request_id)
    assert released.invalidated and released.snapshot_id == first.snapshot_id
    assert "COW full" in released.reason
    # ... the archive reading it fails with that reason (and will be retried)
    publish(service, failed(first, released, "read error"))
    # ... and the retry, with a COW twice as large, succeeds
    second = wait_event(service, "snapshot.ready", request_id, count=2)
    assert second.snapshot_id != first.snapshot_id
    assert job(service, request_id).cow_bytes == 8 << 20
    burst = lab.sh("sha256sum /mnt/vm1/burst.bin").split()[0]
    assert archive(service, second, tmp_path / "nbd")["burst.bin"] == burst
    publish(service, completed(second))
    final = wait_event(service, "snapshot.released", request_id, count=2)
    assert not final.invalidated and job(service, request_id).phase == "released"
    assert lab.leftovers() == []
    lab.stop_writer("vm1")
    assert lab.fsck_clean("vm1") == ""


def test_two_snapshots_on_one_host_with_limit_one_run_one_after_the_other(
    lab: Guest, make_snapshotter: Callable[..., Service], tmp_path: Path,
) -> None:
    # Given the per-host limit 1 and two origins on one host
    service = make_snapshotter(snapshots_per_host=1)
    # When both are requested at once
    requested = [request(service, lab.vm.address, "/dev/mapper/lab-vm1"),
                 request(service, lab.vm.address, "/dev/mapper/lab-vm2")]
    # Then one is made (whichever worker took the slot first); the other waits for the slot
    # while the first is active
    def ready() -> list[Any]:
        return [e for r in requested for e in events(service, "snapshot.ready", r)]

    wait_for(ready, 90, "a snapshot.ready")
    [first] = ready()
    one = first.request_id
    [two] = [r for r in requested if r != one]
    time.sleep(2)
    waiting = job(service, two)
    assert waiting.phase == "waiting" and "waiting for a slot" in (waiting.error or "")
    assert [n for n in lab.leftovers() if n.endswith("-snap")] == [f"{first.snapshot_id}-snap"]
    # When the first is released, the second runs
    publish(service, completed(first))
    wait_event(service, "snapshot.released", one)
    second = wait_event(service, "snapshot.ready", two)
    publish(service, completed(second))
    wait_event(service, "snapshot.released", two)
    assert lab.leftovers() == []


def test_archiver_killed_while_mounted_is_cleaned_by_the_nbd_reconciler(
    lab: Guest, make_snapshotter: Callable[..., Service], tmp_path: Path,
) -> None:
    # Given an archiver process that mounted a snapshot through nbd over the tunnel
    service = make_snapshotter()
    request_id = request(service, lab.vm.address, "/dev/mapper/lab-vm2")
    ready = wait_event(service, "snapshot.ready", request_id)
    run_dir = tmp_path / "nbd"
    env = {"FERRY_SSH_KEY_PATH": str(lab.vm.user_key_path),
           "FERRY_SSH_KNOWN_HOSTS_PATH": str(lab.vm.known_hosts_path)}
    held = _spawn(tmp_path, env, "mount", lab.vm.address, ready.export_name, str(ready.port),
                  str(run_dir))
    try:
        mounted = _wait_line(held, "MOUNTED").split(" ", 1)[1]
        # When it is SIGKILLed while the snapshot is mounted
        os.kill(held.pid, signal.SIGKILL)
        held.wait(timeout=30)
    finally:
        if held.poll() is None:
            held.kill()
    assert mounted in Path("/proc/mounts").read_text()
    processes = {line.split()[0] for line in host_leftovers(run_dir)}
    assert {"nbdfuse", "nbdkit"} <= processes  # the COW layer's nbdkit outlived its owner
    # Then the reconciler unmounts, detaches and stops what it left (the COW layer too)
    cleaned = reconcile_mounts(run_dir)
    assert cleaned == [str(Path(mounted).parent)]
    assert str(run_dir) not in Path("/proc/mounts").read_text()
    loops = subprocess.run(["losetup", "-l", "-n", "-O", "BACK-FILE"], capture_output=True,
                           text=True, check=True).stdout
    assert str(run_dir) not in loops
    assert host_leftovers(run_dir) == [] and list(run_dir.iterdir()) == []
    # ... and the snapshot is released as usual once the archive ends elsewhere
    publish(service, completed(ready))
    wait_event(service, "snapshot.released", request_id)
    assert lab.leftovers() == []
