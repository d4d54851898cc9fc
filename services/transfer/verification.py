"""`ferry archives verify [--deep]`: check a migration's archives where they arrived.

Every archive: its sha256 at the destination against the one recorded, and its manifest's
against the one the transfer checked. `--deep` also reads each archive at the destination
(`zstd -dc` / `gzip -dc` into shared.manifest's streaming reader, run there by `python3 -`,
so nothing is extracted to disk and only the member list crosses the network) and compares
every member with the manifest: missing, extra, and different type, size, content hash,
mode, owner, mtime or link target.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import Any

from services.transfer.destination import parse_destination
from services.transfer.jobs import HASH_BYTES_PER_S, sha256_at
from services.transfer.manifests import manifest_name
from shared.errors import FerryError, UnexpectedExit
from shared.hosts import Host
from shared.manifest import Comparison, ManifestError, compare, parse, script
from shared.settings import Settings


@dataclass
class ArchiveCheck:
    """What one archive's check found; `ok` is False for anything wrong."""

    archive_id: str
    path: str
    manifest: str = ""  # its path at the destination, "" when there is none
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    comparison: Comparison | None = None
    members: int = 0

    @property
    def ok(self) -> bool:
        return not self.problems and (self.comparison is None or self.comparison.ok)


def _exists(host: Host, path: str, settings: Settings) -> bool:
    return host.run(["test", "-f", path], ok_exits=(0, 1),
                    timeout=settings.ssh_connect_timeout + 30).exited == 0


def verify_archive(job: Any, host: Host, settings: Settings, deep: bool) -> ArchiveCheck:
    """Check one transferred archive (a done `transfers` row) at its destination. Raises
    what the host layer raises when the destination cannot be reached."""
    destination = parse_destination(job.destination, settings)
    file_name = job.payload["file_name"]
    remote = destination.file_path(job.migration_id, file_name)
    check = ArchiveCheck(job.archive_id, remote)
    if not _exists(host, remote, settings):
        check.problems.append(f"{remote} is missing at {destination.address}")
        return check
    digest = sha256_at(destination, host, remote, int(job.payload["bytes"]), settings)
    if digest != job.payload["sha256"]:
        check.problems.append(f"sha256 {digest}, the archive's is {job.payload['sha256']}")
    result = job.result or {}
    remote_manifest = destination.file_path(job.migration_id, manifest_name(file_name))
    if not _exists(host, remote_manifest, settings):
        if result.get("manifest_sha256"):
            check.problems.append(f"its manifest {remote_manifest} is missing")
        else:
            check.notes.append("no manifest (archived before manifests): no deep verify "
                               "possible")
        return check
    check.manifest = remote_manifest
    data = host.run(["cat", "--", remote_manifest], timeout=settings.transfer_timeout_seconds
                    ).stdout
    try:
        manifest = parse(data, f"{destination.address}:{remote_manifest}")
    except ManifestError as error:
        check.problems.append(str(error))
        return check
    recorded = result.get("manifest_sha256")
    if recorded and recorded != _sha256(data):
        check.problems.append(f"manifest sha256 {_sha256(data)}, the transfer checked "
                              f"{recorded}")
    if manifest.archive_sha256 != job.payload["sha256"]:
        check.problems.append(f"its manifest is of archive sha256 {manifest.archive_sha256}")
    check.members = manifest.members
    if deep:
        check.comparison = compare(manifest.entries,
                                   _list_at(host, remote, file_name, manifest.kind,
                                            manifest.raw_bytes, settings))
    return check


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _list_at(host: Host, remote: str, file_name: str, kind: str, raw_bytes: int,
             settings: Settings) -> list[dict[str, Any]]:
    """The members of the archive at `remote`, read where it lies. Raises FerryError when
    the destination cannot run the reader (no python3, no zstd) or the archive is unreadable."""
    name, _, extension = file_name.rpartition(".")
    lines = bytearray()
    try:
        host.run(["python3", "-", "list", remote, extension, kind, name], stdin=script().encode(),
                 sink=lines.extend,
                 timeout=settings.transfer_timeout_seconds + raw_bytes / HASH_BYTES_PER_S)
    except UnexpectedExit as error:
        if error.exited == 127:
            raise FerryError(f"{host.name} has no python3: a deep verify runs its reader "
                             "there") from error
        raise FerryError(f"reading {remote} at {host.name} failed (exit {error.exited}): "
                         f"{error.stderr_tail.strip()[-500:]}") from error
    entries = [json.loads(text) for text in bytes(lines).splitlines()]
    return [entry for entry in entries if "type" in entry]  # the last line: raw_bytes
