"""What to archive and the source-side command that streams it: `tar` or a database dump.

An `ArchiveOrder` is what a request asks for; `validate_order` refuses what must never reach a
host (a relative path, a database name that could be read as an option); `stream_command`
builds the argv list run on the source host. Compression never runs there.
"""

from __future__ import annotations

import fnmatch
import re
from dataclasses import dataclass
from pathlib import PurePosixPath

from pydantic import BaseModel, ConfigDict

from services.archiver.probe import Capabilities, modern
from shared.contracts import ArchiveKind, ArchiveSource, SnapshotDriver
from shared.errors import PermanentError
from shared.settings import Settings

# Never archived from a server's root: kernel and runtime filesystems, scratch space. Their
# contents only: the empty directories stay, so the restored root still has its mountpoints.
ROOT_EXCLUDES = ("proc", "sys", "dev", "run", "tmp")

# What a shared database server's root leaves out besides ROOT_EXCLUDES: anything of the
# customers on it (README: "What a database server's root leaves out"). The root ships to
# every customer on that server, so whatever names, logs or grants access to another
# customer's data stays behind. Each entry is (tar pattern, why); the patterns go to GNU tar
# as `--anchored --exclude=…` with its defaults for excludes (wildcards, `*` matches `/`, a
# match on a directory leaves out all below it). Names relative to the root start with
# `./` (that place only); `*/` in front matches at any depth (`*` takes `.` and any dirs).
# `…/*` leaves the directory itself in (empty), so the restored server keeps its layout.
SERVER_ROOT_SCRUB: tuple[tuple[str, str], ...] = (
    # the databases themselves (the server's own data directory is asked of it too)
    ("./var/lib/mysql/*", "MySQL/MariaDB data directory: every customer's tables"),
    ("./var/lib/postgresql/*", "PostgreSQL data directory (Debian)"),
    ("./var/lib/pgsql/*", "PostgreSQL data directory (Red Hat)"),
    ("./var/lib/mysql-files/*", "SELECT … INTO OUTFILE exports"),
    ("./var/lib/mysql-keyring/*", "tablespace encryption keys"),
    ("*-bin.[0-9][0-9][0-9][0-9][0-9][0-9]", "binary logs outside the data directory"),
    ("*-bin.index", "binary log index"),
    ("*/binlog.[0-9][0-9][0-9][0-9][0-9][0-9]", "binary logs, MySQL 8's default name"),
    ("*/binlog.index", "binary log index, MySQL 8's default name"),
    ("*-relay-bin.*", "relay logs and their index"),
    # logs: database, web, auth and mail logs name other customers' queries, visitors, users
    ("./var/log/*", "every log (database, web, auth, mail); /var/log itself stays"),
    ("*/access.log*", "web server access logs outside /var/log"),
    ("*/access_log*", "web server access logs outside /var/log (Apache's spelling)"),
    ("*/error.log*", "web and database error logs outside /var/log"),
    ("*/error_log*", "web error logs outside /var/log (Apache's spelling)"),
    ("*/slow*query*.log*", "slow query logs outside /var/log"),
    # shell and client histories, at any depth (root's, users', service accounts')
    ("*/.bash_history", "shell history"),
    ("*/.sh_history", "shell history"),
    ("*/.zsh_history", "shell history"),
    ("*/.history", "shell history (csh, tcsh)"),
    ("*/.mysql_history", "mysql client history: other customers' queries and passwords"),
    ("*/.psql_history", "psql history"),
    ("*/.sqlite_history", "sqlite3 history"),
    ("*/.rediscli_history", "redis-cli history"),
    ("*/.python_history", "python REPL history"),
    ("*/.lesshst", "less history (searches through dumps and logs)"),
    ("*/.viminfo", "vim history and registers"),
    # access: host keys, keys and grants of the operators and customers who log in
    ("./etc/ssh/ssh_host_*", "SSH host keys: the new site must not impersonate the old host"),
    ("*/.ssh/*", "authorized_keys, private keys and known_hosts of every user"),
    ("*/.netrc", "stored logins"),
    # the replica's credentials and the server's admin logins
    ("*/master.info", "replica's source host, user and password (MySQL < 8)"),
    ("*/relay-log.info", "replica's relay position (MySQL < 8)"),
    ("*/.my.cnf", "client logins (user, password)"),
    ("*/.pgpass", "PostgreSQL logins"),
    ("*/recovery.conf", "PostgreSQL < 12 standby's primary_conninfo (password)"),
    ("./etc/mysql/debian.cnf", "debian-sys-maint password: admin on the old server"),
    # mail and crontabs: the users' (the system's /etc/crontab and /etc/cron.d stay)
    ("./var/mail/*", "mail spools"),
    ("./var/spool/mail/*", "mail spools"),
    ("./var/spool/postfix/*", "postfix queues: queued mail"),
    ("./var/spool/exim4/*", "exim queues: queued mail"),
    ("./var/spool/cron/*", "every user's crontab (Debian: crontabs/, Red Hat: the files)"),
    ("./var/spool/at/*", "at jobs (Red Hat)"),
    # people's and processes' leftovers
    ("./home/*", "home directories: customers' and operators' files"),
    ("./var/tmp/*", "scratch space that survives a reboot"),
    ("./var/crash/*", "crash dumps: a database process's memory"),
    ("./var/lib/systemd/coredump/*", "core dumps: a database process's memory"),
    ("./lost+found/*", "fsck's fragments of deleted files"),
    ("./swapfile", "swap: a database process's memory"),
    ("./swap.img", "swap (Ubuntu's name)"),
)
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
    # what was left out on purpose (a server root's scrub list, the inventory's excludes):
    # the tar patterns as given to tar, recorded with the archive
    excluded: tuple[str, ...] = ()
    # what an old host's tools could not do (no --sort, no --events): the archive's warnings
    warnings: tuple[str, ...] = ()


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


def nice_prefix(settings: Settings, tools: Capabilities | None = None) -> list[str]:
    """Lowest CPU and idle I/O priority on the source: the customer's VM stays live.
    `ionice -t`: a kernel or container that refuses the I/O class is not a failure; a host
    whose ionice has no -t (util-linux < 2.19) gets plain `ionice -c3`, one without ionice
    only nice."""
    if not settings.source_nice:
        return []
    tools = tools or modern()
    if tools.ionice_t:
        return ["nice", "-n", "19", "ionice", "-c3", "-t"]
    return ["nice", "-n", "19", *(["ionice", "-c3"] if tools.ionice else [])]


def tar_command(path: str, excludes: list[str], settings: Settings,
                tools: Capabilities | None = None, *, one_file_system: bool = False,
                niced: bool = True) -> SourceCommand:
    """`tar -C path -cpf - .`, names sorted (deterministic) where the host's tar can,
    numeric owners, holes kept; under nice_prefix unless `niced` is False. `tools`: the
    host's probed capabilities (default: today's GNU tools). Raises ToolMissingError
    without GNU tar."""
    tools = tools or modern()
    tools.require_tar()
    warnings: list[str] = []
    argv = [*(nice_prefix(settings, tools) if niced else []), "tar", "-C", path]
    if tools.tar_sort:
        argv.append("--sort=name")
    else:
        warnings.append(f"{tools.host}: {tools.tar_version} has no --sort (GNU tar 1.28): "
                        "archived in directory order, not sorted by name")
    argv += ["--numeric-owner", "--sparse"]
    if one_file_system:
        argv.append("--one-file-system")
    if excludes:
        # anchored: "./tmp/*" is the root's /tmp only, never some other directory's tmp;
        # a pattern for any depth says so with a leading "*/". Wildcards, `*` matching `/`:
        # GNU tar's defaults for excludes, said explicitly (TAR_OPTIONS cannot change them)
        argv += ["--anchored", "--wildcards", "--wildcards-match-slash",
                 *(f"--exclude={pattern}" for pattern in excludes)]
    argv += ["-cpf", "-", "."]
    return SourceCommand(argv, (0, TAR_CHANGED), "tar", excluded=tuple(excludes),
                         warnings=tuple(warnings))


def excluded_by(name: str, patterns: list[str] | tuple[str, ...]) -> str | None:
    """The first pattern that leaves tar member `name` ("./a/b") out, as GNU tar matches
    `--anchored --exclude` (wildcards, `*` matching `/`, a match on a leading directory
    leaving out what is below it); None when it is archived. For checks and tests: tar
    itself decides what is shipped."""
    parts = name.split("/")
    prefixes = ["/".join(parts[:i]) for i in range(1, len(parts) + 1)]
    for pattern in patterns:
        if any(fnmatch.fnmatchcase(prefix, pattern) for prefix in prefixes):
            return pattern
    return None


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


def dump_command(source: ArchiveSource, settings: Settings,
                 tools: Capabilities | None = None) -> SourceCommand:
    """mysqldump in one consistent transaction with routines, triggers and events (those
    the host's mysqldump knows: 5.0 has no --events), or pg_dump. Raises ToolMissingError
    when the host has no dump tool, or a mysqldump that cannot dump in one transaction."""
    tools = tools or modern()
    database = source.database or ""
    warnings: list[str] = []
    if source.engine == "postgresql":
        tools.require_pg_dump()
        argv = ["pg_dump", *pg_options(settings), "--format=plain", database]
    else:
        tools.require_mysqldump()
        argv = ["mysqldump", *mysql_options(settings), "--single-transaction"]
        for option, what in (("routines", "stored routines"), ("triggers", "triggers"),
                             ("events", "events")):
            if tools.mysqldump_supports(option):
                argv.append(f"--{option}")
            else:
                warnings.append(f"{tools.host}: {tools.mysqldump_version or 'mysqldump'} has "
                                f"no --{option}: dumped without {what}")
        argv.append(database)
    return SourceCommand([*nice_prefix(settings, tools), *argv], (0,), "sql",
                         warnings=tuple(warnings))


def server_root_excludes(source: ArchiveSource, data_dir: str | None = None) -> list[str]:
    """Every tar pattern a database server's root is archived without: the inventory's
    per-customer paths (source.excludes), ROOT_EXCLUDES' contents, SERVER_ROOT_SCRUB and
    the data directory the server itself names."""
    excludes = [member_pattern(p) for p in source.excludes]
    excludes += [member_pattern(p, contents_only=True) for p in ROOT_EXCLUDES]
    excludes += [pattern for pattern, _ in SERVER_ROOT_SCRUB]
    if data_dir:
        asked = member_pattern(data_dir, contents_only=True)
        if asked not in excludes:
            excludes.append(asked)
    return excludes


def filesystem_command(order: ArchiveOrder, settings: Settings,
                       data_dir: str | None = None,
                       tools: Capabilities | None = None) -> SourceCommand:
    """The tar command for shared_fs, db_server_root and local_fs (driver `none`): a server
    root without its scrub list (server_root_excludes); a server root and a VM's local
    filesystem without other filesystems mounted in it (`--one-file-system`: a VM's `/`
    would otherwise carry /proc, /sys and its shared GFS mount).

    Raises PermanentError for a snapshot exported over nbd: that is mounted on the archiver
    first, and archived with snapshot_command. Raises ToolMissingError without GNU tar.
    """
    source = order.source
    if order.kind == "local_fs" and order.snapshot is not None and order.snapshot.over_nbd:
        raise PermanentError(f"snapshot {order.snapshot.snapshot_id} is exported over nbd: "
                             "archive its mounted directory (snapshot_command)")
    path = source.path or "/"
    if order.kind == "db_server_root":
        return tar_command(path, server_root_excludes(source, data_dir), settings, tools,
                           one_file_system=True)
    excludes = [member_pattern(p) for p in source.excludes]
    return tar_command(path, excludes, settings, tools,
                       one_file_system=order.kind == "local_fs")


def snapshot_command(order: ArchiveOrder, mounted: str, settings: Settings,
                     tools: Capabilities | None = None) -> SourceCommand:
    """tar of a snapshot mounted read-only on the archiver (run here, not on the Xen host):
    the whole filesystem, the source's excludes relative to its root."""
    excludes = [member_pattern(p) for p in order.source.excludes]
    # no nice/ionice here: this reads the archiver's own FUSE/nbd mount; the Xen host's
    # load is nbd-server's, and the archiver's CPU is what compresses
    return tar_command(mounted, excludes, settings, tools, niced=False)
