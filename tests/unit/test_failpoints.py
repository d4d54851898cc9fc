"""Named crash points (shared.failpoints): what FERRY_FAILPOINTS arms, what it refuses, when
an armed point fires, and that an unarmed one does nothing."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from shared import failpoints
from shared.errors import ConfigurationError, TransientError
from shared.failpoints import (
    POINTS,
    SCOPED,
    FailpointError,
    UndeclaredFailpointError,
    configure,
    failpoint,
    parse,
)
from tests.support.processes import ROOT, ChildProcess


@pytest.fixture(autouse=True)
def disarmed() -> Iterator[None]:
    """Each test arms its own points; none stay armed after it."""
    configure(None)
    yield
    configure(None)


def test_a_value_arms_the_points_it_names_with_their_actions() -> None:
    triggers = parse(" relay.after_publish=kill , jobs.after_claim=error@3,")
    assert {name: (t.action, t.on_hit) for name, t in triggers.items()} == {
        "relay.after_publish": ("kill", None), "jobs.after_claim": ("error", 3)}
    assert parse("") == {} and parse(" , ") == {}


@pytest.mark.parametrize(("value", "named"), [
    ("relay.after_publsh=kill", "'relay.after_publsh'"),
    ("relay.after_publish=explode", "'explode'"),
    ("relay.after_publish", "'relay.after_publish'"),
    ("=kill", "'=kill'"),
    ("relay.after_publish=kill@0", "'0'"),
    ("relay.after_publish=kill@x", "'x'"),
    ("relay.after_publish=kill,relay.after_publish=error", "named twice"),
    ("resolver:relay.after_publish=kill,relay.after_publish=error", "named twice"),
    ("resolvr:relay.after_publish=kill", "scope 'resolvr' is no service"),
    (":relay.after_publish=kill", "scope '' is no service"),
    ("all:runtime.after_commit=kill", "scope 'all' is no service"),
    ("archiver:archiver.mid_stream=kill", "archiver.mid_stream is reached in one service"),
    ("resolver:relay.after_publsh=kill", "'relay.after_publsh'"),
])
def test_a_bad_value_is_refused_naming_what_is_wrong(value: str, named: str) -> None:
    # When FERRY_FAILPOINTS names what is not a declared point with a known action
    with pytest.raises(ConfigurationError) as refused:
        configure(value)
    # Then the error names it, and nothing is armed (not even the good entries)
    assert named in str(refused.value) and "FERRY_FAILPOINTS" in str(refused.value)
    assert failpoints.armed() == {}
    # And start refuses, as does any failpoint reached before it
    with pytest.raises(ConfigurationError):
        failpoints.check()
    with pytest.raises(ConfigurationError):
        failpoint("relay.after_publish")


def test_a_scope_arms_the_point_for_that_service() -> None:
    triggers = parse("resolver:runtime.after_commit=kill, transfer : jobs.after_claim=error@2")
    assert {name: (t.scope, t.action, t.on_hit) for name, t in triggers.items()} == {
        "runtime.after_commit": ("resolver", "kill", None),
        "jobs.after_claim": ("transfer", "error", 2)}
    assert triggers["jobs.after_claim"].spec("jobs.after_claim") == (
        "transfer:jobs.after_claim=error@2")
    assert SCOPED <= set(POINTS)


def test_a_scoped_point_fires_only_where_its_service_reaches_it() -> None:
    # Given a point armed for the transfer service, on its 2nd hit there
    configure("transfer:jobs.after_claim=error@2")
    # When other services (and a call site that names none) reach it, nothing happens,
    # and those are no hits of the transfer's
    for scope in ("archiver", "snapshotter", None, "archiver"):
        failpoint("jobs.after_claim", scope=scope)
    failpoint("jobs.after_claim", scope="transfer")
    assert failpoints.armed()["jobs.after_claim"].hits == 1
    # Then the transfer's 2nd hit fires
    with pytest.raises(FailpointError, match="jobs.after_claim: error \\(hit 2 in transfer\\)"):
        failpoint("jobs.after_claim", scope="transfer")


def test_an_unscoped_entry_fires_in_every_service() -> None:
    configure("runtime.after_commit=error")
    for scope in ("resolver", "transfer", None):
        with pytest.raises(FailpointError):
            failpoint("runtime.after_commit", scope=scope)


def test_an_undeclared_name_in_the_code_raises_armed_or_not() -> None:
    with pytest.raises(UndeclaredFailpointError, match="relay.sometime"):
        failpoint("relay.sometime")
    configure("relay.after_publish=error")
    with pytest.raises(UndeclaredFailpointError):
        failpoint("relay.sometime")


def test_unarmed_points_do_nothing() -> None:
    configure("jobs.after_claim=error")
    for name in POINTS:
        if name != "jobs.after_claim":
            failpoint(name)  # returns: not armed
    with pytest.raises(FailpointError):
        failpoint("jobs.after_claim")


def test_error_is_a_transient_failure_on_every_hit() -> None:
    configure("relay.before_publish=error")
    for hit in (1, 2, 3):
        with pytest.raises(TransientError, match=f"relay.before_publish: error \\(hit {hit}\\)"):
            failpoint("relay.before_publish")


def test_at_n_fires_on_the_nth_hit_only() -> None:
    configure("archiver.mid_stream=error@3")
    failpoint("archiver.mid_stream")
    failpoint("archiver.mid_stream")
    with pytest.raises(FailpointError, match="hit 3"):
        failpoint("archiver.mid_stream")
    failpoint("archiver.mid_stream")  # the 4th: passes again
    assert failpoints.armed()["archiver.mid_stream"].hits == 4


KILLER = """
from shared.failpoints import failpoint
for hit in range(1, 6):
    print(f"before hit {hit}", flush=True)
    failpoint("transfer.mid_rsync")
print("survived", flush=True)
"""


def _run(value: str | None) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != failpoints.ENV}
    if value is not None:
        env[failpoints.ENV] = value
    return subprocess.run([sys.executable, "-c", KILLER], cwd=ROOT, capture_output=True,
                          text=True, timeout=30, env={**env, "PYTHONPATH": str(ROOT)})


def test_kill_at_n_sigkills_the_process_on_that_hit_after_saying_so() -> None:
    # Given a process armed to die on the 3rd hit (parsed from its environment at import)
    done = _run("transfer.mid_rsync=kill@3")
    # Then it died by SIGKILL there, after one line on stderr naming the point and the hit
    assert done.returncode == -signal.SIGKILL, done
    assert done.stdout.split() == ["before", "hit", "1", "before", "hit", "2", "before", "hit",
                                   "3"], done.stdout
    assert "failpoint transfer.mid_rsync: kill (hit 3), SIGKILL to pid" in done.stderr
    # And without FERRY_FAILPOINTS the same process runs to its end
    unarmed = _run(None)
    assert unarmed.returncode == 0 and "survived" in unarmed.stdout, unarmed


def test_a_service_refuses_to_start_naming_the_bad_failpoint(tmp_path: Path) -> None:
    # Given a service started with a misspelt point (embedded backbone, nothing else needed)
    env = {"FERRY_STATE_DIR": str(tmp_path), "FERRY_BROKER_URL": "memory://",
           failpoints.ENV: "relay.after_publsh=kill"}
    process = ChildProcess.ferry("run", "resolver", env=env, log=tmp_path / "resolver.log")
    # Then it exits 1 at start with one line naming it
    assert process.wait(60) == 1, process.tail()
    said = " ".join(process.log().split())  # the console wraps long lines
    assert "ConfigurationError: FERRY_FAILPOINTS: unknown failpoint 'relay.after_publsh'" in (
        said), said
    assert "Ctrl-C stops" not in said
