"""Shared filesystems archived only where they are really mounted, and a VM's local root
without the filesystems mounted in it: real mounts (the test's own tmpfs, unmounted after),
the tests' sshd as the VM, real tar.

No shared filesystem type (NFS, GFS2, a FUSE sshfs) can be mounted on this machine without
a server or packages it does not have, so the tmpfs stands in for one by the setting a site
uses for its own types (FERRY_SHARED_FS_EXTRA_TYPES): the mount, the mount table and the
type check are real; only the list of accepted types is extended.
"""

from __future__ import annotations

import subprocess
import tarfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from ferry.loopback_sshd import free_port
from services.archiver.placement import NotMountedError, accepted_types, check_mounted
from services.archiver.probe import modern
from services.archiver.sources import ArchiveOrder, filesystem_command, tar_command
from shared.addresses import host_pool
from shared.hosts import LocalExecutor
from shared.settings import Settings
from tests.integration.test_archiver import (
    address,
    answers,
    archive_request,
    archiver_settings,
    jobs,
    running,
    send,
    sshd,
)
from tests.support.sshd import SshServer

__all__ = ["sshd"]  # the module-scoped sshd fixture, shared with test_archiver


@pytest.fixture
def mount_tmpfs() -> Iterator[list[Path]]:
    """The test's tmpfs mounts (made with `tmpfs`): each unmounted when the test ends,
    however it ends."""
    mounted: list[Path] = []
    yield mounted
    failed = [p for p in reversed(mounted)
              if subprocess.run(["umount", str(p)], check=False).returncode != 0]
    assert not failed, f"could not unmount {failed}"


def tmpfs(mounted: list[Path], path: Path, files: dict[str, str] | None = None) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "ferry-test-shared", str(path)],
                   check=True)
    mounted.append(path)
    for name, body in (files or {}).items():
        (path / name).parent.mkdir(parents=True, exist_ok=True)
        (path / name).write_text(body)
    return path


def unreachable() -> str:
    return f"root@127.0.0.1:{free_port()}"  # nothing listens there: connection refused


def test_shared_fs_is_archived_from_the_next_vm_that_mounts_it_and_never_when_unmounted(
    sshd: SshServer, tmp_path: Path, mount_tmpfs: list[Path],
) -> None:
    # Given a shared filesystem mounted on the sshd's VM, an empty one, and a plain directory
    shared = tmpfs(mount_tmpfs, tmp_path / "data", {"uploads/a.jpg": "jpeg", "b.txt": "b"})
    empty = tmpfs(mount_tmpfs, tmp_path / "empty")
    plain = tmp_path / "plain"
    (plain / "stale.txt").parent.mkdir(parents=True)
    (plain / "stale.txt").write_text("what the VM's own disk has under the mountpoint")
    settings = archiver_settings(tmp_path, sshd, compression="gzip",
                                 shared_fs_mount_check=True, shared_fs_extra_types=("tmpfs",))
    vm = address(sshd)
    with running(settings) as service:
        # When each is asked for, the first from a VM that cannot be reached (then the sshd),
        # and one whose every VM is unreachable
        send("memory://",
             (archive_request("r1", "shared_fs", "gfs:data", host=unreachable(),
                              alternates=(vm,), path=str(shared)), "m-1"),
             (archive_request("r2", "shared_fs", "gfs:empty", host=vm, path=str(empty)), "m-1"),
             (archive_request("r3", "shared_fs", "gfs:plain", host=vm, alternates=(vm,),
                              path=str(plain)), "m-1"),
             (archive_request("r4", "shared_fs", "gfs:gone", host=unreachable(),
                              alternates=(unreachable(),), path=str(shared)), "m-1"))
        found = answers(service, ["r1", "r2", "r3", "r4"])
        attempts = {job.reuse_key: job.attempts for job in jobs(service)}
    # Then the mounted one is archived from the VM that mounts it, saying which it passed
    assert found["r1"]["type"] == "archive.completed", found["r1"]
    [warning] = found["r1"]["warnings"]
    assert f"archived from {vm}; passed over: root@127.0.0.1:" in warning
    assert "unreachable" in warning
    with tarfile.open(found["r1"]["path"]) as archive:
        assert {"./uploads/a.jpg", "./b.txt"} <= set(archive.getnames())
    # and the empty mount and the plain directory are permanent errors naming host and path
    assert found["r2"]["type"] == "archive.failed"
    assert f"{vm}: shared filesystem {empty} (tmpfs from ferry-test-shared) is mounted but " \
           "empty" in found["r2"]["reason"]
    assert found["r3"]["type"] == "archive.failed"
    assert f"{vm}: shared filesystem {plain} is not mounted there" in found["r3"]["reason"]
    assert attempts["gfs:empty"] == attempts["gfs:plain"] == 1  # permanent: not retried
    # and with no VM reachable it is retried, then fails naming every VM it tried
    assert found["r4"]["type"] == "archive.failed"
    assert "NoMountingHostError" in found["r4"]["reason"]
    assert found["r4"]["reason"].count("unreachable") == 2
    assert attempts["gfs:gone"] == settings.max_attempts


def test_without_the_check_an_unmounted_or_empty_mountpoint_ships_as_an_archive(
    sshd: SshServer, tmp_path: Path, mount_tmpfs: list[Path],
) -> None:
    # Negative control: the same empty mount and plain directory, the check turned off
    empty = tmpfs(mount_tmpfs, tmp_path / "empty")
    plain = tmp_path / "plain"
    plain.mkdir()
    (plain / "stale.txt").write_text("stale")
    settings = archiver_settings(tmp_path, sshd, compression="gzip")  # check off there
    with running(settings) as service:
        send("memory://",
             (archive_request("r1", "shared_fs", "e", host=address(sshd), path=str(empty)),
              "m-1"),
             (archive_request("r2", "shared_fs", "p", host=address(sshd), path=str(plain)),
              "m-1"))
        found = answers(service, ["r1", "r2"])
    assert found["r1"]["type"] == found["r2"]["type"] == "archive.completed"
    with tarfile.open(found["r1"]["path"]) as archive:
        assert archive.getnames() == ["."]  # an empty archive, "successfully" made
    with tarfile.open(found["r2"]["path"]) as archive:
        assert "./stale.txt" in archive.getnames()  # the VM's disk, not the shared fs


def test_a_mount_of_a_local_type_is_refused_unless_the_site_lists_it(
    sshd: SshServer, tmp_path: Path, mount_tmpfs: list[Path],
) -> None:
    shared = tmpfs(mount_tmpfs, tmp_path / "data", {"a": "a"})
    settings = archiver_settings(tmp_path, sshd)
    pool = host_pool(settings)
    try:
        host = pool.get(address(sshd))
        # a tmpfs is not a shared type: refused with the default list, naming host and type
        with pytest.raises(NotMountedError, match=rf"{address(sshd)}: {shared} is a tmpfs "
                                                  "mount .* not a shared filesystem type"):
            check_mounted(host, str(shared), accepted_types(Settings()))
        # a symlink to the mountpoint is the mountpoint
        (tmp_path / "link").symlink_to(shared)
        types = accepted_types(Settings(shared_fs_extra_types="tmpfs"))
        assert check_mounted(host, str(tmp_path / "link"), types).fs_type == "tmpfs"
        # a directory inside the mount is not its mountpoint
        (shared / "sub").mkdir()
        (shared / "sub" / "x").write_text("x")
        with pytest.raises(NotMountedError, match=rf"not mounted there \(a plain directory "
                                                  rf"in the tmpfs filesystem at {shared}\)"):
            check_mounted(host, str(shared / "sub"), types)
    finally:
        pool.close_all()


def test_local_fs_without_snapshot_leaves_out_filesystems_mounted_inside(
    tmp_path: Path, mount_tmpfs: list[Path],
) -> None:
    # Given a VM's root (driver none: archived as it is) with a filesystem mounted in it
    root = tmp_path / "vm-root"
    (root / "etc").mkdir(parents=True)
    (root / "etc" / "hostname").write_text("ey04-s50000\n")
    tmpfs(mount_tmpfs, root / "data", {"customer-upload.bin": "on the GFS mount"})
    order = ArchiveOrder.model_validate({"kind": "local_fs", "source": {
        "host": "local", "path": str(root)}, "snapshot": {
        "snapshot_id": "s1", "driver": "none", "host": "local"}})
    settings = Settings(source_nice=False)

    def names(argv: list[str]) -> list[str]:
        out = LocalExecutor().run(argv, ok_exits=(0, 1)).stdout
        (tmp_path / "out.tar").write_bytes(out)
        with tarfile.open(tmp_path / "out.tar") as archive:
            return sorted(archive.getnames())

    # When it is archived
    command = filesystem_command(order, settings, tools=modern())
    # Then the mountpoint is there, empty, and the mounted filesystem's files are not
    assert "--one-file-system" in command.argv
    assert names(command.argv) == [".", "./data", "./etc", "./etc/hostname"]
    # ... where the same tar without --one-file-system would have shipped them
    assert "./data/customer-upload.bin" in names(
        tar_command(str(root), [], settings, modern()).argv)


def test_a_crafted_mountpoint_reaches_the_check_as_one_argument(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    # the path is the script's $1: a shell never reads it as code
    for path in (f"/data; touch {marker}", f"/tmp/$(touch {marker})"):
        with pytest.raises(NotMountedError,
                           match=r"local: shared filesystem /(data; touch|tmp/\$)"):
            check_mounted(LocalExecutor(), path, accepted_types(Settings()))
    assert not marker.exists()
