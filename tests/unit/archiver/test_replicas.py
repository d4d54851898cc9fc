"""A replica's position and the pause around a dump, against a scripted host (our interface)."""

from __future__ import annotations

from collections.abc import Collection

import pytest

from services.archiver.replicas import Replica, parse_vertical, replica_position
from shared.contracts import ArchiveSource
from shared.errors import UnexpectedExit
from shared.hosts import Result, Sink
from shared.settings import Settings

STATUS = """*************************** 1. row ***************************
                Slave_IO_State: Waiting for master to send event
                   Master_Host: mysql-mega-2-master
         Relay_Master_Log_File: mysql-bin.000042
           Exec_Master_Log_Pos: 73313
             Slave_SQL_Running: Yes
                   Gtid_IO_Pos: 0-1-1234
"""


class ScriptedHost:
    """Answers SQL by its first word; records every argv it was asked to run."""

    name = "replica"

    def __init__(self, status: str = STATUS, fail_on: str = "") -> None:
        self.status = status
        self.fail_on = fail_on
        self.ran: list[str] = []

    def run(self, argv: list[str], *, timeout: float | None = None, sink: Sink | None = None,
            ok_exits: Collection[int] = (0,), stdin: bytes | None = None) -> Result:
        sql = argv[argv.index("-e") + 1]
        self.ran.append(sql)
        if self.fail_on and sql.startswith(self.fail_on):
            raise UnexpectedExit(self.name, argv, 1, "ERROR 1064: syntax")
        out = self.status if sql.startswith("SHOW") else ""
        return Result(True, 0, out.encode(), "", argv, self.name)


def replica(host: ScriptedHost) -> Replica:
    return Replica(host, ArchiveSource(host="replica", database="db", engine="mysql"),  # type: ignore[arg-type]
                   Settings())


def test_vertical_status_gives_the_applied_position() -> None:
    position = replica_position(parse_vertical(STATUS))

    assert position == {"source_host": "mysql-mega-2-master", "source_log_file": "mysql-bin.000042",
                        "source_log_pos": "73313", "sql_running": "Yes", "gtid_io_pos": "0-1-1234"}


def test_a_server_that_is_not_a_replica_has_no_position() -> None:
    assert replica_position(parse_vertical("")) is None


def test_paused_dump_stops_the_sql_thread_and_always_starts_it_again() -> None:
    host = ScriptedHost()
    warnings: list[str] = []

    with pytest.raises(RuntimeError), replica(host).held(True, warnings) as position:
        assert position is not None and position["exact"] == "true"
        raise RuntimeError("dump failed")

    assert host.ran == ["SHOW SLAVE STATUS", "STOP SLAVE SQL_THREAD", "SHOW SLAVE STATUS",
                        "START SLAVE SQL_THREAD"]
    assert warnings == []


def test_replica_spelling_is_used_where_slave_is_gone() -> None:
    host = ScriptedHost(fail_on="SHOW SLAVE")

    with replica(host).held(False, []) as position:
        assert position is not None and position["exact"] == "false"

    assert host.ran == ["SHOW SLAVE STATUS", "SHOW REPLICA STATUS"]


def test_pause_on_a_server_that_is_not_a_replica_is_a_warning_not_a_stop() -> None:
    host = ScriptedHost(status="")
    warnings: list[str] = []

    with replica(host).held(True, warnings) as position:
        assert position is None

    assert host.ran == ["SHOW SLAVE STATUS"]
    assert warnings == ["pause_replication asked, but replica is not a replica"]
