"""A task repeated every few seconds in a daemon thread (reconcilers, watches)."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

log = logging.getLogger(__name__)


class Periodic:
    """Calls `tick` at once and then every `seconds` in a daemon thread, until stopped.

    An exception from one round is logged; the next round runs as planned.
    """

    def __init__(self, name: str, seconds: float, tick: Callable[[], object]) -> None:
        self.name = name
        self.seconds = seconds
        self.tick = tick
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                self.tick()
            except Exception as error:  # noqa: BLE001 - a bad round must not end the loop
                log.warning("%s: %s", self.name, error)
            self._stop.wait(self.seconds)

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name=self.name, daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
