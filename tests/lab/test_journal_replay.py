"""Journal replay on live snapshots, on a real kernel: what a Xen host's snapshot of a running
guest holds (committed, fsync'ed, not yet checkpointed) is in the archive, and a disk that
holds another filesystem than the inventory says is refused without being mounted.

A dom0 snapshots an LV whose filesystem is mounted by the guest's kernel, not its own: the
snapshotter's `dmsetup suspend` (with lockfs, services/snapshotter/devicemapper.py) finds no
filesystem on the device to freeze, exactly as `--nolockfs` would. Here each "VM" mounts
its filesystem through a loop device over the dm device (its blkfront), so the suspend
cannot freeze it either; `needs_recovery` on the snapshot (ext*) and the negative controls
prove the journal is dirty. Periodic writeback and XFS's log worker are off in the guest, so
the fsync'ed transaction stays in the journal only until the snapshot is read.

One boot for the whole module. ext4, ext3 and XFS are archived by the real archiver service
on this machine (SSH tunnel, nbdkit cow, nbdfuse, loop, mount); this machine's kernel (6.18)
has no reiserfs, so the archiver fails that one clearly, and the same shared.nbd sequence
then runs in the guest (Debian 6.1, kernel nbd-client path).
"""

from __future__ import annotations

import os
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from services.snapshotter import exports
from services.snapshotter.drivers import DmDriver, SnapshotSpec
from shared.contracts import ArchiveSource, SnapshotReady
from shared.nbd import attach_export
from shared.runtime import Service
from tests.integration.test_archiver import running
from tests.lab.conftest import lab_settings
from tests.lab.flow import answer, archived_hashes, host_leftovers, publish, tar_hashes
from tests.lab.guest import Guest
from tests.lab.vm import LabVM

COW_DIR = "/var/lib/ferry/cow"
# (name, MiB) of each LV on /dev/vda, in order
LAYOUT = (("ext4", 24), ("ext3", 24), ("xfs", 32), ("reiserfs", 48), ("cramfs", 4),
          ("minix", 4), ("iso9660", 4))
JOURNALLED = ("ext4", "ext3", "xfs", "reiserfs")
MKFS = {"ext4": "mkfs.ext4 -q -F", "ext3": "mkfs.ext3 -q -F",
        # a small XFS, as customers' older xfsprogs made (5.19+ wants 300 MB without these)
        "xfs": "TEST_DIR=1 TEST_DEV=1 QA_CHECK_FS=1 mkfs.xfs -q -f",
        # the smallest journal (513 blocks, not 8193): replaying through nbd, nbdkit and
        # nbd-server all inside one emulated guest reads it in small requests, slowly
        "reiserfs": "mkreiserfs -q -f -f -s 513"}
# how the archiver mounted before: the journal skipped (reiserfs: nolog still wants to replay)
OLD_OPTIONS = {"ext4": "ro,noload", "ext3": "ro,noload", "xfs": "ro,norecovery,nouuid",
               "reiserfs": "ro,nolog"}
GUEST_RUN_DIR = "/run/ferry-archiver/nbd"


def prepare_script() -> str:
    lines = ["set -e",
             # no periodic writeback, no XFS log worker: a committed transaction stays in the
             # journal (not checkpointed) until the test has snapshotted and read it
             "echo 0 > /proc/sys/vm/dirty_writeback_centisecs",
             "echo 360000 > /proc/sys/vm/dirty_expire_centisecs",
             "echo 720000 > /proc/sys/fs/xfs/xfssyncd_centisecs"]
    start = 0
    for name, mib in LAYOUT:
        lines.append(f'dmsetup create lab-{name} --table "0 {mib * 2048} linear /dev/vda {start}"')
        start += mib * 2048
    for fs in JOURNALLED:
        lines += [f"{MKFS[fs]} /dev/mapper/lab-{fs} >/dev/null 2>&1",
                  # the VM's view of its disk (blkfront): a filesystem dom0 cannot freeze
                  f"loop=$(/usr/sbin/losetup --direct-io=on -f --show /dev/mapper/lab-{fs})",
                  f"mkdir -p /mnt/{fs} && mount -t {fs} $loop /mnt/{fs}"]
    lines += ["mkfs.ext4 -q -F /dev/vdb", f"mkdir -p {COW_DIR}", f"mount /dev/vdb {COW_DIR}"]
    return "\n".join(lines)


def other_image(kind: str, tmp: Path) -> Path:
    """A 4 MiB (or smaller) image of `kind`, made by its real tool on this machine."""
    tree = tmp / "tree"
    tree.mkdir(exist_ok=True)
    (tree / "hello.txt").write_text("hello\n")
    path = tmp / f"{kind}.img"
    if kind == "minix":
        with path.open("wb") as disk:
            disk.truncate(4 << 20)
        argv = ["mkfs.minix", "-1", str(path)]
    elif kind == "cramfs":
        argv = ["mkfs.cramfs", str(tree), str(path)]
    else:
        argv = ["genisoimage", "-quiet", "-o", str(path), str(tree)]
    subprocess.run(argv, check=True, capture_output=True)
    return path


@pytest.fixture(scope="module")
def journal_lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Guest]:
    """One guest for the module: a mounted ext4, ext3, XFS and reiserfs "VM" each, and three
    disks holding a cramfs, a minix and an iso9660 image."""
    tmp = tmp_path_factory.mktemp("images")
    with LabVM(origin_mib=sum(mib for _, mib in LAYOUT) + 4) as vm:
        vm.sh(prepare_script(), timeout=300)
        for kind in ("cramfs", "minix", "iso9660"):
            data = other_image(kind, tmp).read_bytes()
            vm.host().run(["sh", "-c", 'cat > "$0"', f"/dev/mapper/lab-{kind}"], stdin=data,
                          timeout=120)
        yield Guest(vm)


@pytest.fixture
def archiver(journal_lab: Guest, tmp_path: Path) -> Iterator[Service]:
    """The real archiver service (datacenter "lab", memory:// + SQLite)."""
    settings = lab_settings(journal_lab.vm, tmp_path, staging_dir=tmp_path / "staging",
                            nbd_run_dir=tmp_path / "nbd")
    with running(settings, datacenter="lab", concurrency=1) as service:
        yield service


@pytest.fixture
def mounts(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A log of every `mount` this process's commands run (a wrapper first on PATH that
    records its arguments and runs the real mount)."""
    spy = tmp_path / "spy"
    spy.mkdir()
    record = tmp_path / "mounts.log"
    record.touch()
    (spy / "mount").write_text(f'#!/bin/sh\necho "$*" >> {record}\nexec /usr/bin/mount "$@"\n')
    (spy / "mount").chmod(0o755)
    monkeypatch.setenv("PATH", f"{spy}:{os.environ['PATH']}")
    return record


def snapshot(lab: Guest, device: str) -> tuple[str, int]:
    """Snapshot `device` with the snapshotter's own dm driver and export it read-only with
    its own nbd-server code; (snapshot id, port)."""
    host = lab.vm.host()
    sid = f"ferry-{uuid.uuid4().hex[:12]}-1"
    made = DmDriver(None, COW_DIR).create(host, SnapshotSpec(sid, device, 8 << 20))
    return sid, exports.start(host, sid, made.export_device)


def release(lab: Guest, sid: str) -> None:
    host = lab.vm.host()
    exports.stop(host, sid)
    DmDriver(None, COW_DIR).release(host, sid)


def ready(vm: LabVM, sid: str, port: int, device: str, fs_type: str) -> SnapshotReady:
    return SnapshotReady(datacenter="lab", request_id=f"r-{sid}", snapshot_id=sid, driver="dm",
                         host=vm.address, export_name=sid, port=port, size_bytes=0,
                         reuse_key=f"key-{sid}",
                         source=ArchiveSource(host=vm.address, device=device, fs_type=fs_type,
                                              label=f"lab:{device}"))


def old_way(lab: Guest, device: str, fs_type: str) -> str:
    """Mount `device` as the archiver did before (journal skipped, read-only device) in the
    guest: "present"/"missing" for committed.bin, or "refused: <why>"."""
    return lab.sh(
        f"loop=$(/usr/sbin/losetup -r -f --show {device}); mkdir -p /mnt/old; "
        f"if mount -t {fs_type} -o {OLD_OPTIONS[fs_type]} $loop /mnt/old 2>/tmp/old.err; then "
        "if [ -e /mnt/old/committed.bin ]; then echo present; else echo missing; fi; "
        "umount /mnt/old; else echo \"refused: $(cat /tmp/old.err)\"; fi; "
        "/usr/sbin/losetup -d $loop"
    ).strip()


def dumpe2fs_features(lab: Guest, device: str) -> list[str]:
    out = lab.sh(f"dumpe2fs -h {device} 2>/dev/null | grep '^Filesystem features:'")
    return out.split(":", 1)[1].split()


@pytest.mark.parametrize("fs_type", ["ext4", "ext3", "xfs"])
def test_a_file_fsynced_just_before_a_dom0_snapshot_is_archived_by_replaying_the_journal(
    fs_type: str, journal_lab: Guest, archiver: Service, mounts: Path,
) -> None:
    lab, device = journal_lab, f"/dev/mapper/lab-{fs_type}"
    # Given a running VM's filesystem holding a file written and fsync'ed just before
    digest = lab.write_random(f"/mnt/{fs_type}/committed.bin", 1)
    # When the Xen host snapshots it (nothing froze it) and exports it read-only
    sid, port = snapshot(lab, device)
    try:
        snap = f"/dev/mapper/{sid}-snap"
        # ... its journal holds the file's transaction, not yet checkpointed
        if fs_type != "xfs":
            assert "needs_recovery" in dumpe2fs_features(lab, snap)
        # ... so the old way (journal skipped, read-only) does not see the file at all
        assert old_way(lab, snap, fs_type) == "missing"
        # ... and the archiver service archives it through the COW layer
        publish(archiver, ready(lab.vm, sid, port, device, fs_type))
        done = answer(archiver, f"r-{sid}")
        # Then the archive holds the file with its content
        assert done["type"] == "archive.completed", done
        assert archived_hashes(Path(done["path"]))["committed.bin"] == digest
        # ... mounted once, as the inventory's type, with the fixed options
        options = "ro,nosuid,nodev,noexec" + (",nouuid" if fs_type == "xfs" else "")
        seen = mounts.read_text().splitlines()
        assert len(seen) == 1 and seen[0].startswith(f"-t {fs_type} -o {options} /dev/loop")
        # ... and nothing is left here: no mount, loop, nbdfuse, nbdkit nor overlay
        run_dir = archiver.settings.nbd_run_dir
        assert run_dir is not None
        assert host_leftovers(run_dir) == [] and list(run_dir.iterdir()) == []
        # ... nor was anything written to the Xen host's snapshot: it still needs recovery
        assert old_way(lab, snap, fs_type) == "missing"
    finally:
        release(lab, sid)
    assert lab.leftovers() == []


def test_reiserfs_fails_clearly_here_and_is_replayed_where_the_kernel_has_it(
    journal_lab: Guest, archiver: Service, mounts: Path,
) -> None:
    lab, device = journal_lab, "/dev/mapper/lab-reiserfs"
    # Given a running VM's reiserfs holding a file written and fsync'ed just before a snapshot
    digest = lab.write_random("/mnt/reiserfs/committed.bin", 1)
    sid, port = snapshot(lab, device)
    guest = lab.vm.host()
    try:
        snap = f"/dev/mapper/{sid}-snap"
        # ... whose dirty log the old way (nolog, read-only) cannot mount at all
        assert old_way(lab, snap, "reiserfs").startswith("refused")
        # When this archiver (kernel 6.18: no reiserfs) is asked to archive it
        publish(archiver, ready(lab.vm, sid, port, device, "reiserfs"))
        done = answer(archiver, f"r-{sid}")
        # Then it fails permanently, naming the kernel and where it can be done, unmounted
        assert done["type"] == "archive.failed" and not done["will_retry"], done
        assert "cannot mount reiserfs" in done["reason"] and "6.12 or older" in done["reason"]
        assert mounts.read_text() == ""
        # When the same sequence runs on a machine whose kernel has reiserfs (the guest's)
        with attach_export(None, sid, port, fs_type="reiserfs", run_dir=Path(GUEST_RUN_DIR),
                           on=guest, where=f"{lab.vm.address}: {sid}") as mounted:
            nbd_used = lab.sh("cat /sys/block/nbd*/size | grep -vx 0 | wc -l").strip()
            tar = guest.run(["tar", "-C", str(mounted), "-cf", "-", "."], timeout=120).stdout
        # Then the journal was replayed into the COW layer: the file is there, as written
        assert tar_hashes(tar)["committed.bin"] == digest
        assert nbd_used == "1"  # through the kernel nbd-client path
        # ... and nothing is left there: no nbd device, nbdkit, attachment directory
        assert lab.sh("cat /sys/block/nbd*/size | grep -vx 0 | wc -l").strip() == "0"
        assert lab.sh("pidof nbdkit || true").strip() == ""
        assert lab.sh(f"ls {GUEST_RUN_DIR}").strip() == ""
        # ... nor was the Xen host's snapshot written: it still refuses the old way
        assert old_way(lab, snap, "reiserfs").startswith("refused")
    finally:
        release(lab, sid)
    assert lab.leftovers() == []


@pytest.mark.parametrize("kind", ["cramfs", "minix", "iso9660"])
def test_a_disk_holding_another_filesystem_is_refused_without_being_mounted(
    kind: str, journal_lab: Guest, archiver: Service, mounts: Path, tmp_path: Path,
) -> None:
    lab, device = journal_lab, f"/dev/mapper/lab-{kind}"
    # Given a customer's disk the inventory calls ext4, holding a {kind} image: blkid (what
    # the archiver used to mount by) would call it {kind}
    blkid = lab.vm.host().run(["sh", "-c", f"head -c 1048576 {device}"]).stdout
    (tmp_path / "head.img").write_bytes(blkid)
    probed = subprocess.run(["blkid", "-p", "-o", "value", "-s", "TYPE",
                             str(tmp_path / "head.img")], capture_output=True, text=True)
    assert probed.stdout.strip() == kind
    # When it is exported read-only and the archiver is asked to archive it
    sid = f"ferry-{uuid.uuid4().hex[:12]}-1"
    port = exports.start(lab.vm.host(), sid, device)
    try:
        publish(archiver, ready(lab.vm, sid, port, device, "ext4"))
        done = answer(archiver, f"r-{sid}")
    finally:
        exports.stop(lab.vm.host(), sid)
    # Then it fails permanently, naming what the disk holds, and nothing was mounted
    assert done["type"] == "archive.failed" and not done["will_retry"], done
    assert "no ext4 superblock" in done["reason"] and f"found: {kind}" in done["reason"]
    assert mounts.read_text() == ""
    run_dir = archiver.settings.nbd_run_dir
    assert run_dir is not None
    assert host_leftovers(run_dir) == [] and list(run_dir.iterdir()) == []


def test_a_mount_the_kernel_refuses_fails_permanently_with_its_message(
    journal_lab: Guest, archiver: Service, mounts: Path,
) -> None:
    lab = journal_lab
    # Given a disk the inventory calls ext3 whose filesystem is an ext4 (extents: ext3 can't)
    sid = f"ferry-{uuid.uuid4().hex[:12]}-1"
    port = exports.start(lab.vm.host(), sid, "/dev/mapper/lab-ext4")
    try:
        # When the archiver is asked to archive it
        publish(archiver, ready(lab.vm, sid, port, "/dev/mapper/lab-ext4", "ext3"))
        done = answer(archiver, f"r-{sid}")
    finally:
        exports.stop(lab.vm.host(), sid)
    # Then it fails permanently, naming the host, snapshot and export and the kernel's words
    assert done["type"] == "archive.failed" and not done["will_retry"], done
    reason = done["reason"]
    assert reason.startswith(f"MountError: {lab.vm.address}: snapshot {sid} (export {sid})")
    assert "couldn't mount as ext3 due to feature incompatibilities" in reason
    # ... after one mount as the inventory's type, with no fallback to another way
    seen = mounts.read_text().splitlines()
    assert len(seen) == 1 and seen[0].startswith("-t ext3 -o ro,nosuid,nodev,noexec /dev/loop")
    run_dir = archiver.settings.nbd_run_dir
    assert run_dir is not None
    assert host_leftovers(run_dir) == [] and list(run_dir.iterdir()) == []
