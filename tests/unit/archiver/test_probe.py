"""Old hosts: what a host's tools can do, parsed from what they print, and the commands
built for each variant; a missing tool is an error naming host and tool.

The probe runs for real twice: on this machine, and on a PATH made of busybox applets (an
old appliance-like host: busybox tar, timeout, ionice, no mysqldump). The other variants feed
version lines into the parser: GNU tar 1.26 (RHEL/CentOS 7) and 1.15.1 (RHEL 5), coreutils
without `timeout`, and a MySQL 5.0 mysqldump --help. That help text is reconstructed in
my_print_help's layout (two spaces, short form, long form) from 5.0's option list, which has
--routines and --triggers but no --events (added in 5.1): not captured from a 5.0 binary.
"""

from __future__ import annotations

import re
import shutil
from collections.abc import Collection
from pathlib import Path

import pytest

from services.archiver.probe import (
    PROBE_SCRIPT,
    Capabilities,
    Probes,
    ToolMissingError,
    parse_probe,
    usable_timeout,
)
from services.archiver.sources import ArchiveOrder, dump_command, filesystem_command
from shared.contracts import ArchiveSource
from shared.errors import HostUnreachableError
from shared.hosts import LocalExecutor, Result, Sink
from shared.settings import Settings
from shared.ssh import SSHConfig, SSHHost

MYSQLDUMP_50_HELP = """\
mysqldump  Ver 10.11 Distrib 5.0.51a, for debian-linux-gnu (x86_64)
By Igor Romanenko, Monty, Jani & Sinisa
This software comes with ABSOLUTELY NO WARRANTY. This is free software,
and you are welcome to modify and redistribute it under the GPL license

Dumping definition and data mysql database or table
Usage: mysqldump [OPTIONS] database [tables]
  -a, --all           Deprecated. Use --create-options instead.
  -A, --all-databases Dump all the databases. This will be same as --databases
                      with all databases selected.
  --add-drop-database Add a 'drop database' before each create.
  -l, --lock-tables   Lock all tables for read.
  -R, --routines      Dump stored routines (functions and procedures).
  --single-transaction
                      Creates a consistent snapshot by dumping all tables in a
                      single transaction. Works ONLY for tables stored in
                      storage engines which support multiversioning (currently
                      only InnoDB does); the dump is NOT guaranteed to be
                      consistent for other storage engines. Option
                      automatically turns off --lock-tables.
  --triggers          Dump triggers for each dumped table (Defaults to on; use
                      --skip-triggers to disable.)

Variables (--variable-name=value)
and boolean options {FALSE|TRUE}  Value (after reading options)
--------------------------------- -----------------------------
routines                          FALSE
single-transaction                FALSE
triggers                          TRUE
"""


def probe_output(tar: str | None = "tar (GNU tar) 1.34", mysqldump: str | None = None,
                 timeout: str | None = "timeout (GNU coreutils) 9.1",
                 kill_after: bool = True, ionice: str = "-t", pg_dump: bool = False) -> str:
    """What PROBE_SCRIPT prints on a host with these tools."""
    have = [name for name, there in (("tar", tar), ("mysqldump", mysqldump),
                                     ("pg_dump", pg_dump), ("timeout", timeout),
                                     ("ionice", ionice)) if there]
    lines = [f"@@have {name}" for name in have]
    lines += ["@@section tar", *([tar] if tar else []), "@@section timeout",
              *([timeout] if timeout else []), "@@section mysqldump",
              *([mysqldump] if mysqldump else []), "@@section checks"]
    lines += ["@@works timeout-kill-after"] if kill_after else []
    lines += {"-t": ["@@works ionice-t", "@@works ionice"], "plain": ["@@works ionice"],
              "": []}[ionice]
    return "\n".join(lines) + "\n"


def caps(**tools: object) -> Capabilities:
    return parse_probe("old-replica", probe_output(**tools))  # type: ignore[arg-type]


SHARED = ArchiveOrder.model_validate({"kind": "shared_fs",
                                      "source": {"host": "vm", "path": "/data"}})
MYSQL = ArchiveSource(host="old-replica", database="shop", engine="mysql")


def test_this_machines_tools_are_todays() -> None:
    tools = Probes().of(LocalExecutor())
    assert tools.tar_sort and tools.remote_timeout and tools.ionice_t
    assert {"routines", "triggers", "events", "single-transaction"} <= tools.mysqldump_options
    assert dump_command(MYSQL, Settings(source_nice=False), tools).warnings == ()


def test_gnu_tar_before_1_28_archives_unsorted_with_a_warning() -> None:
    for version in ("tar (GNU tar) 1.26", "tar (GNU tar) 1.15.1"):
        command = filesystem_command(SHARED, Settings(source_nice=False),
                                     tools=caps(tar=version))
        assert command.argv[:3] == ["tar", "-C", "/data"]
        assert not any(a.startswith("--sort") for a in command.argv)
        [warning] = command.warnings
        assert warning == (f"old-replica: {version} has no --sort (GNU tar 1.28): archived in "
                           "directory order, not sorted by name")


def test_gnu_tar_1_28_sorts() -> None:
    command = filesystem_command(SHARED, Settings(), tools=caps(tar="tar (GNU tar) 1.28"))
    assert "--sort=name" in command.argv and command.warnings == ()


@pytest.mark.parametrize("tar", ["tar (busybox) 1.35.0",
                                 "bsdtar 3.6.2 - libarchive 3.6.2 zlib/1.2.13"])
def test_a_tar_that_is_not_gnu_tar_is_refused_naming_host_and_tar(tar: str) -> None:
    with pytest.raises(ToolMissingError,
                       match=rf"^old-replica: tar is not GNU tar \({re.escape(tar)}"):
        filesystem_command(SHARED, Settings(), tools=caps(tar=tar))


def test_no_tar_is_refused_naming_host_and_tool() -> None:
    with pytest.raises(ToolMissingError, match="^old-replica: no tar on the host"):
        filesystem_command(SHARED, Settings(), tools=caps(tar=None))


def test_mysql_5_0_is_dumped_without_events_and_says_so() -> None:
    tools = caps(mysqldump=MYSQLDUMP_50_HELP)
    assert tools.mysqldump_version.startswith("mysqldump  Ver 10.11 Distrib 5.0.51a")
    command = dump_command(MYSQL, Settings(source_nice=False), tools)
    assert command.argv == ["mysqldump", "--single-transaction", "--routines", "--triggers",
                            "shop"]
    assert command.warnings == ("old-replica: mysqldump  Ver 10.11 Distrib 5.0.51a, for "
                                "debian-linux-gnu (x86_64) has no --events: dumped without "
                                "events",)


def test_mysqldump_help_continuation_lines_are_not_options() -> None:
    # "--skip-triggers" and "--lock-tables" appear only inside descriptions
    tools = caps(mysqldump=MYSQLDUMP_50_HELP)
    assert "skip-triggers" not in tools.mysqldump_options
    assert tools.mysqldump_options >= {"routines", "triggers", "single-transaction",
                                       "lock-tables"}


def test_no_mysqldump_or_no_consistent_dump_is_refused_naming_host_and_tool() -> None:
    with pytest.raises(ToolMissingError, match="^old-replica: no mysqldump on the host"):
        dump_command(MYSQL, Settings(), caps())
    without = MYSQLDUMP_50_HELP.replace("  --single-transaction\n", "  --tables\n")
    with pytest.raises(ToolMissingError, match="has no --single-transaction"):
        dump_command(MYSQL, Settings(), caps(mysqldump=without))


def test_no_pg_dump_is_refused_naming_host_and_tool() -> None:
    source = ArchiveSource(host="old-replica", database="shop", engine="postgresql")
    with pytest.raises(ToolMissingError, match="^old-replica: no pg_dump on the host"):
        dump_command(source, Settings(), caps())
    assert dump_command(source, Settings(source_nice=False), caps(pg_dump=True)).argv[0] == \
        "pg_dump"


@pytest.mark.parametrize(("ionice", "prefix"), [
    ("-t", ["nice", "-n", "19", "ionice", "-c3", "-t"]),
    ("plain", ["nice", "-n", "19", "ionice", "-c3"]),  # util-linux < 2.19
    ("", ["nice", "-n", "19"]),
])
def test_nice_prefix_follows_the_hosts_ionice(ionice: str, prefix: list[str]) -> None:
    command = filesystem_command(SHARED, Settings(), tools=caps(ionice=ionice))
    assert command.argv[:len(prefix) + 1] == [*prefix, "tar"]


class FakeSSHHost:
    """Stands in for an SSHHost (not the local executor) to count probes."""

    def __init__(self, output: str, fail: bool = False) -> None:
        self.name = "old-replica"
        self.output = output
        self.fail = fail
        self.runs = 0

    def run(self, argv: list[str], *, timeout: float | None = None, sink: Sink | None = None,
            ok_exits: Collection[int] = (0,), stdin: bytes | None = None) -> Result:
        self.runs += 1
        assert timeout is None  # the probe must run where `timeout` would break it
        if self.fail:
            raise HostUnreachableError("old-replica: cannot connect")
        return Result(True, 0, self.output.encode(), "", argv, self.name)


@pytest.mark.parametrize(("timeout", "kill_after"), [
    (None, False),  # coreutils < 7 (RHEL 5, Debian lenny): no timeout at all
    ("timeout (GNU coreutils) 7.4", False),  # timeout without --kill-after
    ("", False),  # busybox: `timeout --version` is an unknown option
])
def test_a_host_without_timeout_kill_after_runs_commands_without_a_limit_and_says_so(
    timeout: str | None, kill_after: bool,
) -> None:
    tools = caps(timeout=timeout, kill_after=kill_after)
    warnings: list[str] = []
    # a real SSHHost (it connects only when a command runs: none does here)
    host = SSHHost(SSHConfig(host="192.0.2.1", user="root", key_path=Path("/nonexistent"),
                             known_hosts_path=Path("/nonexistent")), name="old-replica")
    assert not tools.remote_timeout and host.remote_reaper
    assert usable_timeout(host, tools, 60, warnings) == 60
    assert usable_timeout(host, tools, 60, warnings) == 60
    assert not host.remote_reaper  # the SSH layer leaves the remote wrapper out
    assert warnings == [f"old-replica: no `timeout --kill-after` there "
                        f"({tools.timeout_version or 'none'}): a command that times out is "
                        "stopped by closing its connection only"]
    # the local executor enforces its own timeouts
    assert usable_timeout(LocalExecutor(), tools, 60, warnings) == 60


def test_a_host_with_timeout_kill_after_keeps_its_limits() -> None:
    warnings: list[str] = []
    assert usable_timeout(FakeSSHHost(""), caps(), 60, warnings) == 60  # type: ignore[arg-type]
    assert warnings == []


def test_each_host_is_probed_once_and_an_unreachable_one_again_next_time() -> None:
    probes = Probes()
    host = FakeSSHHost(probe_output(tar="tar (GNU tar) 1.26"))
    assert not probes.of(host).tar_sort  # type: ignore[arg-type]
    assert not probes.of(host).tar_sort  # type: ignore[arg-type]
    assert host.runs == 1
    down = FakeSSHHost("", fail=True)
    down.name = "down-replica"
    for _ in range(2):
        with pytest.raises(HostUnreachableError):
            probes.of(down)  # type: ignore[arg-type]
    assert down.runs == 2


@pytest.fixture
def busybox_path(tmp_path: Path) -> str:
    busybox = shutil.which("busybox")
    assert busybox, "busybox is needed for the busybox host variant"
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for applet in ("sh", "tar", "timeout", "ionice", "head", "true"):
        (bin_dir / applet).symlink_to(busybox)
    return str(bin_dir)


def test_a_busybox_host_is_probed_for_real_and_its_tar_refused(busybox_path: str) -> None:
    # Given a host whose tar, timeout and ionice are busybox applets and has no mysqldump
    result = LocalExecutor().run(["env", f"PATH={busybox_path}", "sh", "-c", PROBE_SCRIPT])
    tools = parse_probe("appliance", result.stdout.decode())
    # Then its tar is refused and its timeout cannot wrap commands (busybox ionice has -t)
    assert tools.have == {"tar", "timeout", "ionice"}
    assert tools.tar_version.startswith("tar (busybox)") and tools.gnu_tar is None
    with pytest.raises(ToolMissingError, match=r"appliance: tar is not GNU tar \(tar \(busybox"):
        tools.require_tar()
    assert not tools.remote_timeout and tools.ionice_t
    with pytest.raises(ToolMissingError, match="appliance: no mysqldump on the host"):
        tools.require_mysqldump()


def test_busybox_timeout_refuses_the_ssh_layers_wrapper(busybox_path: str) -> None:
    # what shared.ssh runs for a command with a timeout: `timeout --kill-after=2 N bash …`
    result = LocalExecutor().run(["env", f"PATH={busybox_path}", "timeout", "--kill-after=2",
                                  "5", "true"], ok_exits=range(256))
    assert result.exited == 1 and "unrecognized option" in result.stderr_tail
