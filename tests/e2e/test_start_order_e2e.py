"""Services started in the worst order, every one its own process (RabbitMQ + PostgreSQL):
transfer started only after every archive is done, and a datacenter's archivers "an hour
late" (only once everything else ran and the migration waits for them). Every migration
completes, checked whole (tests/e2e/runs.py)."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

from shared.bus import connect
from tests.e2e.harness import READY
from tests.e2e.observed import not_yet
from tests.e2e.runs import ARCHIVES, Run, run_migration
from tests.e2e.test_scale_out import site  # noqa: F401 - the sample site fixture


def start(run: Run, *names: str) -> None:
    for name in names:
        run.pipeline.start(name)
    for name in names:
        run.pipeline.processes[name].wait_ready(READY)


def wait_until(run: Run, moment: Callable[[], object], what: str, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not not_yet(moment)():
        assert time.monotonic() < deadline, f"timed out waiting for {what}: {run.notes}"
        time.sleep(0.1)
    run.note(what)


def waiting_in(broker_url: str, queue: str) -> int:
    with connect(broker_url) as connection:
        channel = connection.channel()
        _, messages, _ = channel.queue_declare(queue, passive=True)
        channel.close()
    return int(messages)


def test_transfer_started_after_the_archives_are_done(
    site: tuple[Path, str], rabbit_url: str,  # noqa: F811
    make_pg_database: Callable[[], str], tmp_path: Path,
) -> None:
    def transfer_last(run: Run) -> None:
        # Given every service but transfer
        start(run, "intake", "resolver", "snapshotter", "archiver-1", "archiver-2")
        run.submitted.wait()
        # When the migration's archives are all done, and only then transfer starts
        wait_until(run, lambda: run.databases.archives_done(ARCHIVES), "every archive done")
        assert "transfer" not in run.pipeline.processes
        start(run, "transfer")

    # Then the migration completes (run_migration's checks)
    run_migration(site, rabbit_url, make_pg_database, tmp_path, start=transfer_last)


def test_a_datacenters_archivers_an_hour_late(
    site: tuple[Path, str], rabbit_url: str,  # noqa: F811
    make_pg_database: Callable[[], str], tmp_path: Path,
) -> None:
    def archivers_late(run: Run) -> None:
        # Given every service but the datacenter's archivers
        start(run, "intake", "resolver", "snapshotter", "transfer")
        run.submitted.wait()
        # When the migration waits for them: every request (archive.requested, and the
        # snapshot.ready of each local filesystem) is in their queue
        queue = f"archiver.{run.pipeline.datacenter}"
        wait_until(run, lambda: waiting_in(rabbit_url, queue) >= ARCHIVES,
                   f"{ARCHIVES} requests waiting in {queue}")
        assert not [n for n in run.pipeline.processes if n.startswith("archiver")]
        # And only then they start
        start(run, "archiver-1", "archiver-2")

    # Then the migration completes (run_migration's checks)
    run_migration(site, rabbit_url, make_pg_database, tmp_path, start=archivers_late)
