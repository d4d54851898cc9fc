"""One migration of the small sample site through the pipeline (every service its own
process, RabbitMQ + PostgreSQL), disturbed as a test says, then checked whole: completed,
every archive at the destination equal to its source, one archive per source and one
transfer per archive, nothing half-done, nothing dead-lettered."""

from __future__ import annotations

import contextlib
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from ferry.demo_site import build_site, drop_database
from ferry.dlq import list_dead
from shared.settings import SERVICES
from shared.topology import FIXED_QUEUES
from tests.e2e.checks import assert_once, check_destination, jobs_of
from tests.e2e.harness import Pipeline, pipeline_env
from tests.e2e.observed import Databases

ARCHIVES = 7  # the small site's sources


@contextlib.contextmanager
def small_site(workdir: Path) -> Iterator[tuple[Path, str]]:
    """The small sample site under `workdir` with its MariaDB database: (workdir, database
    name); the database is dropped on leaving."""
    built, why = build_site(workdir, "small", "127.0.0.1:3306")
    assert why is None and built.database, f"the sample database could not be made: {why}"
    try:
        yield workdir, built.database
    finally:
        drop_database("127.0.0.1:3306", built.database)


@dataclass
class Run:
    """What a disturbance acts on and reads from: the pipeline, the databases read directly,
    the migration (once submitted), and the notes it leaves for a failure's message."""

    pipeline: Pipeline
    workdir: Path
    databases: Databases
    migration_id: str = ""
    notes: list[str] = field(default_factory=list)
    submitted: threading.Event = field(default_factory=threading.Event)

    @property
    def staging(self) -> Path:
        return self.workdir / "staging"

    def note(self, text: str) -> None:
        print(f"[run] {text}", flush=True)
        self.notes.append(text)


Disturb = Callable[[Run], None]
Start = Callable[[Run], None]


def start_everything(run: Run) -> None:
    run.pipeline.start_all()


def run_migration(site: tuple[Path, str], rabbit_url: str,
                  make_pg_database: Callable[[], str], tmp_path: Path, *,
                  disturb: Disturb | None = None, start: Start = start_everything,
                  service_broker_url: str | None = None,
                  service_database_url: Callable[[str], str] | None = None,
                  timeout: float = 420) -> Run:
    """Run the migration; `start` brings the services up (all at once by default; it may
    wait for the submission, `run.submitted`), `disturb` runs in a thread once the document
    is accepted. The services use `service_broker_url` and `service_database_url(url)`
    (a proxy) when given; the test's own reads go straight to the servers."""
    workdir, database = site
    urls = {service: make_pg_database() for service in SERVICES}
    seen = {s: service_database_url(u) if service_database_url else u for s, u in urls.items()}
    env = pipeline_env(workdir, workdir / "inventory.yaml", service_broker_url or rabbit_url,
                       seen)
    run = Run(Pipeline(env), workdir, Databases(urls))
    failures: list[str] = []

    def guarded(step: Callable[[Run], None]) -> Callable[[], None]:
        def body() -> None:
            try:
                step(run)
            except BaseException:  # noqa: BLE001 - reported in the main thread's assertion
                failures.append(traceback.format_exc())
        return body

    threads: list[threading.Thread] = []
    try:
        starter = threading.Thread(target=guarded(start), daemon=True)
        starter.start()
        threads.append(starter)
        run.pipeline.processes.get("intake") or _wait_for_intake(run, starter)
        run.pipeline.wait_for_api()
        with run.pipeline.client() as client:
            # When the document is POSTed to intake
            response = client.post("/migrations", content=(workdir / "migration.json")
                                   .read_bytes(), headers={"Content-Type": "application/json"})
            assert response.status_code == 202, response.text
            run.migration_id = response.json()["id"]
            run.submitted.set()
            if disturb is not None:
                threads.append(threading.Thread(target=guarded(disturb), daemon=True))
                threads[-1].start()
            # Then it completes
            deadline = time.monotonic() + timeout
            status = None
            while time.monotonic() < deadline and not failures:
                status = run.pipeline.status(client, run.migration_id) or status
                if status and status["status"] in {"completed", "failed"}:
                    break
                time.sleep(0.5)
            for thread in threads:
                thread.join(timeout=120)
            assert not failures, "\n".join([*failures, *run.notes])
            assert status and status["status"] == "completed", (
                status, run.notes, run.pipeline.tail())
        # And every archive arrived intact
        jobs = jobs_of(urls["intake"], run.migration_id)
        assert check_destination(workdir / "destination" / run.migration_id, jobs, database,
                                 tmp_path / "scratch") == ARCHIVES
        # And nothing ran twice, nothing is left half-done, nothing is dead
        assert_once(urls, ARCHIVES)
        staged = sorted(p.name for p in (workdir / "staging").rglob("*") if p.is_file())
        # each archive and its manifest
        assert len(staged) == 2 * ARCHIVES and not [n for n in staged if "partial" in n], staged
        for queue in [*FIXED_QUEUES, f"archiver.{run.pipeline.datacenter}",
                      f"transfer.{run.pipeline.datacenter}"]:
            assert list_dead(rabbit_url, queue) == [], (queue, run.notes)
        return run
    finally:
        run.submitted.set()  # a start step waiting for a submission that never came
        run.pipeline.stop_all()
        run.databases.close()


def _wait_for_intake(run: Run, starter: threading.Thread) -> None:
    deadline = time.monotonic() + 120
    while "intake" not in run.pipeline.processes:
        assert starter.is_alive() and time.monotonic() < deadline, "intake was never started"
        time.sleep(0.05)
