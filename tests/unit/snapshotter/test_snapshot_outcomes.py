"""What one attempt at releasing a snapshot returns for the job worker to apply (against a
host that answers every command, no database): a release spends no attempt, a COW that
filled up comes back larger, and no outcome writes the attempt counter."""

from __future__ import annotations

from collections.abc import Collection
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from sqlalchemy import create_engine

from services.snapshotter.jobs import RELEASE_RETRY_SECONDS, SnapshotWork
from shared.contracts import Event, SnapshotFailed, SnapshotReleased
from shared.errors import HostUnreachableError
from shared.hosts import HostPool, Result, Sink
from shared.inbox_outbox import Units
from shared.jobs import Done, Failed, RetryIn
from shared.settings import Settings


class QuietHost:
    """A host where every command succeeds silently; `dmsetup status` says `status`."""

    name = "xen1"

    def __init__(self, status: str = "0 2048 snapshot 16/16384 16", down: bool = False) -> None:
        self.status = status
        self.down = down

    def run(self, argv: list[str], *, timeout: float | None = None, sink: Sink | None = None,
            ok_exits: Collection[int] = (0,), stdin: bytes | None = None) -> Result:
        if self.down:
            raise HostUnreachableError(f"{self.name}: connection refused")
        out = self.status.encode() if argv[:2] == ["dmsetup", "status"] else b""
        return Result(True, 0, out, "", argv, self.name)

    def run_pipeline(self, stages: list[list[str]], **_: object) -> Result:
        raise AssertionError("not used")

    def close(self) -> None:
        pass


class Outbox:
    def __init__(self) -> None:
        self.events: list[Event] = []

    def add(self, event: Event, *, migration_id: str, **_: object) -> None:
        self.events.append(event)


def work_on(host: QuietHost, tmp_path: Path) -> SnapshotWork:
    settings = Settings(state_dir=tmp_path, snapshot_cow_attempts=2)
    return SnapshotWork(settings, Units(create_engine("sqlite://")), HostPool(lambda _: host))


def lease(**values: object) -> Any:
    job = {"id": "0123456789ab", "migration_id": "m1", "request_id": "r1", "datacenter": "ey04",
           "xen_host": "root@xen1:22", "driver": "dm", "snapshot_id": "ferry-0123456789ab-1",
           "attempts": 2, "cow_attempt": 0, "cow_bytes": 4 << 20, "phase": "releasing",
           "release_reason": "archive completed", **values}
    return SimpleNamespace(job=SimpleNamespace(**job))


def recorded(outcome: Done | RetryIn | Failed) -> list[Event]:
    uow = SimpleNamespace(outbox=Outbox())
    assert outcome.record is not None
    outcome.record(uow)  # type: ignore[arg-type]
    return uow.outbox.events


def test_a_release_after_the_archive_finishes_the_job_and_says_snapshot_released(
        tmp_path: Path) -> None:
    # When an active snapshot whose archive completed is released
    outcome = work_on(QuietHost(), tmp_path).run(lease())
    # Then the job is done, its slot freed, and nothing touches its attempts
    assert isinstance(outcome, Done)
    assert outcome.result == {"reason": "archive completed"}
    assert outcome.values == {"phase": "released", "admitted": False, "export_port": None}
    [released] = recorded(outcome)
    assert isinstance(released, SnapshotReleased) and not released.invalidated


@pytest.mark.parametrize("job", [
    {"phase": "invalid", "release_reason": "COW full: found by the watch"},
    {"release_reason": "archive failed: tar: read error"},  # the release finds it invalid
])
def test_a_cow_that_filled_up_is_released_and_retried_larger_without_spending_an_attempt(
        job: dict[str, object], tmp_path: Path) -> None:
    outcome = work_on(QuietHost(status="0 2048 snapshot Invalid"), tmp_path).run(lease(**job))
    assert isinstance(outcome, RetryIn)
    assert outcome.seconds == 0 and not outcome.counts_as_attempt
    assert outcome.values["phase"] == "waiting" and outcome.values["cow_attempt"] == 1
    assert outcome.values["admitted"] is False and "attempts" not in outcome.values
    [released] = recorded(outcome)
    assert isinstance(released, SnapshotReleased) and released.invalidated
    assert "COW full" in released.reason


def test_a_cow_still_too_small_at_the_last_size_fails_the_job_with_snapshot_failed(
        tmp_path: Path) -> None:
    # Given a job at its last COW size (2 of FERRY_SNAPSHOT_COW_ATTEMPTS=2)
    work = work_on(QuietHost(), tmp_path)
    held = lease(phase="invalid", cow_attempt=1, release_reason="COW full")
    # When it fills up again
    outcome = work.run(held)
    # Then it fails after its release; the failure hook says snapshot.failed
    assert isinstance(outcome, Failed) and "still too small after 2 COW sizes" in str(
        outcome.error)
    assert [type(e) for e in recorded(outcome)] == [SnapshotReleased]
    uow = SimpleNamespace(outbox=Outbox())
    turned = work.fail(held, RuntimeError(str(outcome.error)), uow)  # type: ignore[arg-type]
    assert turned.values == {"phase": "failed", "admitted": False}
    [failed] = uow.outbox.events
    assert isinstance(failed, SnapshotFailed) and "still too small" in failed.reason


def test_a_release_the_host_refuses_is_retried_without_spending_an_attempt(
        tmp_path: Path) -> None:
    outcome = work_on(QuietHost(down=True), tmp_path).run(lease())
    assert isinstance(outcome, RetryIn)
    assert outcome.seconds == RELEASE_RETRY_SECONDS and not outcome.counts_as_attempt
    assert "release failed, retrying" in outcome.reason and outcome.record is None
