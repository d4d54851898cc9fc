"""A tiny service built only from shared/ pieces, to prove the backbone's guarantees.

It handles `test.echo` (record an effect, emit `test.echoed`) and `test.job` (record a
leased job that a worker runs for a while, then records its effect and emits
`test.job_done`). Its handlers and its job are written as every service's are: plain
functions holding only their decision, the runtime owning the lifecycle.
Run as a process: `python -m tests.support.echo --db URL`.
"""

from __future__ import annotations

import argparse
import logging
import signal
import threading
import time
from typing import Any, ClassVar, Literal

from sqlalchemy import Column, Engine, Float, Integer, MetaData, String, Table, insert, select

from shared.contracts import Event
from shared.db import make_engine
from shared.envelope import Envelope
from shared.errors import PermanentError, TransientError
from shared.inbox_outbox import UnitOfWork, Units, inbox_table
from shared.inbox_outbox import metadata as messaging
from shared.jobs import (
    DONE,
    FAILED,
    Done,
    JobWorker,
    Lease,
    Leases,
    Outcome,
    job_table,
    new_job_values,
)
from shared.retry import RetryPolicy
from shared.runtime import Context, Handler, Service, handler_name
from shared.settings import Settings
from shared.topology import QueueSpec


class Echo(Event):
    TYPE: ClassVar[str] = "test.echo"
    value: str
    fail: Literal["never", "transient", "permanent", "until_flag"] = "never"


class Echoed(Event):
    TYPE: ClassVar[str] = "test.echoed"
    value: str


class JobRequested(Event):
    TYPE: ClassVar[str] = "test.job"
    job_id: str
    seconds: float


class JobDone(Event):
    TYPE: ClassVar[str] = "test.job_done"
    job_id: str
    owner: str


metadata = MetaData()
effects = Table(
    "effects", metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("message_id", String(36), nullable=False),
    Column("value", String(200), nullable=False),
    Column("at", Float, nullable=False),
)
flags = Table("flags", metadata, Column("name", String(50), primary_key=True))
failures = Table(
    "failures", metadata,
    Column("message_id", String(36), primary_key=True),
    Column("error", String(500), nullable=False),
)
jobs = job_table("echo_jobs", metadata)


def echo(event: Echo, ctx: Context[None]) -> None:
    """Record the value as an effect and emit test.echoed — or fail as the event asks."""
    if event.fail == "transient":
        raise TransientError(f"echo {event.value}: broker of doom unreachable")
    if event.fail == "permanent":
        raise PermanentError(f"echo {event.value}: this can never work")
    if event.fail == "until_flag" and ctx.connection.execute(
        select(flags.c.name).where(flags.c.name == "heal")
    ).first() is None:
        raise RuntimeError(f"echo {event.value}: not healed yet")
    ctx.connection.execute(insert(effects).values(
        message_id=str(ctx.envelope.id), value=event.value, at=time.time()))
    ctx.emit(Echoed(value=event.value))


def record_failure(event: Any, ctx: Context[None], error: BaseException) -> None:
    """The bus gave up on a message: keep its error."""
    ctx.connection.execute(insert(failures).values(message_id=str(ctx.envelope.id),
                                                   error=str(error)[:500]))


def request_job(event: JobRequested, ctx: Context[None]) -> None:
    ctx.connection.execute(insert(jobs).values(new_job_values(
        event.job_id, ctx.migration_id, "sleep", {"seconds": event.seconds})))


def run_job(lease: Lease) -> Outcome:
    """Sleep for the job's seconds in steps (the "work"), then record the effect."""
    seconds = float(lease.job.payload.get("seconds", 0.0))
    steps = max(1, int(seconds / 0.1))
    for step in range(steps):
        time.sleep(seconds / steps)
        lease.check()
        lease.progress(bytes_done=step + 1, bytes_total=steps)

    def record(uow: UnitOfWork) -> None:
        uow.connection.execute(insert(effects).values(
            message_id=lease.job_id, value=f"job:{lease.job_id}", at=time.time()))
        uow.outbox.add(JobDone(job_id=lease.job_id, owner=lease.owner),
                       migration_id=lease.job.migration_id)

    return Done({"owner": lease.owner}, record=record)


HANDLERS: dict[str, Handler] = {Echo.TYPE: echo, JobRequested.TYPE: request_job}
ON_FAILURE = record_failure


def build(settings: Settings, db_url: str, queue: str = "echo") -> Service:
    engine = make_engine(db_url)
    messaging.create_all(engine)
    metadata.create_all(engine)
    units = Units(engine)
    worker = JobWorker(Leases(engine, jobs, settings.lease_seconds), run_job, units=units,
                       policy=RetryPolicy.from_settings(settings), name=f"{queue}-jobs",
                       poll_seconds=settings.job_poll_seconds)
    return Service("echo", settings, units, QueueSpec(queue, ("test.echo", "test.job")),
                   HANDLERS, on_failure=ON_FAILURE, workers=[worker])


def handled(engine: Engine, envelope: Envelope) -> bool:
    """True once the echo handler committed `envelope` (its inbox row is there)."""
    with engine.connect() as connection:
        return connection.execute(select(inbox_table.c.message_id).where(
            inbox_table.c.message_id == str(envelope.id),
            inbox_table.c.handler == handler_name(echo))).first() is not None


__all__ = ["DONE", "FAILED", "build", "effects", "failures", "flags", "handled", "jobs"]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--db", required=True)
    parser.add_argument("--queue", default="echo")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO)
    service = build(Settings(), args.db, args.queue)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    service.start()
    print("echo: started", flush=True)
    stop.wait()
    service.stop()


if __name__ == "__main__":
    main()
