"""The whole pipeline at scale: RabbitMQ + PostgreSQL, every service its own process, two
archivers for the datacenter — also with every service SIGKILLed once, each at a moment
the services' own state names (an archive mid-stream, a transfer mid-rsync, a first
handled event), in a seeded order, and restarted."""

from __future__ import annotations

import os
import random
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.e2e.observed import Probe, not_yet, pid_of
from tests.e2e.runs import Run, run_migration, small_site

SEED_VARIABLE = "FERRY_CHAOS_SEED"  # set it to replay a failed run's order


@pytest.fixture
def site(tmp_path: Path) -> Iterator[tuple[Path, str]]:
    with small_site(tmp_path / "site") as made:
        yield made


def archiver_named(run: Run, owner: str | None) -> str | None:
    """Which archiver process (archiver-1…) holds the lease `owner`, if one of ours."""
    if owner is None:
        return None
    pid = pid_of(owner)
    return next((name for name, process in run.pipeline.processes.items()
                 if name.startswith("archiver") and process.pid == pid), None)


def moments(run: Run) -> dict[str, tuple[str, Callable[[], str | None]]]:
    """For each service: the moment it is killed at, and a probe naming the process to
    kill once the moment has come (None before)."""
    db = run.databases

    def after_first(service: str) -> Callable[[], str | None]:
        return lambda: service if db.handled(service) > 0 else None

    return {
        "archiver": ("an archive running, its partial file holding bytes",
                     lambda: archiver_named(run, db.streaming_archive(run.staging))),
        "transfer": ("a transfer attempt mid-rsync",
                     lambda: "transfer" if db.transfer_mid_rsync() else None),
        "resolver": ("after its first handled event", after_first("resolver")),
        "snapshotter": ("after its first handled event", after_first("snapshotter")),
        "intake": ("after its first handled event", after_first("intake")),
    }


def kill_each_once(seed: int) -> Callable[[Run], None]:
    """SIGKILL each service once, in the order `seed` shuffles, each at its moment (see
    `moments`), restarting it at once. A moment the run went past before its turn (no
    archive left to stream) is written down as missed, and that service is killed anyway."""

    def chaos(run: Run) -> None:
        order = sorted(moments(run))
        random.Random(seed).shuffle(order)
        run.note(f"chaos seed {seed} ({SEED_VARIABLE}={seed} replays it): order {order}")
        for service in order:
            what, probe = moments(run)[service]
            name = _wait_for(probe, run, timeout=60)
            if name is None:
                name = service if service != "archiver" else "archiver-1"
                run.note(f"{service}: moment missed ({what}); killed {name} anyway")
            else:
                run.note(f"{service}: killed {name} at: {what}")
            run.pipeline.kill(name)
            run.pipeline.start(name)  # not waited for: the next moment may be near

    return chaos


def _wait_for(probe: Probe, run: Run, timeout: float) -> str | None:
    """Poll `probe` until it names a process, or the migration is past the moment."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = not_yet(probe)()
        if found:
            return str(found)
        if (not_yet(lambda: run.databases.transfers("done"))() or 0) >= 7:
            return None  # every archive transferred: nothing left to be in the middle of
        time.sleep(0.02)
    return None


def test_pipeline_on_rabbitmq_and_postgres_with_two_archivers(
    site: tuple[Path, str], rabbit_url: str, make_pg_database: Callable[[], str],
    tmp_path: Path,
) -> None:
    run_migration(site, rabbit_url, make_pg_database, tmp_path)


def test_pipeline_survives_each_service_killed_once(
    site: tuple[Path, str], rabbit_url: str, make_pg_database: Callable[[], str],
    tmp_path: Path,
) -> None:
    seed = int(os.environ.get(SEED_VARIABLE) or random.SystemRandom().randrange(10**6))
    run = run_migration(site, rabbit_url, make_pg_database, tmp_path,
                        disturb=kill_each_once(seed))
    killed = [note for note in run.notes if "killed" in note]
    assert len(killed) == 5, (seed, run.notes)
