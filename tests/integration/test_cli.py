"""The `ferry` command as ops run it: dead letters listed and replayed, services started."""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Any

from sqlalchemy import insert

from ferry.dlq import list_dead
from shared.bus import connect
from shared.topology import EVENTS_EXCHANGE, QueueSpec, dead_queue, work_queue
from tests.integration.test_backbone import count, echo_envelope, fast_settings, publish
from tests.support import echo
from tests.support.helpers import wait_for
from tests.support.processes import ROOT, ChildProcess, run_ferry


def ferry(*args: str, broker_url: str, timeout: float = 60, **env: str) -> str:
    done = run_ferry(*args, env={"FERRY_BROKER_URL": broker_url, "COLUMNS": "250", **env},
                     timeout=timeout)
    assert done.returncode == 0, f"ferry {' '.join(args)} failed: {done.stdout}{done.stderr}"
    return done.stdout


def test_dlq_list_shows_dead_letters_without_consuming_and_replay_handles_them_once(
    rabbit_url: str, pg_url: str,
) -> None:
    service = echo.build(fast_settings(rabbit_url), pg_url, queue=f"echo-{uuid.uuid4().hex[:8]}")
    service.start()
    try:
        # Given a message that failed every attempt
        envelope = echo_envelope("cli", fail="until_flag")
        publish(rabbit_url, envelope)
        wait_for(lambda: list_dead(rabbit_url, service.queue.name), what="dead letter")
        # When ops list the dead letters twice
        first = ferry("dlq", "list", service.queue.name, broker_url=rabbit_url)
        second = ferry("dlq", "list", service.queue.name, broker_url=rabbit_url)
        # Then both listings show it, with its type, migration, attempts and error
        for listing in (first, second):
            assert str(envelope.id) in listing and "test.echo" in listing
            assert "not healed yet" in listing and "1 dead letter(s)" in listing
        # When the cause is fixed and it is replayed by id
        with service.engine.begin() as connection:
            connection.execute(insert(echo.flags).values(name="heal"))
        out = ferry("dlq", "replay", service.queue.name, "--id", str(envelope.id),
                    broker_url=rabbit_url)
        assert f"replayed {envelope.id}" in out
        # Then it is handled once (a sentinel after it on the queue is handled after it:
        # one consumer, in order) and nothing is dead any more
        sentinel = echo_envelope("sentinel")
        publish(rabbit_url, sentinel)
        wait_for(lambda: echo.handled(service.engine, sentinel), what="the sentinel handled")
        assert echo.handled(service.engine, envelope)
        assert count(service, echo.effects) == 2
        assert "0 dead letter(s)" in ferry("dlq", "list", service.queue.name,
                                           broker_url=rabbit_url)
    finally:
        service.stop()
        service.engine.dispose()


def test_dlq_replay_of_an_unknown_id_fails_and_keeps_everything(rabbit_url: str) -> None:
    done = run_ferry("dlq", "replay", "resolver", "--id", "no-such-id",
                     env={"FERRY_BROKER_URL": rabbit_url})
    assert done.returncode == 1 and "not found in resolver.dead: no-such-id" in done.stdout


def test_message_that_kills_its_consumer_is_dead_lettered_by_the_delivery_limit(
    rabbit_url: str,
) -> None:
    # Given a work queue with delivery limit 2, and a message on it
    spec = QueueSpec(f"poison-{uuid.uuid4().hex[:6]}", ("test.poison",))
    with connect(rabbit_url) as connection:
        channel = connection.channel()
        queue = work_queue(spec, delivery_limit=2)(channel)
        queue.declare()
        dead_queue(spec.name)(channel).declare()
        producer = connection.Producer(channel)
        producer.publish(b'{"poison": true}', exchange=EVENTS_EXCHANGE,
                         routing_key="test.poison", content_type="application/json",
                         content_encoding="utf-8")
        # When consumers die holding it (returned unacked) three times
        for _ in range(3):
            message = wait_for(lambda: queue.get(no_ack=False), what="delivery")
            message.reject(requeue=True)  # type: ignore[attr-defined]
        # Then the broker dead-letters it, and the listing says why
        letters: Any = wait_for(lambda: list_dead(rabbit_url, spec.name), what="the dead letter")
        assert queue.queue_declare(passive=True).message_count == 0
        channel.close()
    assert len(letters) == 1 and letters[0].reason == "delivery_limit"
    assert "delivery limit" in letters[0].error


def test_ferry_run_starts_a_service_and_stops_cleanly_on_sigterm(
    rabbit_url: str, tmp_path: Path, processes: list[ChildProcess],
) -> None:
    # Given `ferry run resolver` on RabbitMQ with its own state dir
    process = ChildProcess.ferry("run", "resolver", env={
        "FERRY_BROKER_URL": rabbit_url, "FERRY_STATE_DIR": str(tmp_path),
        "FERRY_INVENTORY": str(ROOT / "examples" / "inventory.yaml")})
    processes.append(process)
    # Then it upgrades its database and declares its queues
    wait_for(lambda: (tmp_path / "resolver.sqlite3").exists(), what="resolver database")
    with connect(rabbit_url) as connection:
        channel = connection.channel()
        wait_for(lambda: _queue_exists(channel, "resolver"), what="resolver queue")
        channel.close()
    # And SIGTERM stops it with exit status 0
    assert process.stop() == 0, process.log()


def _queue_exists(channel: object, name: str) -> bool:
    try:
        channel.queue_declare(name, passive=True)  # type: ignore[attr-defined]
    except Exception:  # noqa: BLE001 - passive declare of a missing queue closes the channel
        return False
    return True
