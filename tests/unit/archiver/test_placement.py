"""Choosing the VM a shared filesystem is read from: the mount table parsed, and which host
is passed over for which reason (fake hosts here; tests/integration/test_archiver_placement
has the real mounts and the real sshd)."""

from __future__ import annotations

from collections.abc import Collection

import pytest

from services.archiver.placement import (
    EmptyMountError,
    Mount,
    NoMountingHostError,
    NotMountedError,
    mounting_host,
    parse_mounts,
)
from shared.errors import HostUnreachableError
from shared.hosts import HostPool, Result, Sink
from shared.settings import Settings

PROC_MOUNTS = """\
/dev/xvda1 / ext3 rw,relatime 0 0
proc /proc proc rw 0 0
/dev/mapper/vg-gfs /data gfs2 rw,noatime,hostdata=jid=1 0 0
filer:/export/shared\\040files /mnt/shared\\040files nfs4 rw,vers=4.0 0 0
"""


def test_proc_mounts_parsed_with_the_kernels_escapes() -> None:
    mounts = parse_mounts(PROC_MOUNTS)
    assert mounts[2] == Mount("/dev/mapper/vg-gfs", "/data", "gfs2")
    assert mounts[3] == Mount("filer:/export/shared files", "/mnt/shared files", "nfs4")


class VM:
    """A fake VM: what the check script prints there, or unreachable."""

    def __init__(self, name: str, table: str | None, entries: str = "a\n") -> None:
        self.name = name
        self.table = table
        self.entries = entries

    def run(self, argv: list[str], *, timeout: float | None = None, sink: Sink | None = None,
            ok_exits: Collection[int] = (0,), stdin: bytes | None = None) -> Result:
        if self.table is None:
            raise HostUnreachableError(f"{self.name}: cannot connect")
        path = argv[-1]
        out = f"{path}\n@@mounts\n{self.table}@@entries\n{self.entries}"
        return Result(True, 0, out.encode(), "", argv, self.name)

    def run_pipeline(self, *args: object, **kwargs: object) -> Result:
        raise NotImplementedError

    def close(self) -> None:
        pass


def pool(*vms: VM) -> HostPool:
    by_name = {vm.name: vm for vm in vms}
    return HostPool(lambda name: by_name[name])


def test_an_unreachable_vm_is_passed_over_for_the_next_that_mounts_it() -> None:
    warnings: list[str] = []
    hosts = pool(VM("vm1", None), VM("vm2", PROC_MOUNTS))
    host = mounting_host(hosts, "vm1", ("vm2",), "/data", Settings(), warnings)
    assert host.name == "vm2"
    assert warnings == ["shared filesystem /data archived from vm2; passed over: vm1: "
                        "unreachable (vm1: cannot connect)"]


def test_a_vm_where_it_is_not_mounted_is_passed_over_too() -> None:
    unmounted = "/dev/xvda1 / ext3 rw 0 0\n"
    host = mounting_host(pool(VM("vm1", unmounted), VM("vm2", PROC_MOUNTS)), "vm1", ("vm2",),
                         "/data", Settings(), [])
    assert host.name == "vm2"


def test_not_mounted_anywhere_is_permanent_naming_every_vm() -> None:
    unmounted = "/dev/xvda1 / ext3 rw 0 0\n"
    with pytest.raises(NotMountedError) as refused:
        mounting_host(pool(VM("vm1", unmounted), VM("vm2", unmounted)), "vm1", ("vm2",),
                      "/data", Settings(), [])
    assert str(refused.value) == (
        "shared filesystem /data: not mounted on any of its VMs: vm1: shared filesystem /data "
        "is not mounted there (a plain directory in the ext3 filesystem at /); refusing to "
        "archive it; vm2: shared filesystem /data is not mounted there (a plain directory in "
        "the ext3 filesystem at /); refusing to archive it")


def test_unreachable_somewhere_and_unmounted_elsewhere_is_retried() -> None:
    with pytest.raises(NoMountingHostError, match="vm2: unreachable"):
        mounting_host(pool(VM("vm1", "/dev/xvda1 / ext3 rw 0 0\n"), VM("vm2", None)), "vm1",
                      ("vm2",), "/data", Settings(), [])


def test_an_empty_shared_filesystem_fails_at_once() -> None:
    # empty on one VM is empty on all (it is one filesystem): no other VM is asked
    with pytest.raises(EmptyMountError, match="vm1: shared filesystem /data .gfs2 from "
                                              "/dev/mapper/vg-gfs. is mounted but empty"):
        mounting_host(pool(VM("vm1", PROC_MOUNTS, entries=""), VM("vm2", None)), "vm1",
                      ("vm2",), "/data", Settings(), [])


def test_a_mount_of_a_type_not_shared_is_refused_unless_listed() -> None:
    table = "tmpfs /data tmpfs rw 0 0\n"
    with pytest.raises(NotMountedError, match="vm1: /data is a tmpfs mount"):
        mounting_host(pool(VM("vm1", table)), "vm1", (), "/data", Settings(), [])
    listed = Settings(shared_fs_extra_types="tmpfs,fuse.mfs")
    assert listed.shared_fs_extra_types == ("tmpfs", "fuse.mfs")
    assert mounting_host(pool(VM("vm1", table)), "vm1", (), "/data", listed, []).name == "vm1"
