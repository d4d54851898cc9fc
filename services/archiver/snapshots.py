"""A dm/lvm snapshot, mounted read-only on the archiver for the length of one archive.

The snapshotter exports the snapshot read-only with nbd-server on the Xen host's
127.0.0.1; the archiver reaches it through an SSH tunnel and mounts it through a local
throw-away copy-on-write layer (shared.nbd: nbdkit's cow filter, then the kernel
nbd-client or nbdfuse + `losetup`), as the inventory's filesystem type only, so the kernel
replays the journal of the crash-consistent snapshot into the layer and nothing reaches
the Xen host (docs/lab.md). tar and the compressor both run here. `shared.nbd.attach_export`
undoes all of it (the layer too) on leaving, after the archive is sealed or on failure;
`reconcile_mounts` undoes what a SIGKILLed worker left (its pid is gone).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from pathlib import Path

from services.archiver.sources import SnapshotExport
from shared import nbd
from shared.errors import PermanentError
from shared.hosts import HostPool
from shared.settings import Settings
from shared.ssh import SSHHost

log = logging.getLogger(__name__)


class SnapshotInvalidatedError(PermanentError):
    """The snapshotter invalidated the snapshot (its COW filled up): reading it is pointless.
    Its archive.failed carries will_retry: a new snapshot.ready follows."""


def run_dir(settings: Settings) -> Path:
    """Where shared.nbd records this archiver's mounts (absolute: reconcile compares paths)."""
    return (settings.nbd_run_dir or settings.state_dir / "nbd").absolute()


@contextlib.contextmanager
def mounted_snapshot(snapshot: SnapshotExport, hosts: HostPool, directory: Path,
                     fs_type: str | None) -> Iterator[Path]:
    """Mount `snapshot`'s export here as the inventory's `fs_type`, its journal replayed
    into a throw-away COW layer; yield the mounted (read-only) directory.

    Raises SnapshotInvalidatedError (already invalidated), nbd.AttachError (transient:
    tunnel, nbdkit, nbd, FUSE or loop failed), PermanentError (no fs_type, a kernel without
    it, a device holding another filesystem, a mount the kernel refused: each names the
    host, the export and why), and what opening the SSH connection raises.
    """
    if snapshot.invalidated:
        raise SnapshotInvalidatedError(
            f"snapshot {snapshot.snapshot_id} on {snapshot.host} was invalidated: "
            f"{snapshot.invalidated}")
    if snapshot.port is None:
        raise PermanentError(f"snapshot {snapshot.snapshot_id}: no nbd port")
    host = hosts.get(snapshot.host)
    # "local": nbd-server runs on this machine, no tunnel
    tunnel = host if isinstance(host, SSHHost) else None
    where = f"{snapshot.host}: snapshot {snapshot.snapshot_id} (export {snapshot.export_name})"
    with nbd.attach_export(tunnel, snapshot.export_name, snapshot.port, fs_type=fs_type,
                           run_dir=directory, where=where) as mounted:
        log.info("snapshot %s mounted at %s", snapshot.snapshot_id, mounted)
        yield mounted


def reconcile_mounts(directory: Path) -> list[str]:
    """Undo the snapshot mounts of dead workers; what it cleaned."""
    cleaned = nbd.reconcile(directory)
    for path in cleaned:
        log.warning("undid the snapshot mount %s of a dead worker", path)
    return cleaned
