"""Real child processes for tests: the one way the tests start, watch and end a process.

A `ChildProcess` runs `python -m <module> <args>` (`ChildProcess.ferry(...)` for the
`ferry` command) with the test's environment added, its stdout and stderr both in one log
file. With `ready` it waits until that text appears in the log (or, given a callable, until
it returns something true), failing with the log's tail if the process exits first. It is
ended through its own PID only (SIGKILL with `kill()`, SIGTERM then SIGKILL with `stop()`),
and reaped: use it inside `children()` or the `processes` fixture, which stop whatever is
still running however the test ends.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

from tests.support.helpers import wait_for

ROOT = Path(__file__).resolve().parents[2]
FERRY = "ferry"  # `python -m ferry` is the `ferry` command, without the console script

Ready = str | Callable[[], object]


class ChildProcess:
    def __init__(self, module: str, *args: str, env: Mapping[str, str],
                 ready: Ready | None = None, log: Path | None = None,
                 timeout: float = 60.0) -> None:
        self.name = module if module != FERRY else f"ferry {' '.join(args[:2])}".strip()
        self.argv = [sys.executable, "-m", module, *args]
        self.env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1", **env}
        self.log_path = log or Path(tempfile.mkstemp(prefix=f"{module}-", suffix=".log")[1])
        self.process = self._spawn()
        if ready is not None:
            self.wait_ready(ready, timeout)

    @classmethod
    def ferry(cls, *args: str, env: Mapping[str, str], ready: Ready | None = None,
              log: Path | None = None, timeout: float = 60.0) -> ChildProcess:
        """`ferry <args>` as a child process."""
        return cls(FERRY, *args, env=env, ready=ready, log=log, timeout=timeout)

    def _spawn(self) -> subprocess.Popen[bytes]:
        with self.log_path.open("ab") as log_file:  # the child keeps its own descriptor
            return subprocess.Popen(self.argv, cwd=ROOT, env=self.env, stdin=subprocess.DEVNULL,
                                    stdout=log_file, stderr=subprocess.STDOUT)

    @property
    def pid(self) -> int:
        return self.process.pid

    @property
    def running(self) -> bool:
        return self.process.poll() is None

    @property
    def returncode(self) -> int | None:
        return self.process.poll()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def tail(self, chars: int = 3000) -> str:
        return self.log()[-chars:]

    def wait_ready(self, ready: Ready, timeout: float = 60.0) -> None:
        """Wait until `ready` is in the log (or `ready()` is true). Raises AssertionError
        with the log's tail when the process exits first or the time runs out (it is killed
        then)."""
        def check() -> object:
            if not self.running:
                raise AssertionError(f"{self.name} exited {self.returncode} before it was "
                                     f"ready:\n{self.tail()}")
            return ready in self.log() if isinstance(ready, str) else ready()

        try:
            wait_for(check, timeout=timeout, what=f"{self.name} to be ready")
        except AssertionError:
            if not self.running:
                raise  # it exited: check() said so, with the log
            self.kill()
            raise AssertionError(f"{self.name} was not ready within {timeout}s "
                                 f"({self.log_path}):\n{self.tail()}") from None

    def restart(self) -> None:
        """Start the same command again (after kill or stop), logging to the same file."""
        assert not self.running, f"{self.name} is still running"  # noqa: S101
        self.process = self._spawn()

    def wait(self, timeout: float = 60.0) -> int:
        """Wait for a process that ends by itself; SIGKILLed (and the test failed) if it
        does not within `timeout`."""
        try:
            return self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError(f"{self.name} did not exit within {timeout}s:\n"
                                 f"{self.tail()}") from None

    def signal(self, number: signal.Signals) -> None:
        """Send a signal to this process only (its PID, while it is ours and unreaped)."""
        if self.running:
            os.kill(self.process.pid, number)

    def kill(self) -> None:
        """SIGKILL, as a crash would, and reap."""
        self.signal(signal.SIGKILL)
        self.process.wait(timeout=10)

    def stop(self, timeout: float = 30.0) -> int:
        """SIGTERM and wait for a clean exit; SIGKILL after `timeout`. Returns the exit status."""
        self.signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            return self.process.wait()


@contextmanager
def children() -> Iterator[list[ChildProcess]]:
    """A list to put started processes in; every one still running is stopped at the end."""
    started: list[ChildProcess] = []
    try:
        yield started
    finally:
        stop_all(started)


def stop_all(started: list[ChildProcess], timeout: float = 30.0) -> None:
    """SIGTERM all at once (so they wind down together), then reap each."""
    for child in started:
        child.signal(signal.SIGTERM)
    for child in started:
        child.stop(timeout)


def run_ferry(*args: str, env: Mapping[str, str],
              timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
    """`ferry <args>` run to its end, its output captured."""
    return subprocess.run([sys.executable, "-m", FERRY, *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout,
                          env={**os.environ, "PYTHONPATH": str(ROOT), **env})
