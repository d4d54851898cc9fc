"""What a source host's tools can do, asked once per host: old hosts get the commands they run.

The old site has hosts as old as a MySQL 5.0.51 replica. Three things differ there:

- GNU tar before 1.28 has no `--sort`: such a host is archived unsorted, with a warning (a
  `find | sort | tar -T -` list would fail the archive whenever a file is deleted between
  the listing and tar reading it, and sorting only makes archives reproducible, it never
  changes what they hold). A tar that is not GNU tar (busybox, bsdtar) is refused: the
  numeric owners, holes, `--one-file-system` and anchored excludes are GNU tar's.
- mysqldump before 5.1 has no `--events` (nor do its servers have events): dumped without,
  with a warning. Without `--single-transaction` there is no consistent dump: refused.
- coreutils `timeout` came in coreutils 7, `--kill-after` after it, and busybox's `timeout`
  knows only `-k`: the SSH layer wraps a command given a timeout in
  `timeout --kill-after=2 …` on the host, which there exits 127 or 1 before the command
  ran. On such a host the archiver runs its commands without a timeout and says so.

Also `ionice -t` (util-linux 2.19): without it, plain `ionice -c3`; without ionice, only
nice. A missing tar, mysqldump or pg_dump is a PermanentError naming the host and the tool.
"""

from __future__ import annotations

import re
import threading
from dataclasses import dataclass

from shared.errors import PermanentError
from shared.hosts import Host, LocalExecutor
from shared.ssh import SSHHost

# One round trip, a fixed script (nothing from a request is in it). Tools that are missing
# leave their section empty; the last `true` makes a host where every check failed still a
# successful probe.
PROBE_SCRIPT = r"""
for tool in tar mysqldump pg_dump timeout ionice; do
  command -v "$tool" >/dev/null 2>&1 && echo "@@have $tool"
done
echo "@@section tar"
command -v tar >/dev/null 2>&1 && tar --version 2>&1 | head -n 1
echo "@@section timeout"
command -v timeout >/dev/null 2>&1 && timeout --version 2>&1 | head -n 2
echo "@@section mysqldump"
command -v mysqldump >/dev/null 2>&1 && mysqldump --help 2>&1
echo "@@section checks"
timeout --kill-after=1 10 true >/dev/null 2>&1 && echo "@@works timeout-kill-after"
ionice -c3 -t true >/dev/null 2>&1 && echo "@@works ionice-t"
ionice -c3 true >/dev/null 2>&1 && echo "@@works ionice"
true
"""
PROBE_TIMEOUT = None  # the probe must run where `timeout` would break it (see above)
GNU_TAR = re.compile(r"^tar \(GNU tar\) (\d+)\.(\d+)")
TAR_SORT_SINCE = (1, 28)
# an option line of `mysqldump --help` (two spaces, an optional short form, the long one);
# continuation lines are indented further
MYSQLDUMP_OPTION = re.compile(r"^ {2}(?:-\w, )?--([a-z][a-z0-9-]*)", re.MULTILINE)
MYSQLDUMP_VERSION = re.compile(r"Distrib ([0-9][^,\s]*)")


class ToolMissingError(PermanentError):
    """A source host lacks a tool the archive needs, or has one that cannot do the job."""


@dataclass(frozen=True)
class Capabilities:
    """What one host's tools support, parsed from the probe's output."""

    host: str
    have: frozenset[str] = frozenset()
    tar_version: str = ""  # the first line of `tar --version`
    mysqldump_version: str = ""  # the first line of `mysqldump --help`
    mysqldump_options: frozenset[str] = frozenset()
    timeout_version: str = ""
    timeout_kill_after: bool = False
    ionice_t: bool = False
    ionice: bool = False

    @property
    def gnu_tar(self) -> tuple[int, int] | None:
        match = GNU_TAR.match(self.tar_version)
        return (int(match.group(1)), int(match.group(2))) if match else None

    @property
    def tar_sort(self) -> bool:
        version = self.gnu_tar
        return version is not None and version >= TAR_SORT_SINCE

    @property
    def remote_timeout(self) -> bool:
        """The SSH layer's `timeout --kill-after=2 N …` wrapper works on this host."""
        return self.timeout_kill_after

    def require_tar(self) -> None:
        """Raises ToolMissingError when there is no GNU tar on the host."""
        if "tar" not in self.have:
            raise ToolMissingError(f"{self.host}: no tar on the host (PATH); cannot archive")
        if self.gnu_tar is None:
            raise ToolMissingError(
                f"{self.host}: tar is not GNU tar ({self.tar_version.strip() or 'no version'}); "
                "archives need GNU tar's numeric owners, holes and anchored excludes")

    def require_mysqldump(self) -> None:
        """Raises ToolMissingError without a mysqldump that dumps in one transaction."""
        if "mysqldump" not in self.have:
            raise ToolMissingError(f"{self.host}: no mysqldump on the host (PATH); cannot dump")
        if "single-transaction" not in self.mysqldump_options:
            raise ToolMissingError(
                f"{self.host}: mysqldump ({self.mysqldump_version or 'unknown version'}) has "
                "no --single-transaction: no consistent dump is possible")

    def require_pg_dump(self) -> None:
        """Raises ToolMissingError without pg_dump on the host."""
        if "pg_dump" not in self.have:
            raise ToolMissingError(f"{self.host}: no pg_dump on the host (PATH); cannot dump")

    def mysqldump_supports(self, option: str) -> bool:
        return option in self.mysqldump_options


def modern(host: str = "modern") -> Capabilities:
    """A host with today's GNU tools: what commands are built for when nothing was probed."""
    return Capabilities(
        host=host, have=frozenset({"tar", "mysqldump", "pg_dump", "timeout", "ionice"}),
        tar_version="tar (GNU tar) 1.34",
        mysqldump_version="mysqldump  Ver 10.19 Distrib 10.11.6-MariaDB",
        mysqldump_options=frozenset({"single-transaction", "routines", "triggers", "events"}),
        timeout_version="timeout (GNU coreutils) 9.1", timeout_kill_after=True,
        ionice_t=True, ionice=True)


def parse_probe(host: str, output: str) -> Capabilities:
    """The probe script's output as Capabilities (tolerant: unknown lines are ignored)."""
    have: set[str] = set()
    works: set[str] = set()
    sections: dict[str, list[str]] = {}
    current: list[str] | None = None
    for line in output.splitlines():
        if line.startswith("@@have "):
            have.add(line[len("@@have "):].strip())
        elif line.startswith("@@works "):
            works.add(line[len("@@works "):].strip())
        elif line.startswith("@@section "):
            current = sections.setdefault(line[len("@@section "):].strip(), [])
        elif current is not None:
            current.append(line)
    tar = sections.get("tar", [])
    dump = "\n".join(sections.get("mysqldump", []))
    dump_first = next((line for line in dump.splitlines() if line.strip()), "")
    timeout = [line for line in sections.get("timeout", []) if line.strip()]
    return Capabilities(
        host=host, have=frozenset(have),
        tar_version=tar[0].strip() if tar and "tar" in have else "",
        mysqldump_version=dump_first.strip() if "mysqldump" in have else "",
        mysqldump_options=frozenset(MYSQLDUMP_OPTION.findall(dump)) if "mysqldump" in have
        else frozenset(),
        timeout_version=timeout[0].strip() if timeout and "timeout" in have else "",
        timeout_kill_after="timeout-kill-after" in works,
        ionice_t="ionice-t" in works, ionice="ionice" in works or "ionice-t" in works)


class Probes:
    """Each host probed once for the process's lifetime (a host's tools change with an
    upgrade, which a migration does not wait for); shared by the worker threads."""

    def __init__(self) -> None:
        self._known: dict[str, Capabilities] = {}
        self._lock = threading.Lock()
        self._host_locks: dict[str, threading.Lock] = {}

    def of(self, host: Host) -> Capabilities:
        """The host's capabilities, probing it the first time. Raises what `host.run`
        raises (HostUnreachableError: nothing is cached, the next call probes again)."""
        with self._lock:
            known = self._known.get(host.name)
            if known is not None:
                return known
            host_lock = self._host_locks.setdefault(host.name, threading.Lock())
        with host_lock:  # one probe per host even when two jobs start on it at once
            with self._lock:
                known = self._known.get(host.name)
            if known is not None:
                return known
            result = host.run(["sh", "-c", PROBE_SCRIPT], timeout=PROBE_TIMEOUT)
            known = parse_probe(host.name, result.stdout.decode("utf-8", "replace"))
            with self._lock:
                self._known[host.name] = known
            return known


def usable_timeout(host: Host, tools: Capabilities, timeout: float | None,
                   warnings: list[str]) -> float | None:
    """`timeout` for a command on `host`. Where the host's `timeout` has no --kill-after (the
    SSH layer's remote reaper would make every command exit before it ran), the SSH host is
    told to leave the reaper out, with a warning: the local deadline still stops the command
    by closing its channel. The local executor enforces its timeouts itself, on any host."""
    if timeout is None or tools.remote_timeout or isinstance(host, LocalExecutor):
        return timeout
    if isinstance(host, SSHHost):
        host.remote_reaper = False
    note = (f"{host.name}: no `timeout --kill-after` there ({tools.timeout_version or 'none'}):"
            " a command that times out is stopped by closing its connection only")
    if note not in warnings:
        warnings.append(note)
    return timeout
