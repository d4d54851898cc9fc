"""Log lines for the operator (shared/logs.py): text by default, JSON lines with
FERRY_LOG_FORMAT=json, carrying the migration id, the job id and the datacenter that the
runtime and the job worker set while they deliver a message or run a job."""

from __future__ import annotations

import io
import json
import logging
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any, ClassVar

import pytest
from pydantic import ValidationError
from sqlalchemy import Column, Engine, MetaData, String, insert

from shared import logs
from shared.contracts import Event
from shared.db import make_engine
from shared.envelope import Envelope
from shared.inbox_outbox import Units
from shared.inbox_outbox import metadata as messaging
from shared.jobs import Done, JobWorker, Lease, Leases, job_table, new_job_values
from shared.retry import RetryPolicy
from shared.runtime import Context, deliver
from shared.settings import Settings

metadata = MetaData()
jobs = job_table("log_jobs", metadata, Column("datacenter", String(32), nullable=False))
log = logging.getLogger("tests.logs")


class Noted(Event):
    TYPE: ClassVar[str] = "test.noted"
    text: str


@pytest.fixture
def captured() -> Iterator[tuple[io.StringIO, logging.Handler]]:
    """A handler on the root logger writing into a buffer; its formatter set by the test."""
    buffer = io.StringIO()
    handler = logging.StreamHandler(buffer)
    root = logging.getLogger()
    root.addHandler(handler)
    old = root.level
    root.setLevel(logging.INFO)
    yield buffer, handler
    root.removeHandler(handler)
    root.setLevel(old)


@pytest.fixture
def engine(tmp_path: Path) -> Iterator[Engine]:
    made = make_engine(f"sqlite:///{tmp_path}/logs.sqlite3")
    messaging.create_all(made)
    metadata.create_all(made)
    yield made
    made.dispose()


def lines(buffer: io.StringIO) -> list[dict[str, Any]]:
    text = buffer.getvalue()
    assert text.endswith("\n")
    return [json.loads(line) for line in text.splitlines()]  # each line is JSON on its own


def test_json_lines_carry_the_context_fields_that_are_set(captured: Any) -> None:
    buffer, handler = captured
    handler.setFormatter(logs.formatter("json"))
    # Given a migration, a job and a datacenter in the log context
    with logs.context(migration_id="mig-1", job_id="arch-7", datacenter="ey04"):
        log.info("archive %s sealed", "a-1")
        with logs.context(job_id="arch-8"):  # nested: the inner value, then the outer again
            log.warning("two\nlines")
        log.info("back")
    log.info("outside")
    # Then every record is one line of JSON with the fields known at that moment
    first, nested, back, outside = lines(buffer)
    assert (first["message"], first["level"], first["logger"]) == (
        "archive a-1 sealed", "INFO", "tests.logs")
    assert {k: first[k] for k in logs.FIELDS} == {
        "migration_id": "mig-1", "job_id": "arch-7", "datacenter": "ey04"}
    assert nested["job_id"] == "arch-8" and nested["message"] == "two\nlines"
    assert back["job_id"] == "arch-7"
    assert not set(logs.FIELDS) & set(outside), outside
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}\+00:00", first["time"])


def test_a_traceback_stays_inside_its_one_json_line(captured: Any) -> None:
    buffer, handler = captured
    handler.setFormatter(logs.formatter("json"))
    try:
        raise RuntimeError("disk on fire")
    except RuntimeError:
        log.exception("archive failed")
    (line,) = lines(buffer)
    assert "RuntimeError: disk on fire" in line["exception"] and "Traceback" in line["exception"]


def test_text_format_is_the_one_ferry_always_had(captured: Any) -> None:
    buffer, handler = captured
    handler.setFormatter(logs.formatter("text"))
    with logs.context(migration_id="mig-1"):
        log.info("archive %s sealed", "a-1")
    assert re.fullmatch(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} INFO archive a-1 sealed\n",
                        buffer.getvalue())
    assert Settings().log_format == "text"


def test_an_unknown_format_or_field_is_refused_by_name() -> None:
    with pytest.raises(ValueError, match="FERRY_LOG_FORMAT 'xml' is not one of text, json"):
        logs.formatter("xml")
    with pytest.raises(ValidationError, match="log_format"):
        Settings(log_format="xml")
    with pytest.raises(ValueError, match="log context has no field customer"):
        with logs.context(customer="acme"):
            pass


def test_configure_replaces_the_root_handlers_with_one_in_the_format() -> None:
    root = logging.getLogger()
    kept = list(root.handlers), root.level
    try:
        logs.configure("json", logging.WARNING)
        assert len(root.handlers) == 1 and root.level == logging.WARNING
        assert isinstance(root.handlers[0].formatter, logs.JsonFormatter)
    finally:
        for handler in list(root.handlers):
            root.removeHandler(handler)
        for handler in kept[0]:
            root.addHandler(handler)
        root.setLevel(kept[1])


def test_a_delivered_message_logs_with_its_migration_id(captured: Any, engine: Engine) -> None:
    buffer, handler = captured
    handler.setFormatter(logs.formatter("json"))

    def noted(event: Noted, ctx: Context[Any]) -> None:
        log.info("noted %s", event.text)

    # When the runtime delivers a message of migration mig-9
    envelope = Envelope.wrap(Noted(text="hi"), migration_id="mig-9")
    assert deliver(noted, envelope.event(), envelope, Units(engine), service="test")
    # Then the handler's line carries it, and nothing is left set after
    (line,) = lines(buffer)
    assert line["migration_id"] == "mig-9" and "job_id" not in line
    assert logs.current() == {}


def test_a_running_job_logs_with_its_job_id_migration_and_datacenter(
    captured: Any, engine: Engine,
) -> None:
    buffer, handler = captured
    handler.setFormatter(logs.formatter("json"))
    with engine.begin() as connection:
        connection.execute(insert(jobs).values(
            new_job_values("arch-1", "mig-3", "local_fs", {}, datacenter="ey04")))

    def work(lease: Lease) -> Done:
        log.info("archiving %s", lease.job_id)
        return Done()

    units = Units(engine)
    worker = JobWorker(Leases(engine, jobs, 30), work, units=units,
                       policy=RetryPolicy((1.0,), 2), name="log-jobs")
    # When the job worker runs the job
    assert worker.run_one("worker-a")
    # Then the job's line names the job, its migration and its datacenter
    line = next(each for each in lines(buffer) if each["message"] == "archiving arch-1")
    assert {k: line[k] for k in logs.FIELDS} == {
        "migration_id": "mig-3", "job_id": "arch-1", "datacenter": "ey04"}
    assert logs.current() == {}
