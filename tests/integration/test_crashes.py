"""Crashes and broker outages: a SIGKILLed process or a dropped connection loses nothing."""

from __future__ import annotations

import json
import uuid
from typing import Any

import pytest
from kombu import Queue
from sqlalchemy import func, insert, select

from shared.bus import connect
from shared.db import make_engine
from shared.errors import LeaseLostError
from shared.inbox_outbox import outbox_table
from shared.jobs import Leases, new_job_values
from shared.topology import EVENTS_EXCHANGE
from tests.conftest import Backbone, rabbitmqctl
from tests.integration.test_backbone import count, echo_envelope, fast_settings, publish
from tests.support import echo
from tests.support.helpers import wait_for
from tests.support.processes import ChildProcess


def EchoProcess(broker_url: str, db_url: str, queue: str, **env: str) -> ChildProcess:  # noqa: N802
    """The echo service as a real subprocess, ended only by its own PID."""
    return ChildProcess("tests.support.echo", "--db", db_url, "--queue", queue,
                        ready="echo: started",
                        env={"FERRY_BROKER_URL": broker_url, "FERRY_OUTBOX_POLL_SECONDS": "0.1",
                             "FERRY_LEASE_SECONDS": "2", "FERRY_JOB_POLL_SECONDS": "0.1", **env})


def test_event_committed_but_not_published_is_published_after_restart(
    rabbit_url: str, pg_url: str, processes: list[ChildProcess],
) -> None:
    queue = f"echo-{uuid.uuid4().hex[:8]}"
    engine = make_engine(pg_url)
    # Given a watcher for the service's output, and the service running without its relay
    with connect(rabbit_url) as connection:
        channel = connection.channel()
        watch = Queue(f"watch-{queue}", EVENTS_EXCHANGE, routing_key="test.echoed")(channel)
        watch.declare()
        first = EchoProcess(rabbit_url, pg_url, queue, FERRY_OUTBOX_RELAY="false")
        processes.append(first)
        # When it commits a message's effect and outgoing event
        publish(rabbit_url, echo_envelope("crash-window"))
        wait_for(lambda: _count(engine, outbox_table) == 1, what="outbox row committed")
        # And is SIGKILLed before anything was published
        first.kill()
        assert _count(engine, outbox_table, outbox_table.c.published_at.is_(None)) == 1
        assert watch.get(no_ack=True) is None
        # Then once it restarts, the event is published, exactly once
        processes.append(EchoProcess(rabbit_url, pg_url, queue))
        message = wait_for(lambda: watch.get(no_ack=True), what="event after restart")
        body = json.loads(message.body)  # type: ignore[attr-defined]
        with engine.connect() as db:
            expected = db.execute(select(outbox_table.c.message_id)).scalar_one()
        assert body["id"] == expected and body["payload"] == {"value": "crash-window"}
        # And nothing else: a sentinel handled after it comes out next. The relay publishes
        # in outbox order, so a second copy of the first event would have come before it.
        sentinel = echo_envelope("sentinel")
        publish(rabbit_url, sentinel)
        after: list[dict[str, object]] = []
        wait_for(lambda: _collect(watch, after) and after[-1]["payload"] == {"value": "sentinel"},
                 what="the sentinel's event")
        assert [e["payload"] for e in after] == [{"value": "sentinel"}]
        assert _count(engine, echo.effects) == 2
        wait_for(lambda: _count(engine, outbox_table, outbox_table.c.published_at.is_(None))
                 == 0, what="both outbox rows marked published")
        channel.close()
    engine.dispose()


def test_consumer_reconnects_after_broker_closes_its_connections(rabbit_url: str,
                                                                  pg_url: str) -> None:
    service = echo.build(fast_settings(rabbit_url), pg_url, queue=f"echo-{uuid.uuid4().hex[:8]}")
    service.start()
    try:
        # Given a consumer that handled a first batch
        for index in range(5):
            publish(rabbit_url, echo_envelope(f"before-{index}"))
        wait_for(lambda: count(service, echo.effects) == 5, what="first batch")
        # When the broker closes every connection of this vhost under it
        vhost = rabbit_url.rsplit("/", 1)[1]
        rabbitmqctl("close_all_connections", "--vhost", vhost, "ferry test: forced close")
        # Then messages published afterwards are handled too, none lost, none twice
        for index in range(5):
            publish(rabbit_url, echo_envelope(f"after-{index}"))
        wait_for(lambda: count(service, echo.effects) == 10, timeout=60, what="second batch")
        wait_for(lambda: count(service, outbox_table, outbox_table.c.published_at.is_(None))
                 == 0, timeout=30, what="outbox drained after reconnect")
        assert count(service, echo.effects) == 10
    finally:
        service.stop()
        service.engine.dispose()


def test_leased_job_of_a_killed_worker_is_taken_over_and_finished_once(
    backbone: Backbone, processes: list[ChildProcess],
) -> None:
    engine = make_engine(backbone.db_url)
    echo.build(fast_settings("memory://"), backbone.db_url).engine.dispose()  # create tables
    broker = backbone.broker_url if backbone.real else "memory://"
    queue = f"echo-{uuid.uuid4().hex[:8]}"
    # Given a job that takes 4 s, claimed by a worker process
    with engine.begin() as connection:
        connection.execute(insert(echo.jobs).values(
            new_job_values("job-1", "m-1", "sleep", {"seconds": 4.0})))
    first = EchoProcess(broker, backbone.db_url, queue)
    processes.append(first)
    owner = wait_for(lambda: _job(engine).lease_owner if _job(engine).bytes_done > 0 else None,
                     what="job running on the first worker")
    # When that worker is SIGKILLed mid-job
    first.kill()
    assert _job(engine).state == "running"
    # Then another worker takes it over once the lease expires, and finishes it once
    processes.append(EchoProcess(broker, backbone.db_url, queue))
    wait_for(lambda: _job(engine).state == "done", timeout=30, what="job done")
    job = _job(engine)
    assert job.attempts == 2 and job.lease_owner is None
    assert job.result["owner"] != owner
    assert _count(engine, echo.effects, echo.effects.c.value == "job:job-1") == 1
    engine.dispose()


def test_worker_that_lost_its_lease_can_write_nothing(backbone: Backbone) -> None:
    engine = make_engine(backbone.db_url)
    echo.build(fast_settings("memory://"), backbone.db_url).engine.dispose()
    with engine.begin() as connection:
        connection.execute(insert(echo.jobs).values(new_job_values("job-2", "m", "sleep", {})))
    short = Leases(engine, echo.jobs, lease_seconds=0.2)
    # Given worker A's lease expired and worker B took the job over
    assert short.claim("worker-a") is not None
    assert Leases(engine, echo.jobs, lease_seconds=30).claim("worker-b") is None
    taken: Any = wait_for(lambda: Leases(engine, echo.jobs, lease_seconds=30).claim("worker-b"),
                          timeout=10, what="worker A's lease to expire")
    assert taken.attempts == 2
    # When A tries to heartbeat or finish, then it is refused and nothing changes
    with pytest.raises(LeaseLostError):
        short.heartbeat("job-2", "worker-a", bytes_done=99)
    with pytest.raises(LeaseLostError), engine.begin() as connection:
        short.finish(connection, "job-2", "worker-a")
    after = _job(engine)
    assert after.state == "running" and after.bytes_done == 0  # type: ignore[attr-defined]
    assert after.lease_owner == "worker-b"  # type: ignore[attr-defined]
    engine.dispose()


def _collect(watch: Any, into: list[dict[str, object]]) -> bool:
    """Move what the watch queue holds into `into`; True when there was anything."""
    got = False
    while (message := watch.get(no_ack=True)) is not None:
        into.append(json.loads(message.body))
        got = True
    return got or bool(into)


def _job(engine: object) -> object:
    with engine.connect() as connection:  # type: ignore[attr-defined]
        return connection.execute(select(echo.jobs).where(echo.jobs.c.id.in_(["job-1", "job-2"]))
                                  ).one()


def _count(engine: object, table: object, *where: object) -> int:
    with engine.connect() as connection:  # type: ignore[attr-defined]
        return int(connection.execute(select(func.count()).select_from(table)  # type: ignore[arg-type]
                                      .where(*where)).scalar_one())

