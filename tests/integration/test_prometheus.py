"""A real Prometheus (Debian's `prometheus`, started here on 127.0.0.1) scrapes every
service, each its own process on RabbitMQ + PostgreSQL, during a migration of the small
sample site; PromQL through its HTTP API then returns the number of archives and the bytes
the migration made, as the archiver's and transfer's tables hold them. And a service
started without a metrics port is a target Prometheus finds down, with no series."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import create_engine, func, select

from ferry.dlq import list_dead
from ferry.loopback_sshd import free_port
from services.archiver.tables import archive_jobs
from services.transfer.tables import transfers
from shared import metrics
from shared.runtime import Service
from shared.settings import SERVICES
from tests.e2e.harness import READY, pipeline_env
from tests.e2e.harness import SERVICES as PIPELINE
from tests.e2e.runs import ARCHIVES, Run, run_migration, small_site
from tests.integration.test_backbone import (  # noqa: F401 - `running` is the fixture
    echo_envelope,
    publish,
    running,
)
from tests.support.helpers import wait_for
from tests.support.processes import ChildProcess, stop_all

PROMETHEUS = "/usr/bin/prometheus"


class Prometheus:
    """`prometheus` on 127.0.0.1 at a free port, scraping `targets` ({job: host:port}) every
    second, its config and storage in a temporary directory; stopped by its PID."""

    def __init__(self, targets: dict[str, str]) -> None:
        assert shutil.which(PROMETHEUS), "prometheus is not installed (scripts/setup.sh test)"
        self.dir = Path(tempfile.mkdtemp(prefix="ferry-prometheus-"))
        self.port = free_port()
        config = {"global": {"scrape_interval": "1s", "scrape_timeout": "1s"},
                  "scrape_configs": [{"job_name": job, "static_configs": [{"targets": [at]}]}
                                     for job, at in targets.items()]}
        (self.dir / "prometheus.yml").write_text(json.dumps(config))  # JSON is YAML
        self.log = (self.dir / "prometheus.log").open("wb")
        self.process = subprocess.Popen(
            [PROMETHEUS, f"--config.file={self.dir / 'prometheus.yml'}",
             f"--storage.tsdb.path={self.dir / 'data'}",
             f"--web.listen-address=127.0.0.1:{self.port}"],
            stdin=subprocess.DEVNULL, stdout=self.log, stderr=subprocess.STDOUT)
        self.url = f"http://127.0.0.1:{self.port}"
        wait_for(self._ready, 30, "prometheus to be ready")

    def _ready(self) -> bool:
        assert self.process.poll() is None, self.tail()
        try:
            return httpx.get(f"{self.url}/-/ready", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    def query(self, expr: str) -> list[dict[str, Any]]:
        """The instant vector `expr` evaluates to now."""
        response = httpx.get(f"{self.url}/api/v1/query", params={"query": expr}, timeout=5)
        body = response.json()
        assert response.status_code == 200 and body["status"] == "success", body
        assert body["data"]["resultType"] == "vector", body
        return list(body["data"]["result"])

    def scalar(self, expr: str) -> float | None:
        result = self.query(expr)
        return float(result[0]["value"][1]) if result else None

    def up(self) -> dict[str, float]:
        """Each job's `up` once it was scraped at least once."""
        return {r["metric"]["job"]: float(r["value"][1]) for r in self.query("up")}

    def tail(self) -> str:
        return (self.dir / "prometheus.log").read_text(errors="replace")[-3000:]

    def stop(self) -> None:
        if self.process.poll() is None:
            os.kill(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.kill(self.process.pid, signal.SIGKILL)
                self.process.wait(timeout=10)
        self.log.close()
        shutil.rmtree(self.dir, ignore_errors=True)


@pytest.fixture
def site(tmp_path: Path) -> Iterator[tuple[Path, str]]:
    with small_site(tmp_path / "site") as made:
        yield made


def made_by(run: Run) -> dict[str, float]:
    """What the migration made, from the services' own tables: archives sealed and their
    bytes (archiver), bytes transferred and verified (transfer)."""
    engine = create_engine(run.databases.urls["archiver"])
    try:
        with engine.connect() as connection:
            archives, archived = connection.execute(
                select(func.count(), func.coalesce(func.sum(archive_jobs.c.compressed_bytes), 0))
                .where(archive_jobs.c.migration_id == run.migration_id,
                       archive_jobs.c.state == "done")).one()
    finally:
        engine.dispose()
    engine = create_engine(run.databases.urls["transfer"])
    try:
        with engine.connect() as connection:
            sent = connection.execute(
                select(func.coalesce(func.sum(transfers.c.bytes_total), 0))
                .where(transfers.c.migration_id == run.migration_id,
                       transfers.c.state == "done")).scalar_one()
    finally:
        engine.dispose()
    return {"archives": float(archives), "archived_bytes": float(archived),
            "transferred_bytes": float(sent)}


def json_lines(log: str) -> list[dict[str, Any]]:
    """The JSON lines of a process's log (its stdout's lines are not JSON)."""
    return [json.loads(line) for line in log.splitlines() if line.startswith("{")]


QUERIES = {
    "archives": "sum(ferry_archives_total)",
    "archived_bytes": "sum(ferry_archived_bytes_total)",
    "transferred_bytes": "sum(ferry_transferred_bytes_total)",
}


def test_prometheus_scrapes_every_service_and_counts_the_migrations_archives(
    site: tuple[Path, str], rabbit_url: str, make_pg_database: Callable[[], str],
    tmp_path: Path,
) -> None:
    ports = {name: free_port() for name in [*PIPELINE, "archiver-1", "archiver-2"]
             if name != "intake"}
    scraped: dict[str, Any] = {}
    holder: list[Prometheus] = []

    def start(run: Run) -> None:
        # Given every service its own process, each with its own metrics port (intake: its
        # API's /metrics), and Prometheus scraping them all every second
        targets = {name: f"127.0.0.1:{port}" for name, port in ports.items()}
        targets["intake"] = run.pipeline.env["FERRY_INTAKE_BIND"]
        holder.append(Prometheus(targets))
        # (and logging JSON lines)
        for name in [*PIPELINE, "archiver-1", "archiver-2"]:
            run.pipeline.spawn(name, {"FERRY_LOG_FORMAT": "json", **({} if name == "intake" else {
                "FERRY_METRICS_PORT": str(ports[name])})})
        for process in run.pipeline.processes.values():
            process.wait_ready(READY)
        run.pipeline.wait_for_api()

    def watch(run: Run) -> None:
        prometheus = holder[0]
        # While the migration runs, every target is up
        everyone = {name: 1.0 for name in [*ports, "intake"]}
        def all_up() -> bool:  # what was seen is what is asserted (a later look may differ)
            scraped["up"] = prometheus.up()
            return bool(scraped["up"] == everyone)

        try:  # started before the services: their first scrapes may have found them down,
            # and a scrape that outlasts its 1 s timeout on a loaded machine is down once
            wait_for(all_up, 60, "every target up")
        except AssertionError:
            pass  # the assertion below says which
        with httpx.Client(base_url=run.pipeline.url, timeout=10, headers={
                "Authorization": f"Bearer {run.pipeline.env['FERRY_API_TOKEN']}"}) as client:
            wait_for(lambda: (run.pipeline.status(client, run.migration_id) or {}).get(
                "status") == "completed", 300, "the migration to complete")
        # Once it completed: Prometheus's numbers become the tables' (the next scrape)
        expected = made_by(run)
        scraped["expected"] = expected

        def caught_up() -> bool:
            scraped["got"] = {key: prometheus.scalar(expr) for key, expr in QUERIES.items()}
            return bool(scraped["got"] == expected)

        try:
            wait_for(caught_up, 60, "prometheus to scrape the final counts")
        except AssertionError:
            pass  # the assertion below says what differs
        scraped["backlog"] = prometheus.scalar("max(ferry_outbox_backlog)")
        scraped["dead"] = prometheus.scalar("sum(ferry_dead_letters_total)")
        scraped["age"] = prometheus.scalar(
            'sum(ferry_message_age_seconds_count{service="transfer"})')
        scraped["done_jobs"] = prometheus.scalar(
            # one table, reported by both archivers: max per series, then the sum of kinds
            'sum(max by (datacenter, kind) (ferry_jobs{service="archiver",state="done"}))')

    started = time.monotonic()
    try:
        run = run_migration(site, rabbit_url, make_pg_database, tmp_path, start=start,
                            disturb=watch)
    finally:
        for prometheus in holder:
            prometheus.stop()
    assert holder, "prometheus was never started"
    # Then every service was scraped, up
    assert scraped["up"] == {name: 1.0 for name in [*ports, "intake"]}, scraped
    # And PromQL counts the migration's archives and bytes as the services' tables do
    assert scraped["expected"]["archives"] == ARCHIVES, scraped
    assert scraped["expected"]["archived_bytes"] > 0, scraped
    assert scraped["got"] == scraped["expected"], scraped
    assert scraped["done_jobs"] == ARCHIVES, scraped
    # And the relay caught up, nothing was dead-lettered, messages were aged when handled
    assert scraped["backlog"] == 0 and scraped["dead"] in (None, 0.0), scraped
    assert scraped["age"] and scraped["age"] > 0, scraped
    # And the archivers' JSON log lines name the migration, the job and the datacenter
    sealed = [line for name in ("archiver-1", "archiver-2")
              for line in json_lines(run.pipeline.processes[name].log())
              if line["message"].startswith("archive ")
              and " sealed: " in line["message"]]
    assert len(sealed) == ARCHIVES, sealed
    for line in sealed:
        assert line["migration_id"] == run.migration_id and line["datacenter"] == "ey04", line
        assert line["message"].startswith(f"archive {line['job_id']} sealed"), line
    print(f"[prometheus] {scraped}; {time.monotonic() - started:.1f}s")


def test_a_service_without_a_metrics_port_is_a_target_down_with_no_series(
    rabbit_url: str, make_pg_database: Callable[[], str], tmp_path: Path,
) -> None:
    env = pipeline_env(tmp_path, tmp_path / "inventory.yaml", rabbit_url,
                       {service: make_pg_database() for service in SERVICES})
    off, on = free_port(), free_port()
    prometheus = Prometheus({"off": f"127.0.0.1:{off}", "on": f"127.0.0.1:{on}"})
    started: list[ChildProcess] = []
    try:
        # Given two snapshotters: one with no metrics port (the default), one with its own
        started.append(ChildProcess.ferry("run", "snapshotter", env=env, ready=READY))
        started.append(ChildProcess.ferry("run", "snapshotter", ready=READY, env={
            **env, "FERRY_SNAPSHOTTER_METRICS_PORT": str(on)}))
        # Then Prometheus finds the one without down, and has no series of it
        wait_for(lambda: set(prometheus.up()) == {"off", "on"}, 30, "a first scrape")
        assert prometheus.up() == {"off": 0.0, "on": 1.0}, prometheus.tail()
        assert prometheus.query('ferry_outbox_backlog{job="off"}') == []
        # And the one with a port is scraped
        wait_for(lambda: prometheus.query('ferry_outbox_backlog{job="on"}'), 10,
                 "the snapshotter's outbox backlog")
    finally:
        stop_all(started)
        prometheus.stop()


def test_retries_and_dead_letters_are_counted_by_queue_and_reason(
        running: Service) -> None:  # noqa: F811 - the imported fixture
    """In-process, on each backbone (test_backbone's `running` echo service, 3 attempts)."""
    queue = running.queue.name
    url = running.settings.broker_url

    def sample(name: str, **labels: str) -> float:
        return metrics.REGISTRY.get_sample_value(name, labels) or 0.0

    errors = sample("ferry_handler_errors_total", service="echo", type="test.echo")
    # When one message fails transiently every time, and one fails for good
    publish(url, echo_envelope("flaky", fail="transient"))
    publish(url, echo_envelope("doomed", fail="permanent"))
    # (counted just after the dead letter is published: wait for the counts themselves)
    wait_for(lambda: sample("ferry_dead_letters_total", queue=queue, reason="attempts")
             + sample("ferry_dead_letters_total", queue=queue, reason="permanent") == 2,
             what="both dead letters counted")
    assert len(list_dead(url, queue)) == 2
    # Then the flaky one was retried twice and dead-lettered after its attempts, the doomed
    # one dead-lettered at once; every failed handler call was counted
    assert sample("ferry_message_retries_total", queue=queue) == 2
    assert sample("ferry_dead_letters_total", queue=queue, reason="attempts") == 1
    assert sample("ferry_dead_letters_total", queue=queue, reason="permanent") == 1
    assert sample("ferry_handler_errors_total", service="echo", type="test.echo") == errors + 4
