"""A tiny service built only from shared/ pieces, to prove the backbone's guarantees.

It handles `test.echo` (record an effect, emit `test.echoed`) and `test.job` (record a
leased job that a worker runs for a while, then records its effect and emits
`test.job_done`). Run as a process: `python -m tests.support.echo --db URL`.
"""

from __future__ import annotations

import argparse
import logging
import signal
import threading
import time
from typing import Any, ClassVar, Literal

from sqlalchemy import Column, Float, Integer, MetaData, String, Table, insert, select

from shared.contracts import Event
from shared.db import make_engine
from shared.envelope import Envelope
from shared.errors import PermanentError, TransientError
from shared.inbox_outbox import UnitOfWork
from shared.inbox_outbox import metadata as messaging
from shared.jobs import DONE, FAILED, JobWorker, Lease, Leases, job_table, new_job_values
from shared.runtime import Service
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


def echo(event: Echo, envelope: Envelope, *, uow: UnitOfWork) -> None:
    with uow:
        if not uow.inbox.claim(envelope.id, "echo"):
            return
        if event.fail == "transient":
            raise TransientError(f"echo {event.value}: broker of doom unreachable")
        if event.fail == "permanent":
            raise PermanentError(f"echo {event.value}: this can never work")
        if event.fail == "until_flag" and uow.connection.execute(
            select(flags.c.name).where(flags.c.name == "heal")
        ).first() is None:
            raise RuntimeError(f"echo {event.value}: not healed yet")
        uow.connection.execute(insert(effects).values(
            message_id=str(envelope.id), value=event.value, at=time.time()))
        uow.outbox.add(Echoed(value=event.value), migration_id=envelope.migration_id,
                       cause=envelope)
        uow.commit()


def record_failure(event: Any, envelope: Envelope, error: BaseException, *,
                   uow: UnitOfWork) -> None:
    with uow:
        if not uow.inbox.claim(envelope.id, "record_failure"):
            return
        uow.connection.execute(insert(failures).values(message_id=str(envelope.id),
                                                       error=str(error)[:500]))
        uow.commit()


def request_job(event: JobRequested, envelope: Envelope, *, uow: UnitOfWork) -> None:
    with uow:
        if not uow.inbox.claim(envelope.id, "request_job"):
            return
        uow.connection.execute(insert(jobs).values(new_job_values(
            event.job_id, envelope.migration_id, "sleep", {"seconds": event.seconds})))
        uow.commit()


def run_job(lease: Lease, engine: Any) -> None:
    seconds = float(lease.job.payload["seconds"])
    steps = max(1, int(seconds / 0.1))
    for step in range(steps):
        time.sleep(seconds / steps)
        lease.check()
        lease.progress(bytes_done=step + 1, bytes_total=steps)
    with UnitOfWork(engine) as uow:
        lease.leases.finish(uow.connection, lease.job_id, lease.owner,
                            result={"owner": lease.owner})
        uow.connection.execute(insert(effects).values(
            message_id=lease.job_id, value=f"job:{lease.job_id}", at=time.time()))
        uow.outbox.add(JobDone(job_id=lease.job_id, owner=lease.owner),
                       migration_id=lease.job.migration_id)
        uow.commit()


def fail_job(lease: Lease, error: BaseException, engine: Any) -> None:
    with engine.begin() as connection:
        lease.leases.finish(connection, lease.job_id, lease.owner, state=FAILED,
                            error=str(error))


def build(settings: Settings, db_url: str, queue: str = "echo") -> Service:
    engine = make_engine(db_url)
    messaging.create_all(engine)
    metadata.create_all(engine)
    leases = Leases(engine, jobs, settings.lease_seconds)
    worker = JobWorker(leases, lambda lease: run_job(lease, engine),
                       fail=lambda lease, error: fail_job(lease, error, engine),
                       name=f"{queue}-jobs", poll_seconds=settings.job_poll_seconds,
                       concurrency=1)
    service: Service

    def on_failure(event: Any, envelope: Envelope, error: BaseException) -> None:
        record_failure(event, envelope, error, uow=service.uow())

    service = Service("echo", settings, engine, QueueSpec(queue, ("test.echo", "test.job")),
                      {Echo.TYPE: echo, JobRequested.TYPE: request_job},
                      on_failure=on_failure, workers=[worker])
    return service


__all__ = ["DONE", "FAILED", "build", "effects", "failures", "flags", "jobs"]


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
