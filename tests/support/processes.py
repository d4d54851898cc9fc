"""Services as real child processes for crash tests: started, SIGKILLed and stopped by
their own PID only."""

from __future__ import annotations

import os
import select
import signal
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


class ChildProcess:
    """`python -m <module> <args>` with `env` added; its output goes to a log file.

    With `ready`, waits (up to 60 s) until the process prints that on its first stdout line.
    """

    def __init__(self, module: str, *args: str, env: dict[str, str],
                 ready: str | None = None, log: Path | None = None) -> None:
        self.log_path = log or Path(tempfile.mkstemp(prefix=f"{module}-", suffix=".log")[1])
        with self.log_path.open("ab") as log_file:
            self.process = subprocess.Popen(
                [sys.executable, "-m", module, *args], cwd=ROOT,
                env={**os.environ, "PYTHONPATH": str(ROOT), **env},
                stdout=subprocess.PIPE if ready else log_file, stderr=log_file, text=True)
        if ready is not None:
            readable, _, _ = select.select([self.process.stdout], [], [], 60)
            line = self.process.stdout.readline() if readable and self.process.stdout else ""
            if ready not in line:
                self.kill()
                raise AssertionError(f"{module} did not start: {line}{self.log()}")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def kill(self) -> None:
        if self.process.poll() is None:
            os.kill(self.process.pid, signal.SIGKILL)
        self.process.wait(timeout=10)

    def stop(self) -> None:
        if self.process.poll() is None:
            os.kill(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.kill()
        if self.process.stdout is not None:
            self.process.stdout.close()


@contextmanager
def children() -> Iterator[list[ChildProcess]]:
    """A list to put started processes in; every one still running is stopped at the end."""
    started: list[ChildProcess] = []
    try:
        yield started
    finally:
        for child in started:
            child.stop()
