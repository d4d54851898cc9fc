"""The metrics every service exposes (shared/metrics.py): what each one counts, read back
from the process's one registry, and where they are served (a port of their own, intake's
/metrics). The HTTP scrape by a real Prometheus is tests/integration/test_prometheus.py."""

from __future__ import annotations

import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, ClassVar

import httpx
import pytest
from fastapi.testclient import TestClient
from sqlalchemy import Column, Engine, MetaData, String, event, insert

from ferry.loopback_sshd import free_port
from services.intake.api import create_app
from shared import metrics
from shared.contracts import Event
from shared.db import make_engine
from shared.envelope import Envelope
from shared.errors import ConfigurationError, PermanentError
from shared.inbox_outbox import Units
from shared.inbox_outbox import metadata as messaging
from shared.jobs import Done, Failed, JobWorker, Lease, Leases, RetryIn, job_table, new_job_values
from shared.retry import RetryPolicy
from shared.runtime import Context, deliver
from shared.settings import Settings

metadata = MetaData()
jobs = job_table("metric_jobs", metadata, Column("datacenter", String(32), nullable=False))


class Pinged(Event):
    TYPE: ClassVar[str] = "test.pinged"


def value(name: str, **labels: str) -> float:
    found = metrics.REGISTRY.get_sample_value(name, labels)
    return 0.0 if found is None else found


@pytest.fixture
def engine(tmp_path: Path) -> Iterator[Engine]:
    made = make_engine(f"sqlite:///{tmp_path}/metrics.sqlite3")
    messaging.create_all(made)
    metadata.create_all(made)
    yield made
    made.dispose()


def add_job(engine: Engine, job_id: str, kind: str, state: str = "pending",
            datacenter: str = "ey04") -> None:
    with engine.begin() as connection:
        connection.execute(insert(jobs).values(
            new_job_values(job_id, f"mig-{job_id}", kind, {}, datacenter=datacenter,
                           state=state)))


def test_jobs_by_kind_state_and_datacenter_are_counted_when_scraped(engine: Engine) -> None:
    # Given a watched job table holding jobs of two kinds, states and datacenters
    add_job(engine, "a", "local_fs")
    add_job(engine, "b", "local_fs")
    add_job(engine, "c", "database", state="done", datacenter="ey05")
    metrics.TABLES.watch("unit", "unit-archiver", engine, [jobs])
    try:
        # Then a scrape counts them, as they are now
        assert value("ferry_jobs", service="unit-archiver", datacenter="ey04", kind="local_fs",
                     state="pending") == 2
        assert value("ferry_jobs", service="unit-archiver", datacenter="ey05", kind="database",
                     state="done") == 1
        add_job(engine, "d", "database", state="done", datacenter="ey05")
        assert value("ferry_jobs", service="unit-archiver", datacenter="ey05", kind="database",
                     state="done") == 2
        # And the outbox rows not yet published
        units = Units(engine)
        with units() as uow:
            uow.outbox.add(Pinged(), migration_id="mig-a")
            uow.outbox.add(Pinged(), migration_id="mig-a")
            uow.commit()
        assert value("ferry_outbox_backlog", service="unit-archiver") == 2
    finally:
        metrics.TABLES.forget("unit")
    # And a service that stopped is no longer reported
    assert metrics.REGISTRY.get_sample_value("ferry_outbox_backlog",
                                             {"service": "unit-archiver"}) is None


def test_a_database_that_does_not_answer_leaves_only_its_service_out(
    engine: Engine, tmp_path: Path,
) -> None:
    add_job(engine, "a", "local_fs")
    gone = make_engine(f"sqlite:///{tmp_path}/missing/none.sqlite3")  # no such directory
    metrics.TABLES.watch("up", "unit-up", engine, [jobs])
    metrics.TABLES.watch("down", "unit-down", gone, [jobs])
    try:
        assert value("ferry_outbox_backlog", service="unit-up") == 0
        assert metrics.REGISTRY.get_sample_value("ferry_outbox_backlog",
                                                 {"service": "unit-down"}) is None
    finally:
        metrics.TABLES.forget("up")
        metrics.TABLES.forget("down")


def test_two_services_of_one_process_on_one_database_are_counted_once_per_scrape(
    engine: Engine, tmp_path: Path,
) -> None:
    # Given two archivers of one process (two datacenters), each with its own engine on the
    # same database, and a third service on a database of its own
    add_job(engine, "a", "local_fs", datacenter="ey04")
    add_job(engine, "b", "local_fs", datacenter="ey05")
    twin = make_engine(str(engine.url))
    other = make_engine(f"sqlite:///{tmp_path}/other.sqlite3")
    messaging.create_all(other)
    metadata.create_all(other)
    statements: list[str] = []
    for each in (engine, twin, other):
        event.listen(each, "before_cursor_execute",
                     lambda *args: statements.append(args[2]) if args[2].startswith("SELECT")
                     else None)
    metrics.TABLES.watch("dc-a", "unit-twins", engine, [jobs])
    metrics.TABLES.watch("dc-b", "unit-twins", twin, [jobs])
    metrics.TABLES.watch("own", "unit-own", other, [jobs])
    try:
        list(metrics.TABLES.collect())
        # Then each database is asked once: its job table and its outbox
        assert len(statements) == 4, statements
        # And both datacenters' jobs are still there
        assert value("ferry_jobs", service="unit-twins", datacenter="ey05", kind="local_fs",
                     state="pending") == 1
    finally:
        for key in ("dc-a", "dc-b", "own"):
            metrics.TABLES.forget(key)
        twin.dispose()
        other.dispose()


def test_a_handled_message_is_counted_with_its_age_from_the_envelope(engine: Engine) -> None:
    labels = {"service": "unit-age", "type": Pinged.TYPE}
    before = value("ferry_message_age_seconds_sum", **labels)
    # Given a message sent 90 s ago
    envelope = Envelope.wrap(Pinged(), migration_id="mig-old").model_copy(
        update={"occurred_at": datetime.now(UTC) - timedelta(seconds=90)})

    def pinged(event: Pinged, ctx: Context[Any]) -> None:
        pass

    # When it is delivered, and delivered again (a duplicate)
    assert deliver(pinged, envelope.event(), envelope, Units(engine), service="unit-age")
    assert not deliver(pinged, envelope.event(), envelope, Units(engine), service="unit-age")
    # Then it is handled once, 90 s old (in the 300 s bucket, not the 60 s one)
    assert value("ferry_messages_handled_total", **labels) == 1
    assert value("ferry_message_age_seconds_count", **labels) == 1
    assert 90 <= value("ferry_message_age_seconds_sum", **labels) - before < 100
    assert value("ferry_message_age_seconds_bucket", le="60.0", **labels) == 0
    assert value("ferry_message_age_seconds_bucket", le="300.0", **labels) == 1


def test_job_retries_failures_and_the_done_hook_follow_the_committed_outcome(
    engine: Engine,
) -> None:
    done: list[str] = []
    leases = Leases(engine, jobs, 30)
    worker = JobWorker(leases, lambda lease: Done(), units=Units(engine),
                       policy=RetryPolicy((1.0,), 3), name="unit-jobs",
                       on_done=lambda lease, outcome: done.append(lease.job_id))
    worker.service = "unit-worker"
    labels = {"service": "unit-worker", "datacenter": "ey04", "kind": "local_fs"}
    for job_id in ("r", "w", "f", "d"):
        add_job(engine, job_id, "local_fs")

    def settle(outcome: Any) -> None:
        row = leases.claim("owner")
        assert row is not None
        worker.settle(Lease(leases, row, "owner", worker.units), outcome)

    settle(RetryIn(60, "link down"))  # a failed attempt: a retry
    settle(RetryIn(60, "staging full", counts_as_attempt=False))  # a wait: no retry
    settle(Failed(PermanentError("no such source")))
    settle(Done())
    assert value("ferry_job_retries_total", **labels) == 1
    assert value("ferry_job_failures_total", **labels) == 1
    assert done == ["d"]


def test_archives_and_transfers_count_bytes_and_durations() -> None:
    labels = {"service": "archiver", "datacenter": "unit-dc", "kind": "database"}
    metrics.observe_archive("archiver", "unit-dc", "database", compressed_bytes=1000,
                            raw_bytes=5000, seconds=42.0)
    metrics.observe_archive("archiver", "unit-dc", "database", compressed_bytes=24,
                            raw_bytes=100, seconds=3 * 3600.0)
    assert value("ferry_archives_total", **labels) == 2
    assert value("ferry_archived_bytes_total", **labels) == 1024
    assert value("ferry_archived_raw_bytes_total", **labels) == 5100
    assert value("ferry_archive_duration_seconds_bucket", le="60.0", **labels) == 1
    assert value("ferry_archive_duration_seconds_bucket", le="14400.0", **labels) == 2
    metrics.observe_transfer("transfer", "unit-dc", "database", size=1024, seconds=7.5)
    tlabels = {**labels, "service": "transfer"}
    assert value("ferry_transfers_total", **tlabels) == 1
    assert value("ferry_transferred_bytes_total", **tlabels) == 1024
    assert value("ferry_transfer_duration_seconds_sum", **tlabels) == 7.5


def test_no_label_carries_a_migration_or_job_id(engine: Engine) -> None:
    # After everything above ran in this process (and this once more)
    add_job(engine, "job-xyz", "local_fs")
    metrics.TABLES.watch("ids", "unit-ids", engine, [jobs])
    try:
        labels = {v for family in metrics.REGISTRY.collect() for sample in family.samples
                  for v in sample.labels.values()}
    finally:
        metrics.TABLES.forget("ids")
    assert not [v for v in labels if v.startswith("mig-") or "xyz" in v], labels


def test_the_metrics_port_of_a_process() -> None:
    settings = Settings(metrics_port=9400, archiver_metrics_port=9401)
    assert settings.metrics_port_of(["archiver"]) == 9401  # its own, running alone
    assert settings.metrics_port_of(["resolver"]) == 9400
    assert settings.metrics_port_of(["intake", "archiver"]) == 9400  # `ferry run all`: one
    assert Settings().metrics_port_of(["archiver"]) is None  # off unless asked for
    assert Settings(metrics_port=0).metrics_port_of(["archiver"]) is None


def test_serve_answers_scrapes_and_a_taken_port_is_named() -> None:
    assert metrics.serve(Settings(), ["resolver"]) is None
    port = free_port()
    stop = metrics.serve(Settings(metrics_port=port), ["resolver"])
    assert stop is not None
    try:
        response = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=5)
        assert response.status_code == 200 and "ferry_archives_total" in response.text
        with pytest.raises(ConfigurationError, match=f"resolver cannot listen on "
                                                     f"127.0.0.1:{port}"):
            metrics.serve(Settings(metrics_port=port), ["resolver"])
    finally:
        stop()
    with pytest.raises(httpx.ConnectError):  # stopped: nothing listens there any more
        httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=5)


def test_intake_serves_metrics_without_the_token_unless_told(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path}/intake.sqlite3"
    open_app = create_app(Settings(intake_database_url=url, api_token="t0ken"))
    with TestClient(open_app) as client:
        response = client.get("/metrics")
        assert response.status_code == 200, response.text
        assert response.headers["content-type"].startswith("text/plain")
        assert "ferry_messages_handled_total" in response.text
        assert client.get("/migrations").status_code == 401  # the API still needs it
        assert "/metrics" not in client.get("/openapi.json").json()["paths"]
    guarded = create_app(Settings(intake_database_url=url, api_token="t0ken",
                                  metrics_require_token=True))
    with TestClient(guarded) as client:
        assert client.get("/metrics").status_code == 401
        assert client.get("/metrics", headers={"Authorization": "Bearer t0ken"}
                          ).status_code == 200


def test_a_scrape_is_quick_enough_for_a_one_second_interval(engine: Engine) -> None:
    for index in range(200):
        add_job(engine, f"j{index}", ("local_fs", "database")[index % 2])
    metrics.TABLES.watch("speed", "unit-speed", engine, [jobs])
    try:
        started = time.monotonic()
        for _ in range(10):
            list(metrics.REGISTRY.collect())
        assert (time.monotonic() - started) / 10 < 0.1
    finally:
        metrics.TABLES.forget("speed")
