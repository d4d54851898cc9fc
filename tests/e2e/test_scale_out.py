"""The whole pipeline at scale: RabbitMQ + PostgreSQL, every service its own process, two
archivers for the datacenter — also with every service SIGKILLed once and restarted."""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from sqlalchemy import create_engine, func, select

from ferry.demo_site import build_site, drop_database
from ferry.dlq import list_dead
from services.archiver.tables import archive_jobs
from services.transfer.tables import transfers
from shared.settings import SERVICES
from shared.topology import FIXED_QUEUES
from tests.e2e.checks import check_destination, jobs_of
from tests.e2e.harness import Pipeline, pipeline_env


@pytest.fixture
def site(tmp_path: Path) -> Iterator[tuple[Path, str]]:
    workdir = tmp_path / "site"
    built, why = build_site(workdir, "small", "127.0.0.1:3306")
    assert why is None and built.database, f"the sample database could not be made: {why}"
    yield workdir, built.database
    drop_database("127.0.0.1:3306", built.database)


def run_migration(site: tuple[Path, str], rabbit_url: str,
                  make_pg_database: Callable[[], str], tmp_path: Path,
                  chaos: bool) -> None:
    workdir, database = site
    urls = {service: make_pg_database() for service in SERVICES}
    pipeline = Pipeline(pipeline_env(workdir, workdir / "inventory.yaml", rabbit_url, urls))
    pipeline.start_all()
    killed: list[str] = []
    try:
        with pipeline.client() as client:
            # When the document is POSTed to intake
            response = client.post("/migrations", content=(workdir / "migration.json")
                                   .read_bytes(), headers={"Content-Type": "application/json"})
            assert response.status_code == 202, response.text
            migration_id = response.json()["id"]
            if chaos:
                chaos_thread = threading.Thread(target=_kill_each_once,
                                                args=(pipeline, killed), daemon=True)
                chaos_thread.start()
            # Then it completes
            deadline = time.monotonic() + 420
            status = None
            while time.monotonic() < deadline:
                status = pipeline.status(client, migration_id) or status
                if status and status["status"] in {"completed", "failed"}:
                    break
                time.sleep(0.5)
            if chaos:
                chaos_thread.join(timeout=60)
            assert status and status["status"] == "completed", (status, pipeline.tail())
        # And every archive arrived intact
        jobs = jobs_of(urls["intake"], migration_id)
        assert check_destination(workdir / "destination" / migration_id, jobs, database,
                                 tmp_path / "scratch") == 7
        # And nothing ran twice, nothing is left half-done, nothing is dead
        _assert_once(urls)
        staged = sorted(p.name for p in (workdir / "staging").rglob("*") if p.is_file())
        assert len(staged) == 7 and not [n for n in staged if "partial" in n], staged
        for queue in [*FIXED_QUEUES, f"archiver.{pipeline.datacenter}"]:
            assert list_dead(rabbit_url, queue) == [], queue
        if chaos:
            assert len(killed) == 5, killed
    finally:
        pipeline.stop_all()


def _kill_each_once(pipeline: Pipeline, killed: list[str]) -> None:
    """SIGKILL each service once at a random moment of the run, restarting it at once."""
    rng = random.Random()
    names = ["intake", "resolver", "snapshotter", "transfer", rng.choice(["archiver-1",
                                                                          "archiver-2"])]
    rng.shuffle(names)
    for name in names:
        time.sleep(rng.uniform(0.2, 1.0))  # the small run lasts a few seconds: land inside it
        pipeline.kill(name)
        killed.append(name)
        pipeline.start(name)
        if name == "intake":
            pipeline.wait_for_api()


def _assert_once(urls: dict[str, str]) -> None:
    """One archive job per source and one transfer per archive, each done once."""
    archiver = create_engine(urls["archiver"])
    with archiver.connect() as connection:
        archives = connection.execute(
            select(archive_jobs.c.reuse_key, func.count(), func.min(archive_jobs.c.state))
            .group_by(archive_jobs.c.reuse_key)).all()
    archiver.dispose()
    assert len(archives) == 7 and all(n == 1 and state == "done" for _, n, state in archives), (
        archives)
    transfer = create_engine(urls["transfer"])
    with transfer.connect() as connection:
        sent = connection.execute(
            select(transfers.c.archive_id, func.count(), func.min(transfers.c.state))
            .group_by(transfers.c.archive_id)).all()
    transfer.dispose()
    assert len(sent) == 7 and all(n == 1 and state == "done" for _, n, state in sent), sent


def test_pipeline_on_rabbitmq_and_postgres_with_two_archivers(
    site: tuple[Path, str], rabbit_url: str, make_pg_database: Callable[[], str],
    tmp_path: Path,
) -> None:
    run_migration(site, rabbit_url, make_pg_database, tmp_path, chaos=False)


def test_pipeline_survives_each_service_killed_once(
    site: tuple[Path, str], rabbit_url: str, make_pg_database: Callable[[], str],
    tmp_path: Path,
) -> None:
    run_migration(site, rabbit_url, make_pg_database, tmp_path, chaos=True)
