"""Snapshot drivers behind one interface: `dm` (raw dmsetup, what `lvcreate --snapshot` does,
for clustered LVM that cannot), `lvm` (`lvcreate -s`) and `none` (archive the source as is).

Every driver's `release` works from the snapshot id alone and is idempotent: the reconciler
calls it for leftovers no table row explains, a worker calls it before retrying a create.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from services.snapshotter import devicemapper as dm
from shared.errors import FerryError, PermanentError
from shared.hosts import Host

MIB = 1 << 20
MIN_COW_BYTES = MIB
CHUNK_SECTORS = 8  # 4 KiB COW chunks, lvcreate's default
TIMEOUT = 60.0

StepHook = Callable[[str], None]


@dataclass(frozen=True)
class SnapshotSpec:
    snapshot_id: str  # ferry-<job id>-<attempt>
    device: str  # the origin; "" for driver none on a directory
    cow_bytes: int


@dataclass(frozen=True)
class Snapshot:
    snapshot_id: str
    export_device: str  # what nbd-server serves; "" when nothing is exported (none)
    size_bytes: int
    cow_bytes: int


@dataclass(frozen=True)
class CowUsage:
    valid: bool
    used_bytes: int
    total_bytes: int


class Driver(Protocol):
    name: str

    def create(self, host: Host, spec: SnapshotSpec, on_step: StepHook | None = None) -> Snapshot:
        """Make the snapshot. On failure nothing is left and the origin is live. Raises
        OriginError / PermanentError (retrying cannot help) or TransientError."""
        ...

    def usage(self, host: Host, snapshot_id: str) -> CowUsage | None:
        """COW fill and validity; None when there is nothing to watch (or it is gone)."""
        ...

    def release(self, host: Host, snapshot_id: str) -> None:
        """Remove the snapshot, give the origin its own table back. Idempotent."""
        ...

    def leftovers(self, host: Host) -> set[str]:
        """Ids of every snapshot of this driver's making found on the host."""
        ...


def cow_size(wanted: int) -> int:
    """The COW size made for `wanted` bytes: whole MiB, at least MIN_COW_BYTES."""
    return max(MIN_COW_BYTES, -(-wanted // MIB) * MIB)


def _noop(_step: str) -> None:
    return None


class NoneDriver:
    """No snapshot: the archiver reads the device or directory as it is (quiescent sources)."""

    name = "none"

    def create(self, host: Host, spec: SnapshotSpec, on_step: StepHook | None = None) -> Snapshot:
        return Snapshot(spec.snapshot_id, "", 0, 0)

    def usage(self, host: Host, snapshot_id: str) -> CowUsage | None:
        return None

    def release(self, host: Host, snapshot_id: str) -> None:
        return None

    def leftovers(self, host: Host) -> set[str]:
        return set()


class DmDriver:
    """Raw device-mapper, as the seed did under clustered LVM. The COW is an LV in `cow_vg`
    when set, else a file in `cow_dir` on a loop device."""

    name = "dm"

    def __init__(self, cow_vg: str | None, cow_dir: str) -> None:
        self.cow_vg = cow_vg
        self.cow_dir = cow_dir.rstrip("/")

    def create(self, host: Host, spec: SnapshotSpec, on_step: StepHook | None = None) -> Snapshot:
        step = on_step or _noop
        origin = dm.name_of(host, spec.device)
        live = dm.table(host, origin)
        if any(line.split()[2:3] in (["snapshot-origin"], ["snapshot"])
               for line in live.splitlines()):
            raise dm.OriginError(f"{host.name}: {spec.device} ({origin}) already has a snapshot")
        sectors = dm.size_sectors(host, spec.device)
        cow_bytes = cow_size(spec.cow_bytes)
        sid = spec.snapshot_id
        real, snap = f"{sid}-real", f"{sid}-snap"
        try:
            cow = self._make_cow(host, sid, cow_bytes)
            step("cow")
            dm.create(host, real, live)
            step("suspending")
            dm.suspend(host, origin)
            try:
                step("suspended")
                dm.create(host, snap, f"0 {sectors} snapshot /dev/mapper/{real} {cow} P "
                                      f"{CHUNK_SECTORS}")
                dm.load(host, origin, f"0 {sectors} snapshot-origin /dev/mapper/{real}")
                step("loaded")
                dm.resume(host, origin)
            finally:
                # a suspended origin hangs the customer's VM: whatever happened, it runs again
                self._resume(host, origin)
            step("resumed")
        except BaseException:
            with contextlib.suppress(FerryError):
                self.release(host, sid)
            raise
        return Snapshot(sid, f"/dev/mapper/{snap}", sectors * 512, cow_bytes)

    @staticmethod
    def _resume(host: Host, origin: str) -> None:
        """Resume `origin` if it is still suspended, with its live (original) table."""
        for attempt in range(3):  # an SSH connection lost mid-create is reopened by the host
            try:
                if dm.is_suspended(host, origin):
                    dm.clear(host, origin)
                    dm.resume(host, origin)
                return
            except FerryError:
                if attempt == 2:
                    raise

    def _make_cow(self, host: Host, sid: str, cow_bytes: int) -> str:
        if self.cow_vg:
            host.run(["lvcreate", "-y", "-n", f"{sid}-cow", "-L", f"{cow_bytes}b", self.cow_vg],
                     timeout=TIMEOUT)
            return f"/dev/{self.cow_vg}/{sid}-cow"
        path = f"{self.cow_dir}/{sid}.cow"
        host.run(["mkdir", "-p", self.cow_dir], timeout=TIMEOUT)
        host.run(["truncate", "-s", str(cow_bytes), path], timeout=TIMEOUT)
        done = host.run(["losetup", "-f", "--show", path], timeout=TIMEOUT)
        return done.stdout.decode().strip()

    def usage(self, host: Host, snapshot_id: str) -> CowUsage | None:
        done = host.run(["dmsetup", "status", f"{snapshot_id}-snap"], timeout=TIMEOUT,
                        ok_exits=(0, 1))
        if done.exited != 0:
            return None
        valid, used, total = dm.snapshot_usage(done.stdout.decode())
        return CowUsage(valid, used * 512, total * 512)

    def release(self, host: Host, snapshot_id: str) -> None:
        devices = {d.name: d for d in dm.scan(host)}
        real = devices.get(f"{snapshot_id}-real")
        origins = []
        if real is not None:
            for device in devices.values():
                if device.name.startswith(dm.NAME_PREFIX):
                    continue
                if f"snapshot-origin {real.number}" in device.table:
                    origins.append(device.name)
                elif device.suspended and device.table == real.table:
                    # killed between suspend and resume, its own table still live: the
                    # customer's VM hangs until this resume, so it comes first
                    self._resume(host, device.name)
        dm.remove(host, f"{snapshot_id}-snap")
        for origin in origins:  # reverse of create: the origin gets its own table back
            if not dm.is_suspended(host, origin):
                dm.suspend(host, origin)
            try:
                dm.load(host, origin, real.table if real else "")
                dm.resume(host, origin)
            finally:
                self._resume(host, origin)
        if real is not None:
            dm.remove(host, real.name)
        self._remove_cow(host, snapshot_id)

    def _remove_cow(self, host: Host, sid: str) -> None:
        if self.cow_vg:
            lv = f"{self.cow_vg}/{sid}-cow"
            if host.run(["lvs", lv], timeout=TIMEOUT, ok_exits=(0, 5)).exited == 0:
                host.run(["lvremove", "-f", lv], timeout=TIMEOUT)
            return
        path = f"{self.cow_dir}/{sid}.cow"
        for loop, backing in _loops(host):
            if backing == path:
                host.run(["losetup", "-d", loop], timeout=TIMEOUT, ok_exits=(0, 1))
        host.run(["rm", "-f", path], timeout=TIMEOUT)

    def leftovers(self, host: Host) -> set[str]:
        found = {dm.snapshot_id_of(d.name) for d in dm.scan(host)}
        found |= {dm.snapshot_id_of(b.rsplit("/", 1)[-1]) for _, b in _loops(host)
                  if b.startswith(f"{self.cow_dir}/")}
        if self.cow_vg:
            found |= {dm.snapshot_id_of(lv) for lv in _lv_names(host, self.cow_vg)}
        return {sid for sid in found if sid}


class LvmDriver:
    """`lvcreate -s` on a (non-clustered) LV; LVM suspends and resumes the origin itself."""

    name = "lvm"

    def create(self, host: Host, spec: SnapshotSpec, on_step: StepHook | None = None) -> Snapshot:
        device = dm.check_device(spec.device)
        vg = host.run(["lvs", "--noheadings", "-o", "vg_name", device],
                      timeout=TIMEOUT).stdout.decode().strip()
        if not vg:
            raise PermanentError(f"{host.name}: {device} is not a logical volume")
        cow_bytes = cow_size(spec.cow_bytes)
        name = f"{spec.snapshot_id}-snap"
        host.run(["lvcreate", "-y", "-s", "-n", name, "-L", f"{cow_bytes}b", device],
                 timeout=TIMEOUT)
        size = int(host.run(["blockdev", "--getsize64", device], timeout=TIMEOUT).stdout)
        return Snapshot(spec.snapshot_id, f"/dev/{vg}/{name}", size, cow_bytes)

    def _find(self, host: Host, snapshot_id: str) -> str | None:
        for vg, lv in _all_lvs(host):
            if lv == f"{snapshot_id}-snap":
                return f"{vg}/{lv}"
        return None

    def usage(self, host: Host, snapshot_id: str) -> CowUsage | None:
        lv = self._find(host, snapshot_id)
        if lv is None:
            return None
        attr, percent, size = host.run(
            ["lvs", "--noheadings", "--nosuffix", "--units", "b", "--separator", ",",
             "-o", "lv_attr,snap_percent,lv_size", lv], timeout=TIMEOUT,
        ).stdout.decode().strip().split(",")
        total = int(float(size))
        if attr[4:5] == "I":  # the fifth attribute: I = invalid snapshot
            return CowUsage(False, total, total)
        return CowUsage(True, int(total * float(percent or 0) / 100), total)

    def release(self, host: Host, snapshot_id: str) -> None:
        lv = self._find(host, snapshot_id)
        if lv is not None:
            host.run(["lvremove", "-f", lv], timeout=TIMEOUT)

    def leftovers(self, host: Host) -> set[str]:
        return {sid for _, lv in _all_lvs(host) if (sid := dm.snapshot_id_of(lv))}


def _loops(host: Host) -> list[tuple[str, str]]:
    """(loop device, backing file) of every attached loop device."""
    done = host.run(["losetup", "-l", "-n", "-O", "NAME,BACK-FILE"], timeout=TIMEOUT,
                    ok_exits=(0, 1))
    pairs = []
    for line in done.stdout.decode().splitlines():
        parts = line.split(None, 1)
        if len(parts) == 2:
            pairs.append((parts[0], parts[1].strip()))
    return pairs


def _all_lvs(host: Host) -> list[tuple[str, str]]:
    done = host.run(["lvs", "--noheadings", "--separator", ",", "-o", "vg_name,lv_name"],
                    timeout=TIMEOUT, ok_exits=(0, 5))
    return [(vg.strip(), lv.strip()) for vg, _, lv in
            (line.partition(",") for line in done.stdout.decode().splitlines()) if lv]


def _lv_names(host: Host, vg: str) -> list[str]:
    return [lv for group, lv in _all_lvs(host) if group == vg]


def driver_for(name: str, cow_vg: str | None, cow_dir: str) -> Driver:
    """The driver called `name`. Raises PermanentError for an unknown one."""
    if name == "dm":
        return DmDriver(cow_vg, cow_dir)
    if name == "lvm":
        return LvmDriver()
    if name == "none":
        return NoneDriver()
    raise PermanentError(f"unknown snapshot driver {name!r} (dm, lvm, none)")
