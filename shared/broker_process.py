"""What one process of the embedded broker holds: its name on the leases it takes, kept
alive by an flock, and the signal that wakes its consumers when it publishes.

An owner's lock file is `<broker file>-owners/<pid>-<random>`, locked exclusively for the
process's lifetime (the kernel drops the lock when the process dies, however it dies); a
process that can take another's lock knows that one is dead.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import threading
import uuid
from pathlib import Path


class ProcessOwner:
    """This process's name on the leases it takes, kept alive by an flock on its own file."""

    def __init__(self, directory: Path) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        self.directory = directory
        self.name = f"{os.getpid()}-{uuid.uuid4().hex[:12]}"
        self._file = (directory / self.name).open("w")  # not inherited by exec'd children
        fcntl.flock(self._file, fcntl.LOCK_EX | fcntl.LOCK_NB)

    def is_dead(self, name: str) -> bool:
        """True when the owner `name` no longer runs: its lock can be taken (its file is then
        removed), or its file is gone."""
        path = self.directory / name
        try:
            handle = path.open("r")
        except FileNotFoundError:
            return True
        with handle:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return False
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
            return True

    def others(self) -> list[str]:
        return [p.name for p in self.directory.iterdir() if p.name != self.name]


_owners: dict[tuple[int, str], ProcessOwner] = {}
_owners_lock = threading.Lock()


def owner_for(path: Path) -> ProcessOwner:
    """The one owner of this process for the broker file at `path` (a new one after fork)."""
    key = (os.getpid(), str(path))
    with _owners_lock:
        if key not in _owners:
            _owners[key] = ProcessOwner(path.with_name(path.name + "-owners"))
        return _owners[key]


class Signal:
    """Wakes this process's consumers of one broker file when a message became ready."""

    def __init__(self) -> None:
        self._condition = threading.Condition()
        self.generation = 0

    def notify(self) -> None:
        with self._condition:
            self.generation += 1
            self._condition.notify_all()

    def wait(self, seen: int, timeout: float) -> None:
        """Wait up to `timeout` unless something happened since `seen` was read."""
        with self._condition:
            self._condition.wait_for(lambda: self.generation != seen, timeout)


_signals: dict[str, Signal] = {}


def signal_for(path: Path) -> Signal:
    return _signals.setdefault(str(path), Signal())
