"""Run commands on hosts: the `Host` interface, its local executor and a pool of connections.

Every command is an argv list, joined with `shlex.join` and run as
`bash -o pipefail -c <joined>`, so nothing in an argument is ever read by a shell. stdout
streams to a sink (or is collected); stderr is drained at the same time, because a pipe or
an SSH window left full stalls the other stream, and only its tail is kept for errors.
The SSH implementation lives in `shared.ssh`.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shlex
import signal
import subprocess
import threading
from collections.abc import Callable, Collection
from dataclasses import dataclass
from typing import Protocol

from shared.errors import CommandTimedOut, ConfigurationError, UnexpectedExit

CHUNK = 1 << 20  # stdout read size: large reads keep per-call overhead off 400 MB/s streams
STDERR_TAIL = 64 << 10  # enough to explain a failure, bounded however chatty a command is

Sink = Callable[[bytes], None]


@dataclass(frozen=True)
class Result:
    """How a command ended. `ok` means it exited 0; `stdout` is empty when a sink took it."""

    ok: bool
    exited: int
    stdout: bytes
    stderr_tail: str
    argv: list[str]
    host: str


class Host(Protocol):
    """Somewhere commands run: a remote host over SSH or this machine."""

    name: str

    def run(
        self,
        argv: list[str],
        *,
        timeout: float | None = None,
        sink: Sink | None = None,
        ok_exits: Collection[int] = (0,),
        stdin: bytes | None = None,
    ) -> Result:
        """Run one command. Raises UnexpectedExit, CommandTimedOut, HostUnreachableError."""
        ...

    def run_pipeline(
        self,
        stages: list[list[str]],
        *,
        timeout: float | None = None,
        sink: Sink | None = None,
        ok_exits: Collection[int] = (0,),
        stdin: bytes | None = None,
    ) -> Result:
        """Run `stage1 | stage2 | ...` under pipefail. Raises as `run` does."""
        ...

    def close(self) -> None:
        """Release the connection; the host may be used again (it reconnects)."""
        ...


def command_line(argv: list[str]) -> str:
    """The shell-safe text of one command. Raises ValueError for an empty argv."""
    if not argv:
        raise ValueError("empty argv")
    return shlex.join(argv)


def pipeline_line(stages: list[list[str]]) -> str:
    """The shell-safe text of a pipeline. Raises ValueError if it or a stage is empty."""
    if not stages:
        raise ValueError("empty pipeline")
    return " | ".join(command_line(stage) for stage in stages)


def pipeline_argv(stages: list[list[str]]) -> list[str]:
    """A pipeline as one argv for results and errors: the stages separated by `|`."""
    flat: list[str] = []
    for stage in stages:
        flat += [*(["|"] if flat else []), *stage]
    return flat


class Deadline:
    """Calls `expire` once after `timeout` seconds unless cancelled first (None: never)."""

    def __init__(self, timeout: float | None, expire: Callable[[], None]) -> None:
        self.expired = False
        self._expire = expire
        self._timer = None if timeout is None else threading.Timer(timeout, self._fire)
        if self._timer is not None:
            self._timer.daemon = True
            self._timer.start()

    def _fire(self) -> None:
        self.expired = True
        self._expire()

    def cancel(self) -> None:
        """Stop the timer; harmless if it already fired. Raises nothing."""
        if self._timer is not None:
            self._timer.cancel()


def drain_output(
    read_stdout: Callable[[int], bytes],
    read_stderr: Callable[[int], bytes],
    sink: Sink | None,
    stop: Callable[[], None],
) -> tuple[bytes, str]:
    """Read stdout to `sink` (or collect it) while a thread drains stderr, until both end.

    Returns (collected stdout, stderr tail). If the sink raises, calls `stop` so the
    command dies and stderr ends, then re-raises the sink's exception.
    """
    tail = bytearray()

    def keep_stderr() -> None:
        while chunk := read_stderr(CHUNK):
            tail.extend(chunk)
            if len(tail) > 2 * STDERR_TAIL:  # trim rarely: cheap even for chatty commands
                del tail[:-STDERR_TAIL]

    drainer = threading.Thread(target=keep_stderr, name="stderr-drain", daemon=True)
    drainer.start()
    collected = bytearray()
    deliver = collected.extend if sink is None else sink
    try:
        while chunk := read_stdout(CHUNK):
            deliver(chunk)
    except BaseException:
        stop()
        drainer.join()
        raise
    drainer.join()
    return bytes(collected), tail[-STDERR_TAIL:].decode("utf-8", "replace")


def feed_stdin(write: Callable[[bytes], object], end: Callable[[], object], data: bytes) -> None:
    """Write `data` then end the input, in a thread so a command that prints before it
    reads cannot deadlock against us. A command that exits early just loses the rest."""

    def feed() -> None:
        with contextlib.suppress(OSError, EOFError):
            write(data)
        with contextlib.suppress(OSError, EOFError):
            end()

    threading.Thread(target=feed, name="stdin-feed", daemon=True).start()


def finish(
    host: str, argv: list[str], exited: int, stdout: bytes, tail: str, ok_exits: Collection[int]
) -> Result:
    """The Result of an ended command. Raises UnexpectedExit if `exited` is not in ok_exits."""
    if exited not in ok_exits:
        raise UnexpectedExit(host, argv, exited, tail)
    return Result(exited == 0, exited, stdout, tail, list(argv), host)


class CommandRunner:
    """What both executors share: argv and pipeline become one shell-safe bash script."""

    name: str

    def run(
        self,
        argv: list[str],
        *,
        timeout: float | None = None,
        sink: Sink | None = None,
        ok_exits: Collection[int] = (0,),
        stdin: bytes | None = None,
    ) -> Result:
        """Run `bash -o pipefail -c <shlex.join(argv)>`; stdout goes to `sink` if given.

        Raises UnexpectedExit (exit status not in ok_exits), CommandTimedOut (it was
        stopped), ConfigurationError, what `sink` raises, and over SSH HostUnreachableError
        (connection failed or lost mid-command), HostKeyError, HostAuthenticationError.
        """
        return self._run(command_line(argv), list(argv), timeout, sink, ok_exits, stdin)

    def run_pipeline(
        self,
        stages: list[list[str]],
        *,
        timeout: float | None = None,
        sink: Sink | None = None,
        ok_exits: Collection[int] = (0,),
        stdin: bytes | None = None,
    ) -> Result:
        """Run the stages joined by `|` under pipefail. Raises as `run` does."""
        script = pipeline_line(stages)
        return self._run(script, pipeline_argv(stages), timeout, sink, ok_exits, stdin)

    def _run(
        self,
        script: str,
        argv: list[str],
        timeout: float | None,
        sink: Sink | None,
        ok_exits: Collection[int],
        stdin: bytes | None,
    ) -> Result:
        raise NotImplementedError

    def close(self) -> None:
        """Release what the runner holds. Raises nothing."""


class LocalExecutor(CommandRunner):
    """Runs commands on this machine with the same interface and errors as an SSH host.

    A timeout kills the command's whole process group.
    """

    def __init__(self, name: str = "local") -> None:
        self.name = name

    def _run(
        self,
        script: str,
        argv: list[str],
        timeout: float | None,
        sink: Sink | None,
        ok_exits: Collection[int],
        stdin: bytes | None,
    ) -> Result:
        try:
            # the argv is fixed and `script` is shlex-quoted; bash is looked up on PATH
            proc = subprocess.Popen(  # noqa: S603
                ["bash", "-o", "pipefail", "-c", script],  # noqa: S607
                stdin=subprocess.DEVNULL if stdin is None else subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                start_new_session=True,  # its own process group, so a timeout kills it all
            )
        except OSError as exc:
            raise ConfigurationError(f"{self.name}: cannot start bash: {exc}") from exc
        assert proc.stdout is not None and proc.stderr is not None  # noqa: S101 (PIPE above)
        out_fd, err_fd = proc.stdout.fileno(), proc.stderr.fileno()
        with contextlib.suppress(OSError):  # bigger pipe, bigger reads; fine if refused
            fcntl.fcntl(out_fd, fcntl.F_SETPIPE_SZ, CHUNK)

        def kill() -> None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)

        if stdin is not None and proc.stdin is not None:
            feed_stdin(proc.stdin.write, proc.stdin.close, stdin)
        deadline = Deadline(timeout, kill)
        try:
            stdout, tail = drain_output(
                lambda n: os.read(out_fd, n), lambda n: os.read(err_fd, n), sink, kill
            )
        finally:
            deadline.cancel()
            exited = proc.wait()  # prompt on errors too: drain_output killed it
            proc.stdout.close()
            proc.stderr.close()
        if deadline.expired:
            raise CommandTimedOut(f"{self.name}: timed out after {timeout}s, killed: {script}")
        # a signal shows as -N from Popen; report it the way a shell would (128+N)
        return finish(
            self.name, argv, exited if exited >= 0 else 128 - exited, stdout, tail, ok_exits
        )


class HostPool:
    """One Host per key, created on first use and shared by every thread.

    Hosts reconnect by themselves when their connection died, so a pooled host stays usable.
    """

    def __init__(self, factory: Callable[[str], Host]) -> None:
        self._factory = factory
        self._hosts: dict[str, Host] = {}
        self._lock = threading.Lock()

    def get(self, key: str) -> Host:
        """The host for `key`, created by the factory the first time. Raises what it raises."""
        with self._lock:
            host = self._hosts.get(key)
            if host is None:
                host = self._hosts[key] = self._factory(key)
            return host

    def close_all(self) -> None:
        """Close and forget every host. Raises nothing from a host's close."""
        with self._lock:
            hosts, self._hosts = list(self._hosts.values()), {}
        for host in hosts:
            with contextlib.suppress(Exception):
                host.close()
