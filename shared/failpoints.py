"""Named crash points: where a crash could lose or repeat work, a test can make one happen.

Off unless `FERRY_FAILPOINTS` names points, comma-separated, each
`[service:]name=action[@N]`:
- `kill`: one line to stderr (flushed), then SIGKILL of this very process, as a crash would;
- `error`: raise FailpointError (a TransientError: the one retry policy handles it).
Without `@N` the action fires on every hit; with `@N` on the N-th hit only (counted per
process, from 1). `FERRY_FAILPOINTS=relay.after_publish=kill,jobs.after_claim=error@3`.

The points in SCOPED are reached by every service (the runtime, the relay, the job
workers), and their call sites pass the service they run for. `resolver:relay.after_publish`
fires (and counts hits) only there: in `ferry run all`, where every service shares one
process, the unscoped form fires in whichever service gets there first.

The value is parsed once, at import; a bad one (an undeclared point, an unknown action, a
malformed entry, a scope that is no service or on a point not in SCOPED) is raised as
ConfigurationError naming it by `check()`, which every service's start calls first, and by
any failpoint reached before. Every point is declared in POINTS below, and `failpoint(name)`
raises UndeclaredFailpointError for any other name, armed or not:
tests/e2e/test_crash_matrix.py compares POINTS, the `failpoint("...")` calls in the source
(scoped exactly for SCOPED) and its cases. Off, a failpoint costs one dict lookup.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
from collections.abc import Mapping
from dataclasses import dataclass, field

from shared.errors import ConfigurationError, FerryError, TransientError
from shared.settings import SERVICES

log = logging.getLogger(__name__)

ENV = "FERRY_FAILPOINTS"
ACTIONS = ("kill", "error")

# Every point, and the boundary it stands at. A crash there must change nothing: the work
# is neither lost nor done twice once the process is restarted.
POINTS: Mapping[str, str] = {
    "runtime.after_commit": "a handler's transaction committed, the message not yet acked",
    "relay.before_publish": "outbox rows committed and read, not yet published",
    "relay.after_publish": "outbox rows published and confirmed, not yet marked published",
    "jobs.after_claim": "a job claimed under a lease, no work done on it yet",
    "snapshotter.after_create": "a snapshot created (and exported), not yet recorded active",
    "snapshotter.after_release": "a snapshot torn down, its release not yet recorded",
    "archiver.mid_stream": "an archive's partial file has bytes, the stream goes on",
    "archiver.after_seal": "an archive renamed to its final name, archive.completed and "
                           "the job's done not yet committed",
    "transfer.mid_rsync": "rsync running, part of the archive at the destination",
    "transfer.after_verify": "the copy at the destination verified by sha256, the transfer "
                             "not yet recorded",
}
# Reached by every service: each call passes `scope=` the service it runs for.
SCOPED = frozenset({"runtime.after_commit", "relay.before_publish", "relay.after_publish",
                    "jobs.after_claim"})


class FailpointError(TransientError):
    """Raised by a failpoint armed with `error`: a transient failure at a named boundary."""


class UndeclaredFailpointError(FerryError):
    """`failpoint()` was called with a name POINTS does not declare (a bug in the caller)."""


@dataclass
class Trigger:
    """What an armed point does, and on which hit (None: every hit), in which service
    (None: wherever it is reached)."""

    action: str
    on_hit: int | None = None
    scope: str | None = None
    hits: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def spec(self, name: str) -> str:
        return ((f"{self.scope}:" if self.scope else "") + f"{name}={self.action}"
                + (f"@{self.on_hit}" if self.on_hit else ""))

    def fire(self, name: str, scope: str | None = None) -> None:
        if self.scope is not None and scope != self.scope:
            return  # another service reached it: not a hit of this trigger
        with self._lock:
            self.hits += 1
            hit = self.hits
        if self.on_hit is not None and hit != self.on_hit:
            return
        where = f"hit {hit}" + (f" in {scope}" if self.scope else "")
        if self.action == "error":
            raise FailpointError(f"failpoint {name}: error ({where})")
        sys.stderr.write(f"failpoint {name}: kill ({where}), SIGKILL to pid {os.getpid()}\n")
        sys.stderr.flush()
        os.kill(os.getpid(), signal.SIGKILL)


def parse(value: str) -> dict[str, Trigger]:
    """The triggers a FERRY_FAILPOINTS value arms. Raises ConfigurationError naming the
    first entry that is not `[service:]declared.point=kill|error[@N]` (N ≥ 1; a service of
    shared.settings.SERVICES, only on a point in SCOPED), or a point named twice."""
    triggers: dict[str, Trigger] = {}
    for entry in (part.strip() for part in value.split(",")):
        if not entry:
            continue
        name, sep, action = (text.strip() for text in entry.partition("="))
        if not sep or not name or not action:
            raise ConfigurationError(f"{ENV}: {entry!r} is not name=action (e.g. "
                                     f"relay.after_publish=kill)")
        scope, colon, name = (text.strip() for text in name.rpartition(":"))
        if name not in POINTS:
            raise ConfigurationError(f"{ENV}: unknown failpoint {name!r}; declared: "
                                     f"{', '.join(sorted(POINTS))}")
        if colon and scope not in SERVICES:
            raise ConfigurationError(f"{ENV}: {entry!r}: the scope {scope!r} is no service; "
                                     f"one of {', '.join(SERVICES)}")
        if colon and name not in SCOPED:
            raise ConfigurationError(f"{ENV}: {entry!r}: {name} is reached in one service "
                                     f"only and takes no scope; scoped points: "
                                     f"{', '.join(sorted(SCOPED))}")
        if name in triggers:
            raise ConfigurationError(f"{ENV}: failpoint {name!r} is named twice")
        action, at, count = action.partition("@")
        if action not in ACTIONS:
            raise ConfigurationError(f"{ENV}: unknown action {action!r} for {name}; one of "
                                     f"{', '.join(ACTIONS)}, optionally @N")
        on_hit = None
        if at:
            if not count.isdigit() or int(count) < 1:
                raise ConfigurationError(f"{ENV}: {entry!r}: @N needs a whole number N ≥ 1, "
                                         f"not {count!r}")
            on_hit = int(count)
        triggers[name] = Trigger(action, on_hit, scope or None)
    return triggers


# Every declared name maps to its trigger or None: one lookup answers "armed?" and
# "declared?" at once. Empty while the environment's value is refused (then _refused says
# why, and every failpoint raises it).
_armed: dict[str, Trigger | None] = {}
_refused: ConfigurationError | None = None
_announced = False


def configure(value: str | None) -> None:
    """Arm exactly the points `value` names (None or "": none). Raises ConfigurationError,
    and then arms nothing."""
    global _armed, _refused, _announced
    _armed, _refused, _announced = {}, None, False
    try:
        triggers = parse(value or "")
    except ConfigurationError as error:
        _refused = error
        raise
    _armed = {name: triggers.get(name) for name in POINTS}


def armed() -> dict[str, Trigger]:
    """The points armed in this process."""
    return {name: trigger for name, trigger in _armed.items() if trigger is not None}


def check() -> None:
    """At a service's start: raise ConfigurationError when FERRY_FAILPOINTS was refused;
    say loudly (once) which points are armed."""
    global _announced
    if _refused is not None:
        raise _refused
    if not _announced and (points := armed()):
        _announced = True
        log.warning("failpoints armed (%s): %s", ENV,
                    ", ".join(trigger.spec(name) for name, trigger in points.items()))


def failpoint(name: str, *, scope: str | None = None) -> None:
    """A named crash point: nothing unless armed (for `scope`, the service reaching it,
    when the entry names one). Raises FailpointError (armed `error`),
    does not return (armed `kill`), raises UndeclaredFailpointError for a name POINTS does
    not declare and ConfigurationError while FERRY_FAILPOINTS is refused."""
    try:
        trigger = _armed[name]
    except KeyError:
        if _refused is not None:
            raise _refused from None
        raise UndeclaredFailpointError(f"failpoint {name!r} is not declared in "
                                       f"shared.failpoints.POINTS") from None
    if trigger is not None:
        trigger.fire(name, scope)


try:
    configure(os.environ.get(ENV))
except ConfigurationError:
    pass  # kept in _refused: check() at start raises it, naming the bad entry
