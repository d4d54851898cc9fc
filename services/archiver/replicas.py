"""A database replica seen through its own client on the source host: replication position,
pausing the SQL thread (or WAL replay) around a dump, and where it keeps its data files.

A replica's SQL thread applying DDL breaks `mysqldump --single-transaction`'s consistency;
pausing it also pins the position the dump corresponds to.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from typing import Any

from services.archiver.sources import mysql_options, pg_options
from shared.contracts import ArchiveSource
from shared.errors import UnexpectedExit
from shared.hosts import Host
from shared.settings import Settings

log = logging.getLogger(__name__)

# What identifies a MySQL/MariaDB replica's applied position (either spelling of each field).
POSITION_FIELDS = {
    "Relay_Master_Log_File": "source_log_file", "Relay_Source_Log_File": "source_log_file",
    "Exec_Master_Log_Pos": "source_log_pos", "Exec_Source_Log_Pos": "source_log_pos",
    "Master_Host": "source_host", "Source_Host": "source_host",
    "Gtid_IO_Pos": "gtid_io_pos", "Executed_Gtid_Set": "executed_gtid_set",
    "Slave_SQL_Running": "sql_running", "Replica_SQL_Running": "sql_running",
}


def parse_vertical(output: str) -> dict[str, str]:
    """The first row of `mysql --vertical` output as {column: value}; {} for no rows."""
    row: dict[str, str] = {}
    for line in output.splitlines():
        if line.startswith("*****"):
            if row:
                break
            continue
        name, sep, value = line.partition(":")
        if sep:
            row[name.strip()] = value.strip()
    return row


def replica_position(row: dict[str, str]) -> dict[str, str] | None:
    """The position fields of a SHOW SLAVE/REPLICA STATUS row; None when not a replica."""
    if not row:
        return None
    return {ours: row[theirs] for theirs, ours in POSITION_FIELDS.items() if row.get(theirs)}


class Replica:
    """The database server on a source host, through `mysql` or `psql` run there."""

    def __init__(self, host: Host, source: ArchiveSource, settings: Settings, *,
                 timeout: float | None = 60) -> None:
        # timeout None: the host has no `timeout --kill-after` for the SSH layer (probe.py)
        self.timeout = timeout
        self.host = host
        self.source = source
        self.settings = settings
        self.engine = source.engine or "mysql"

    def _mysql(self, sql: str, *, vertical: bool = False) -> str:
        argv = ["mysql", *mysql_options(self.settings), "--batch"]
        argv += ["--vertical"] if vertical else ["--skip-column-names"]
        result = self.host.run([*argv, "-e", sql], timeout=self.timeout)
        return result.stdout.decode("utf-8", "replace")

    def _psql(self, sql: str) -> str:
        argv = ["psql", *pg_options(self.settings), "-X", "-A", "-t", "-c", sql,
                self.source.database or "postgres"]
        return self.host.run(argv, timeout=self.timeout).stdout.decode(
            "utf-8", "replace").strip()

    def _mysql_either(self, old: str, new: str, *, vertical: bool = False) -> str:
        # MySQL 8.4 dropped the SLAVE spelling; 5.x and older MariaDB never had REPLICA
        try:
            return self._mysql(old, vertical=vertical)
        except UnexpectedExit:
            return self._mysql(new, vertical=vertical)

    def position(self) -> dict[str, Any] | None:
        """Where replication stands, or None when the server is not a replica.

        Raises UnexpectedExit when the client cannot ask (wrong credentials, no server).
        """
        if self.engine == "postgresql":
            recovery, _, lsn = self._psql(
                "SELECT pg_is_in_recovery(), pg_last_wal_replay_lsn()").partition("|")
            return {"replay_lsn": lsn} if recovery == "t" else None
        status = self._mysql_either("SHOW SLAVE STATUS", "SHOW REPLICA STATUS", vertical=True)
        return replica_position(parse_vertical(status))

    def pause(self) -> None:
        if self.engine == "postgresql":
            self._psql("SELECT pg_wal_replay_pause()")
        else:
            self._mysql_either("STOP SLAVE SQL_THREAD", "STOP REPLICA SQL_THREAD")

    def resume(self) -> None:
        if self.engine == "postgresql":
            self._psql("SELECT pg_wal_replay_resume()")
        else:
            self._mysql_either("START SLAVE SQL_THREAD", "START REPLICA SQL_THREAD")

    def data_dir(self) -> str:
        """The server's data directory (excluded from a root archive). Raises UnexpectedExit."""
        if self.engine == "postgresql":
            return self._psql("SHOW data_directory")
        return self._mysql("SELECT @@datadir").strip()

    @contextlib.contextmanager
    def held(self, pause: bool, warnings: list[str]) -> Iterator[dict[str, Any] | None]:
        """Yields the replication position for the dump; with `pause`, replication is
        stopped first and always started again, even when the dump fails."""
        position = self.position()
        if not pause:
            if position is not None:
                position["exact"] = "false"  # still applying while the dump runs
            yield position
            return
        if position is None:
            warnings.append(f"pause_replication asked, but {self.host.name} is not a replica")
            yield None
            return
        self.pause()
        try:
            position = self.position() or {}
            position["exact"] = "true"
            yield position
        finally:
            try:
                self.resume()
            except Exception:
                log.exception("%s: replication NOT restarted after the dump", self.host.name)
                raise
