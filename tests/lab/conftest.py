"""Fixtures of the lab: one booted guest per test module, prepared like a Xen host.

The guest's /dev/vda is split into two dm linear devices (what LVs are), `lab-vm1` (96 MiB)
and `lab-vm2` (32 MiB), each with an ext4 mounted as a running VM would have it;
/dev/vdb holds the COW files (`/var/lib/ferry/cow`). A failure to boot fails the tests.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from services.snapshotter.bootstrap import bootstrap
from services.snapshotter.drivers import StepHook
from shared.runtime import Service
from shared.settings import Settings
from tests.lab.guest import Guest
from tests.lab.vm import LabVM

PREPARE = """
set -e
dmsetup create lab-vm1 --table "0 196608 linear /dev/vda 0"
dmsetup create lab-vm2 --table "0 65536 linear /dev/vda 196608"
for vm in vm1 vm2; do
  mkfs.ext4 -q -F /dev/mapper/lab-$vm
  mkdir -p /mnt/$vm && mount /dev/mapper/lab-$vm /mnt/$vm
done
mkfs.ext4 -q -F /dev/vdb
mkdir -p /var/lib/ferry/cow && mount /dev/vdb /var/lib/ferry/cow
"""


@pytest.fixture(scope="module")
def lab() -> Iterator[Guest]:
    """A booted lab guest with two mounted origins (booted once per module)."""
    with LabVM() as vm:
        vm.sh(PREPARE)
        yield Guest(vm)


def lab_settings(vm: LabVM, tmp: Path, **overrides: object) -> Settings:
    values: dict[str, object] = {
        "broker_url": "memory://", "state_dir": tmp,
        "snapshotter_database_url": f"sqlite:///{tmp}/snapshotter.sqlite3",
        "ssh_key_path": vm.user_key_path, "ssh_known_hosts_path": vm.known_hosts_path,
        "ssh_connect_timeout": 20.0, "lease_seconds": 6.0, "job_poll_seconds": 0.2,
        "outbox_poll_seconds": 0.2, "retry_delays": (0.5, 1.0), "max_attempts": 3,
        "snapshot_watch_seconds": 1.0, "snapshot_slot_wait_seconds": 0.5,
        "reconcile_seconds": 3600.0, "snapshot_cow_dir": "/var/lib/ferry/cow",
    }
    values.update(overrides)
    return Settings(**values)  # type: ignore[arg-type]


@pytest.fixture
def make_snapshotter(lab: Guest, tmp_path: Path) -> Iterator[object]:
    """Start the snapshotter service against the lab, with settings overrides."""
    started: list[Service] = []

    def make(on_step: StepHook | None = None, **overrides: object) -> Service:
        settings = lab_settings(lab.vm, tmp_path, **overrides)
        service = bootstrap(settings, on_step=on_step)
        service.start()
        started.append(service)
        return service

    yield make
    for service in started:
        service.stop()
        service.engine.dispose()
