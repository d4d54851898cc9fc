"""An archive's manifest (shared.manifest) goes with it: checked in staging, sent after the
archive, and its sha256 checked at the destination like the archive's.

A manifest is checked before it is sent: whole (its trailer's count and digest), this
archive's (the archive sha256 it names is the one archive.completed recorded) and, when
archive.completed carried one, of the sha256 recorded there. An archive made before
manifests existed has none: it is sent as before, and no deep verify is possible for it.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from services.transfer import rsync
from services.transfer.destination import Destination, rsync_argv_to
from shared.errors import PermanentError, TransientError, UnexpectedExit
from shared.hosts import Host, LocalExecutor
from shared.manifest import SUFFIX, ManifestError, parse
from shared.settings import Settings

log = logging.getLogger(__name__)


class ManifestInvalidError(PermanentError):
    """The staging manifest is cut short, damaged, or another archive's."""


@dataclass(frozen=True)
class StagedManifest:
    path: Path
    sha256: str
    size: int


def manifest_name(file_name: str) -> str:
    """The manifest's file name beside the archive `file_name`."""
    return file_name + SUFFIX


def staged_manifest(source: Path, payload: dict[str, Any]) -> StagedManifest | None:
    """The archive's manifest in staging, checked; None when the archive has none (made
    before manifests). Raises ManifestInvalidError naming the file and what is wrong."""
    path = source.with_name(manifest_name(source.name))
    archive_id = payload["archive_id"]
    if path.is_symlink():  # the archiver writes a plain file: this one points elsewhere
        raise ManifestInvalidError(f"archive {archive_id}: manifest {path} is a symlink")
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return None
    except OSError as error:
        raise ManifestInvalidError(f"archive {archive_id}: manifest {path} is unreadable: "
                                   f"{error.strerror}") from error
    try:
        manifest = parse(data, str(path))
    except ManifestError as error:
        raise ManifestInvalidError(f"archive {archive_id}: {error}") from error
    if manifest.archive_sha256 != payload["sha256"]:
        raise ManifestInvalidError(
            f"archive {archive_id}: manifest {path} is of an archive with sha256 "
            f"{manifest.archive_sha256}, not of this one ({payload['sha256']})")
    digest = hashlib.sha256(data).hexdigest()
    recorded = payload.get("manifest_sha256") or ""
    if recorded and digest != recorded:
        raise ManifestInvalidError(f"archive {archive_id}: manifest {path} has sha256 {digest}, "
                                   f"archive.completed recorded {recorded}")
    return StagedManifest(path, digest, len(data))


def send_manifest(manifest: StagedManifest, destination: Destination, remote: str,
                  settings: Settings) -> None:
    """rsync the manifest whole (to a temporary name there, renamed when complete: a cut
    copy never stands under its name). Raises RsyncError, RsyncFailedError, HostKeyError."""
    argv = rsync_argv_to(destination, manifest.path, remote, settings, append=False)
    try:
        LocalExecutor("rsync").run(argv)
    except UnexpectedExit as error:
        raise rsync.classify(error.exited, error.stderr_tail) from error


def check_arrived(manifest: StagedManifest, digest: str, destination: Destination, host: Host,
                  remote: str, settings: Settings) -> None:
    """Raises TransientError (after removing the copy) when the manifest at the destination
    is not the one sent: the next attempt sends it again."""
    if digest == manifest.sha256:
        return
    host.run(["rm", "-f", "--", remote], timeout=settings.ssh_connect_timeout + 30)
    raise TransientError(f"manifest sha256 at {destination.address}:{remote} is {digest}, "
                         f"{manifest.path}'s is {manifest.sha256}; removed it")
