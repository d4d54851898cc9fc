"""What to archive and the source-side command that streams it: `tar` or a database dump.

An `ArchiveOrder` is what a request asks for; `validate_order` refuses what must never reach a
host (a relative path, a database name that could be read as an option); `stream_command`
builds the argv list run on the source host. Compression never runs there.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import PurePosixPath

from pydantic import BaseModel, ConfigDict

from shared.contracts import ArchiveKind, ArchiveSource, SnapshotDriver
from shared.errors import PermanentError
from shared.settings import Settings

# Never archived from a server's root: kernel and runtime filesystems, scratch space. Their
# contents only: the empty directories stay, so the restored root still has its mountpoints.
ROOT_EXCLUDES = ("proc", "sys", "dev", "run", "tmp")
# Plain names only: no leading "-" (an option to mysqldump), no "=" (a pg_dump conninfo).
DATABASE_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_$-]{0,63}$")
# The snapshotter names exports `ferry-<job>-<n>`; it reaches nbd-client argv and an nbd URI.
EXPORT_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}$")
TAR_CHANGED = 1  # GNU tar: "file changed as we read it", the archive is still whole


class SourceInvalidError(PermanentError):
    """A request names a source that must not reach a host: nothing was run."""


class SnapshotExport(BaseModel):
    """Where a local filesystem's snapshot is exported (from snapshot.ready)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    snapshot_id: str
    driver: SnapshotDriver
    host: str
    export_name: str = ""
    port: int | None = None
    size_bytes: int = 0
    # why the snapshotter invalidated it (its COW filled up), set by snapshot.released;
    # empty while it is valid. An archive of an invalidated snapshot fails with will_retry.
    invalidated: str = ""

    @property
    def over_nbd(self) -> bool:
        """Exported by nbd-server on its host (dm, lvm), not archived as it is (none)."""
        return self.driver != "none"


class ArchiveOrder(BaseModel):
    """One archive to make: the job's payload."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    kind: ArchiveKind
    source: ArchiveSource
    snapshot: SnapshotExport | None = None

    @property
    def location(self) -> str | None:
        """The directory or database this archive reads."""
        return self.source.database if self.kind == "database" else self.source.path

    @property
    def label(self) -> str:
        return self.source.label or f"{self.source.host}:{self.location or ''}"


@dataclass(frozen=True)
class SourceCommand:
    """The command streaming the raw archive to stdout, and what its output is."""

    argv: list[str]
    ok_exits: tuple[int, ...]
    extension: str  # "tar" or "sql"; the compressor adds its own
    # what was left out on purpose (a server root's scrub list): recorded with the archive
    excluded: tuple[str, ...] = ()


def validate_order(order: ArchiveOrder) -> None:
    """Raises SourceInvalidError naming the field that is wrong."""
    source = order.source
    if not source.host:
        raise SourceInvalidError(f"{order.kind} archive: source.host is empty")
    if order.kind == "database":
        name = source.database or ""
        if not DATABASE_NAME.match(name):
            raise SourceInvalidError(
                f"database archive on {source.host}: database name {name!r} is not a plain "
                "name (letters, digits, _ $ -, not starting with -, at most 64)")
        if source.engine is None:
            raise SourceInvalidError(f"database archive of {name!r}: source.engine is not set")
        return
    if order.kind == "local_fs" and order.snapshot is not None and order.snapshot.over_nbd:
        _check_export(order.snapshot)  # the snapshot's export is the source, not a path
        _check_excludes(order)
        return
    _check_path(order.kind, source.host, source.path)
    _check_excludes(order)


def _check_excludes(order: ArchiveOrder) -> None:
    for pattern in order.source.excludes:
        if not pattern or "\x00" in pattern or "\n" in pattern:
            raise SourceInvalidError(f"{order.kind} archive: exclude {pattern!r} is not a pattern")


def _check_export(snapshot: SnapshotExport) -> None:
    where = f"snapshot {snapshot.snapshot_id} ({snapshot.driver})"
    if not snapshot.host:
        raise SourceInvalidError(f"{where}: host is empty")
    if snapshot.port is None:
        raise SourceInvalidError(f"{where} on {snapshot.host}: no nbd port")
    if not EXPORT_NAME.match(snapshot.export_name):
        raise SourceInvalidError(
            f"{where} on {snapshot.host}: export name {snapshot.export_name!r} is not a plain "
            "name (letters, digits, _ . -, not starting with - or .)")


def _check_path(kind: str, host: str, path: str | None) -> None:
    if not path or not path.startswith("/"):
        raise SourceInvalidError(f"{kind} archive on {host}: path {path!r} is not absolute")
    if any(c in path for c in "\x00\n\r") or ".." in PurePosixPath(path).parts:
        raise SourceInvalidError(f"{kind} archive on {host}: path {path!r} is not a plain path")


def nice_prefix(settings: Settings) -> list[str]:
    """Lowest CPU and idle I/O priority on the source: the customer's VM stays live.
    `ionice -t`: a kernel or container that refuses the I/O class is not a failure."""
    return ["nice", "-n", "19", "ionice", "-c3", "-t"] if settings.source_nice else []


def tar_command(path: str, excludes: list[str], settings: Settings, *,
                one_file_system: bool = False, niced: bool = True) -> SourceCommand:
    """`tar -C path -cpf - .`, names sorted (deterministic), numeric owners, holes kept;
    under nice_prefix unless `niced` is False."""
    argv = [*(nice_prefix(settings) if niced else []), "tar", "-C", path, "--sort=name",
            "--numeric-owner", "--sparse"]
    if one_file_system:
        argv.append("--one-file-system")
    if excludes:
        # anchored: "./tmp/*" is the root's /tmp only, never some other directory's tmp
        argv += ["--anchored", *(f"--exclude={pattern}" for pattern in excludes)]
    argv += ["-cpf", "-", "."]
    return SourceCommand(argv, (0, TAR_CHANGED), "tar")


def member_pattern(path: str, contents_only: bool = False) -> str:
    """A tar member pattern for an absolute or relative path under the archived directory."""
    pattern = "./" + path.strip("/")
    return f"{pattern}/*" if contents_only else pattern


def mysql_options(settings: Settings) -> list[str]:
    """Connection options for the mysql clients on the source (a defaults file goes first)."""
    options = []
    if settings.source_db_defaults_file:
        options.append(f"--defaults-extra-file={settings.source_db_defaults_file}")
    if settings.source_db_host:
        options.append(f"--host={settings.source_db_host}")
    if settings.source_db_port:
        options.append(f"--port={settings.source_db_port}")
    if settings.source_db_user:
        options.append(f"--user={settings.source_db_user}")
    return options


def pg_options(settings: Settings) -> list[str]:
    """Connection options for psql / pg_dump on the source (passwords: its ~/.pgpass)."""
    options = ["--no-password"]
    if settings.source_db_host:
        options.append(f"--host={settings.source_db_host}")
    if settings.source_db_port:
        options.append(f"--port={settings.source_db_port}")
    if settings.source_db_user:
        options.append(f"--username={settings.source_db_user}")
    return options


def dump_command(source: ArchiveSource, settings: Settings) -> SourceCommand:
    """mysqldump in one consistent transaction with routines, triggers and events; or pg_dump."""
    database = source.database or ""
    if source.engine == "postgresql":
        argv = ["pg_dump", *pg_options(settings), "--format=plain", database]
    else:
        argv = ["mysqldump", *mysql_options(settings), "--single-transaction", "--routines",
                "--triggers", "--events", database]
    return SourceCommand([*nice_prefix(settings), *argv], (0,), "sql")


def filesystem_command(order: ArchiveOrder, settings: Settings,
                       data_dir: str | None = None) -> SourceCommand:
    """The tar command for shared_fs, db_server_root and local_fs (driver `none`).

    Raises PermanentError for a snapshot exported over nbd: that is mounted on the archiver
    first, and archived with snapshot_command.
    """
    source = order.source
    if order.kind == "local_fs" and order.snapshot is not None and order.snapshot.over_nbd:
        raise PermanentError(f"snapshot {order.snapshot.snapshot_id} is exported over nbd: "
                             "archive its mounted directory (snapshot_command)")
    path = source.path or "/"
    excludes = [member_pattern(p) for p in source.excludes]
    if order.kind == "db_server_root":
        excludes += [member_pattern(p, contents_only=True) for p in ROOT_EXCLUDES]
        if data_dir:
            excludes.append(member_pattern(data_dir, contents_only=True))
        return tar_command(path, excludes, settings, one_file_system=True)
    return tar_command(path, excludes, settings)


def snapshot_command(order: ArchiveOrder, mounted: str, settings: Settings) -> SourceCommand:
    """tar of a snapshot mounted read-only on the archiver (run here, not on the Xen host):
    the whole filesystem, the source's excludes relative to its root."""
    excludes = [member_pattern(p) for p in order.source.excludes]
    # no nice/ionice here: this reads the archiver's own FUSE/nbd mount; the Xen host's
    # load is nbd-server's, and the archiver's CPU is what compresses
    return tar_command(mounted, excludes, settings, niced=False)
