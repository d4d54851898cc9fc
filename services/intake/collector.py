"""Python's cyclic garbage collector, paused while a large document is read and judged.

A 1 MiB document becomes ~200,000 fresh objects as it is parsed, validated and announced;
they trigger the collector's full passes, which walk every live object of the process and
cost as much as the validation itself (the worst valid 1 MiB document: 135 ms validated
with the collector on, 72 ms paused). The document's objects hold no cycles, so reference
counting frees them either way. Intake handles large documents one at a time, so a pause
lasts one document; the collector runs again when the last pause ends.
"""

from __future__ import annotations

import gc
import threading
from collections.abc import Iterator
from contextlib import contextmanager

_lock = threading.Lock()
_pauses = 0
_was_enabled = True


@contextmanager
def collector_paused() -> Iterator[None]:
    """The cyclic collector off for the block (nested and concurrent pauses keep it off
    until the last one ends); on again after, if it was on before the first."""
    global _pauses, _was_enabled
    with _lock:
        _pauses += 1
        if _pauses == 1:
            _was_enabled = gc.isenabled()
            gc.disable()
    try:
        yield
    finally:
        with _lock:
            _pauses -= 1
            if _pauses == 0 and _was_enabled:
                gc.enable()
