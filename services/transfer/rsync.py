"""rsync for one sealed archive: its command line, what its exit codes mean, its output.

rsync runs on this machine through the host layer's local executor, to a local directory
or over OpenSSH to the destination (`-e`, strict known hosts, never accepting a new key).
"""

from __future__ import annotations

import re
import shlex
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from shared.errors import HostKeyError, PermanentError, TransientError

# aes128-gcm: 572 MB/s through OpenSSH on loopback against 452 for the default (LIMITS.md)
CIPHER = "aes128-gcm@openssh.com"


def ssh_command(*, key: Path, known_hosts: Path, port: int, connect_timeout: float) -> str:
    """rsync's `-e` value: OpenSSH that trusts only `known_hosts` and never prompts.

    `-F none` keeps a user's ~/.ssh/config from changing any of this; keepalives turn a dead
    network path into an exit within a minute instead of a hang.
    """
    argv = [
        "ssh", "-F", "none", "-i", str(key), "-o", "IdentitiesOnly=yes",
        "-o", "BatchMode=yes", "-o", "StrictHostKeyChecking=yes",
        "-o", f"UserKnownHostsFile={known_hosts}", "-o", "GlobalKnownHostsFile=/dev/null",
        "-o", f"ConnectTimeout={max(1, round(connect_timeout))}",
        "-o", "ServerAliveInterval=15", "-o", "ServerAliveCountMax=3",
        "-p", str(port), "-c", CIPHER,
    ]  # fmt: skip
    # rsync splits -e on spaces and honours single quotes, which is what shlex.join emits
    return shlex.join(argv)


def rsync_argv(source: Path, target: str, *, ssh: str | None, timeout_seconds: int,
               bwlimit_kbps: int | None, append: bool = True) -> list[str]:
    """The argv that sends `source` to `target` (`user@host:/path` with `ssh`, or a path).
    `append=False` (a small file, the manifest): sent whole to a temporary name, renamed."""
    argv = [
        # rsync dies with the worker that started it: a SIGKILLed worker must not leave an
        # rsync writing into the file the worker that takes the job over resumes.
        "setpriv", "--pdeathsig", "KILL", "rsync",
        # An archive is sealed and never rewritten, so what is at the destination is always a
        # prefix of it. --append-verify (it implies --inplace) then sends only the missing
        # rest and checks the whole file's checksum; --inplace alone would rescan every offset
        # of the missing half for matches (a resume took 3.1x an uninterrupted copy against
        # 1.35x, LIMITS.md). --partial keeps what arrived when rsync is interrupted.
        *(["--inplace", "--partial", "--append-verify"] if append else []),
        "--times",  # a complete copy then passes rsync's quick check: re-running is a no-op
        "--stats", "--info=progress2", f"--timeout={timeout_seconds}",
    ]  # fmt: skip
    if bwlimit_kbps is not None:
        argv.append(f"--bwlimit={bwlimit_kbps}")
    if ssh is not None:
        argv += ["-e", ssh]
    return [*argv, "--", str(source), target]


@dataclass(frozen=True)
class ExitMeaning:
    transient: bool
    meaning: str


T, P = True, False
# One table for every decision to retry. Transient: the network or the far end may recover,
# and a retry resumes from what arrived. Permanent: the same command would fail the same way.
EXIT_CODES: dict[int, ExitMeaning] = {
    1: ExitMeaning(P, "syntax or usage error"),
    2: ExitMeaning(P, "protocol incompatibility"),
    3: ExitMeaning(P, "errors selecting input/output files, directories"),
    4: ExitMeaning(P, "requested action not supported by the other side"),
    5: ExitMeaning(P, "error starting client-server protocol"),
    6: ExitMeaning(P, "daemon unable to append to its log file"),
    10: ExitMeaning(T, "error in socket I/O"),
    # file I/O: mostly a full or flaky disk at the destination, which an operator can fix
    # while attempts remain
    11: ExitMeaning(T, "error in file I/O"),
    12: ExitMeaning(T, "error in rsync protocol data stream (connection lost)"),
    13: ExitMeaning(P, "errors with program diagnostics"),
    14: ExitMeaning(P, "error in IPC code"),
    15: ExitMeaning(T, "sibling process crashed"),
    16: ExitMeaning(T, "sibling process was killed by a signal"),
    19: ExitMeaning(T, "received SIGUSR1"),
    # someone stopped this rsync (shutdown, an operator): nothing says the next one fails
    20: ExitMeaning(T, "received SIGINT, SIGTERM or SIGHUP"),
    21: ExitMeaning(P, "some error returned by waitpid()"),
    22: ExitMeaning(P, "error allocating core memory buffers"),
    # one file per run: "partial" means this file failed, e.g. --append-verify's checksum
    # failed and rsync kept the data for the next run
    23: ExitMeaning(T, "partial transfer due to error"),
    # the staging file vanished: the next attempt's check of it fails permanently, naming it
    24: ExitMeaning(T, "partial transfer due to vanished source files"),
    25: ExitMeaning(P, "the --max-delete limit stopped deletions"),
    30: ExitMeaning(T, "timeout in data send/receive (--timeout)"),
    35: ExitMeaning(T, "timeout waiting for daemon connection"),
    126: ExitMeaning(P, "rsync or setpriv is not executable"),
    127: ExitMeaning(P, "rsync or setpriv is not installed on this machine"),
    255: ExitMeaning(T, "the ssh connection failed or was lost"),
}
_HOST_KEY_REFUSED = re.compile(
    r"Host key verification failed|REMOTE HOST IDENTIFICATION HAS CHANGED|"
    r"No \S+ host key is known for"
)


class RsyncError(TransientError):
    """rsync failed in a way a later attempt may not: it resumes from what arrived."""

    def __init__(self, message: str, exited: int) -> None:
        super().__init__(message)
        self.exited = exited


class RsyncFailedError(PermanentError):
    """rsync failed in a way that repeating the same command cannot fix."""

    def __init__(self, message: str, exited: int) -> None:
        super().__init__(message)
        self.exited = exited


def classify(exited: int, stderr_tail: str) -> TransientError | PermanentError:
    """The error for an rsync exit status, from EXIT_CODES (a signal is 128+N: transient;
    an unknown status is transient, bounded by the attempt limit)."""
    tail = stderr_tail.strip()[-800:]
    if _HOST_KEY_REFUSED.search(stderr_tail):
        return HostKeyError(f"the destination's host key is unknown or changed, refused by "
                            f"ssh (rsync exit {exited}); nothing was sent: {tail}")
    known = EXIT_CODES.get(exited)
    if known is None:
        meaning = (f"killed by signal {exited - 128}" if 128 < exited < 160
                   else "exit status rsync does not document")
        known = ExitMeaning(T, meaning)
    message = f"rsync exit {exited} ({known.meaning}): {tail}"
    return RsyncError(message, exited) if known.transient else RsyncFailedError(message, exited)


@dataclass(frozen=True)
class Progress:
    bytes_done: int
    percent: int
    mb_per_s: float  # 10^6 bytes per second
    eta_s: float | None  # None on a file's final line, where rsync prints elapsed time


_PROGRESS = re.compile(
    r"^\s*(?P<bytes>[\d,]+)\s+(?P<pct>\d+)%\s+(?P<rate>[\d.]+)(?P<unit>[kMGT]?)B/s\s+"
    r"(?P<h>\d+):(?P<m>\d\d):(?P<s>\d\d)(?P<final>\s+\(xfr#)?"
)
# rsync's progress rates are in units of 1024 (kB/s = KiB/s)
_UNITS = {"": 1, "k": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
_STAT = re.compile(r"^(Total bytes sent|Literal data|Matched data|Total file size|"
                   r"Total transferred file size): ([\d,]+)")
STAT_KEYS = {"Total bytes sent": "bytes_sent", "Literal data": "literal_bytes",
             "Matched data": "matched_bytes", "Total file size": "file_bytes",
             "Total transferred file size": "transferred_file_bytes"}


def parse_progress(line: str) -> Progress | None:
    """One `--info=progress2` update, or None for any other line."""
    match = _PROGRESS.match(line)
    if match is None:
        return None
    rate = float(match["rate"]) * _UNITS[match["unit"]] / 1e6
    clock = int(match["h"]) * 3600 + int(match["m"]) * 60 + int(match["s"])
    return Progress(int(match["bytes"].replace(",", "")), int(match["pct"]), rate,
                    None if match["final"] else float(clock))


@dataclass
class RsyncOutput:
    """Reads rsync's stdout as it streams: progress updates (separated by CR) and the
    `--stats` block at the end. `feed` is a host-layer sink."""

    on_progress: Callable[[Progress], None] | None = None
    stats: dict[str, int] = field(default_factory=dict)
    last: Progress | None = None
    _pending: str = ""

    def feed(self, chunk: bytes) -> None:
        self._pending += chunk.decode("utf-8", "replace")
        *lines, self._pending = re.split(r"[\r\n]", self._pending)
        for line in lines:
            self._line(line)

    def close(self) -> None:
        """Read what is left after the last separator."""
        if self._pending:
            self._line(self._pending)
            self._pending = ""

    def _line(self, line: str) -> None:
        progress = parse_progress(line)
        if progress is not None:
            self.last = progress
            if self.on_progress is not None:
                self.on_progress(progress)
            return
        stat = _STAT.match(line.strip())
        if stat is not None:
            self.stats[STAT_KEYS[stat[1]]] = int(stat[2].replace(",", ""))
