"""Where a shared filesystem is read from: a VM on which it is really mounted, now.

A shared filesystem (GFS2 in the field report) is mounted on several VMs. Archived from a
VM where the mount is gone (a fenced cluster node, an NFS client after a reboot), tar reads
the empty or stale directory under the mountpoint on the VM's own disk and the archive is
silently not the customer's data. So before streaming, the VM's mount table (/proc/mounts:
findmnt is newer than the old site's hosts) must show the path as a mountpoint of a network
or cluster filesystem type, and the mounted filesystem must not be empty. A VM that cannot
be reached is skipped for the next one that mounts it (`source.alternates`, in order).
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from pathlib import PurePosixPath

from shared.errors import PermanentError, TransientError
from shared.hosts import Host, HostPool
from shared.settings import Settings

log = logging.getLogger(__name__)

# /proc/mounts' type names of filesystems several machines mount at once. Not fuse.* as a
# whole: a FUSE mount can be a local one (bindfs, an overlay) just as well. A site with
# another shared type adds it with FERRY_SHARED_FS_EXTRA_TYPES.
SHARED_FS_TYPES = frozenset({
    "gfs2", "gfs",  # Red Hat cluster filesystems (GFS: RHEL 5's)
    "ocfs2",  # Oracle's cluster filesystem
    "nfs", "nfs4",  # NFS clients (v2/v3, v4)
    "cifs", "smb3",  # SMB clients
    "glusterfs", "fuse.glusterfs",  # Gluster (native client is FUSE)
    "ceph", "fuse.ceph-fuse",  # CephFS, kernel and FUSE clients
    "lustre", "beegfs", "gpfs",  # HPC cluster filesystems
    "fuse.sshfs",  # a directory of another host over SSH
})
# readlink resolves a symlinked mountpoint; the mount table follows; find prints one entry
# if the mounted filesystem holds any. The path is an argument ($1), never script text.
CHECK_SCRIPT = (
    'readlink -f -- "$1" || exit 3; echo "@@mounts"; cat /proc/mounts || exit 4; '
    'echo "@@entries"; find "$1"/ -mindepth 1 -maxdepth 1 -print 2>/dev/null | head -n 1; true')
OCTAL = re.compile(r"\\([0-7]{3})")


class NotMountedError(PermanentError):
    """A shared filesystem is not mounted, not a shared type, or empty where it was looked for."""


class EmptyMountError(NotMountedError):
    """A shared filesystem is mounted and empty: it is the same on every VM that mounts it."""


class NoMountingHostError(TransientError):
    """No VM that mounts the shared filesystem could be reached: retried later."""


@dataclass(frozen=True)
class Mount:
    source: str
    mountpoint: str
    fs_type: str


def parse_mounts(text: str) -> list[Mount]:
    """/proc/mounts as Mounts, in order (a later mount on the same point hides earlier ones);
    the kernel's octal escapes (\\040 for a space) decoded."""
    mounts = []
    for line in text.splitlines():
        fields = line.split()
        if len(fields) >= 3:
            source, point, fs_type = (OCTAL.sub(lambda m: chr(int(m.group(1), 8)), f)
                                      for f in fields[:3])
            mounts.append(Mount(source, point, fs_type))
    return mounts


def accepted_types(settings: Settings) -> frozenset[str]:
    return SHARED_FS_TYPES | frozenset(settings.shared_fs_extra_types)


def check_mounted(host: Host, path: str, types: frozenset[str]) -> Mount:
    """The mount at `path` on `host`, when it is a mountpoint of one of `types` holding
    something. Raises NotMountedError naming host and path (not a mountpoint, another type,
    empty, no such path); TransientError (HostUnreachableError …) when the host cannot be
    asked."""
    result = host.run(["sh", "-c", CHECK_SCRIPT, "sh", path], ok_exits=(0, 3, 4))
    out = result.stdout.decode("utf-8", "replace")
    if result.exited == 3:
        raise NotMountedError(f"{host.name}: shared filesystem {path}: no such path "
                              f"({result.stderr_tail.strip()[-200:]})")
    if result.exited == 4:
        raise NotMountedError(f"{host.name}: cannot read /proc/mounts to check {path}: "
                              f"{result.stderr_tail.strip()[-200:]}")
    resolved, _, rest = out.partition("\n@@mounts\n")
    table, _, entries = rest.partition("@@entries\n")
    real = str(PurePosixPath(resolved.strip() or path))
    shown = path if real == str(PurePosixPath(path)) else f"{path} (resolved: {real})"
    here = [m for m in parse_mounts(table) if m.mountpoint == real]
    if not here:
        beneath = _containing(parse_mounts(table), real)
        inside = (f"the {beneath.fs_type} filesystem at {beneath.mountpoint}" if beneath
                  else "no mounted filesystem")
        raise NotMountedError(
            f"{host.name}: shared filesystem {shown} is not mounted there (a plain directory "
            f"in {inside}); refusing to archive it")
    mount = here[-1]  # the last one mounted is what the path shows
    if mount.fs_type not in types:
        raise NotMountedError(
            f"{host.name}: {shown} is a {mount.fs_type} mount ({mount.source}), not a shared "
            f"filesystem type ({', '.join(sorted(types))}); refusing to archive it")
    if not entries.strip():
        raise EmptyMountError(f"{host.name}: shared filesystem {shown} ({mount.fs_type} from "
                              f"{mount.source}) is mounted but empty; refusing an empty archive")
    return mount


def _containing(mounts: list[Mount], path: str) -> Mount | None:
    best: Mount | None = None
    for mount in mounts:
        point = mount.mountpoint.rstrip("/") + "/"
        if (path + "/").startswith(point) and (best is None or len(mount.mountpoint)
                                               >= len(best.mountpoint)):
            best = mount
    return best


def mounting_host(hosts: HostPool, primary: str, alternates: tuple[str, ...], path: str,
                  settings: Settings, warnings: list[str]) -> Host:
    """The first of `primary` and `alternates` that is reachable and has `path` mounted as
    a shared filesystem. A host that cannot be reached, or on which it is not mounted, is
    passed over (noted in `warnings` when another one is used). Raises NotMountedError
    when every host was asked and none has it mounted (or it is empty: that is the same
    filesystem everywhere), NoMountingHostError when a host that might have it could not
    be reached."""
    types = accepted_types(settings)
    passed: list[str] = []
    unreachable = False
    for name in (primary, *alternates):
        host = hosts.get(name)
        try:
            check_mounted(host, path, types)
        except TransientError as error:
            unreachable = True
            passed.append(f"{name}: unreachable ({error})")
            log.warning("shared filesystem %s: %s unreachable, trying the next: %s",
                        path, name, error)
            continue
        except EmptyMountError:
            raise
        except NotMountedError as error:
            passed.append(str(error))
            continue
        if passed:
            warnings.append(f"shared filesystem {path} archived from {name}; passed over: "
                            + "; ".join(passed))
        return host
    if unreachable:
        raise NoMountingHostError(f"shared filesystem {path}: no VM that mounts it could be "
                                  "used: " + "; ".join(passed))
    raise NotMountedError(f"shared filesystem {path}: not mounted on any of its VMs: "
                          + "; ".join(passed))
