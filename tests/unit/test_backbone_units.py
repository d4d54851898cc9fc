"""Unit tests of the backbone's pure parts: settings, envelope, contracts, topology."""

from __future__ import annotations

import pytest

from shared.contracts import (
    EVENTS,
    ArchiveRequested,
    ArchiveSource,
    MigrationFailed,
    routing_key_for,
)
from shared.envelope import Envelope
from shared.errors import MalformedMessageError
from shared.runtime import routing_keys
from shared.settings import Settings
from shared.topology import QueueSpec, queue_name, retry_queue, work_queue


@pytest.mark.parametrize("event_type", sorted(EVENTS))
def test_every_datacenter_routed_event_must_carry_its_datacenter(event_type: str) -> None:
    # routing_key_for falls back to the bare type when the payload has no datacenter, and
    # the bare type matches no datacenter's queue: such an event would reach no one.
    model = EVENTS[event_type]
    assert model.TYPE == event_type
    if model.ROUTED_BY_DATACENTER:
        assert model.model_fields["datacenter"].is_required(), event_type
        assert routing_keys({event_type: None}, "ey04") == (f"{event_type}.ey04",)
        assert routing_key_for(event_type, {"datacenter": "ey04"}) == f"{event_type}.ey04"
    else:  # one queue for all datacenters, even when the payload names one
        assert routing_keys({event_type: None}, "ey04") == (event_type,)
        assert routing_key_for(event_type, {"datacenter": "ey04"}) == event_type


def test_envelope_round_trips_through_json() -> None:
    envelope = Envelope.wrap(MigrationFailed(stage="resolve", reason="pool empty"),
                             migration_id="m-7")
    again = Envelope.from_json(envelope.to_json())
    assert again == envelope
    assert again.event() == MigrationFailed(stage="resolve", reason="pool empty")


def test_datacenter_events_route_by_datacenter() -> None:
    event = ArchiveRequested(datacenter="ey04", request_id="r", kind="shared_fs",
                             reuse_key="k", source=ArchiveSource(host="vm", path="/data"))
    assert Envelope.wrap(event, migration_id="m").routing_key == "archive.requested.ey04"
    assert routing_keys({"archive.requested": None}, "ey04") == ("archive.requested.ey04",)
    assert routing_keys({"archive.completed": None}) == ("archive.completed.*",)
    assert routing_keys({"migration.submitted": None}) == ("migration.submitted",)


@pytest.mark.parametrize("body, words", [
    (b"{not json", "not a Ferry envelope"),
    (b'{"id": "x"}', "not a Ferry envelope"),
])
def test_malformed_bodies_raise_malformed_message_error(body: bytes, words: str) -> None:
    with pytest.raises(MalformedMessageError, match=words):
        Envelope.from_json(body)


def test_unknown_type_and_bad_payload_are_malformed() -> None:
    unknown = Envelope(type="nope.nothing", migration_id="m", payload={})
    with pytest.raises(MalformedMessageError, match="unknown event type 'nope.nothing'"):
        unknown.event()
    bad = Envelope(type="migration.failed", migration_id="m", payload={"stage": 3})
    with pytest.raises(MalformedMessageError, match="migration.failed payload invalid"):
        bad.event()


def test_work_queue_is_quorum_with_delivery_limit_and_dead_letter_route() -> None:
    queue = work_queue(QueueSpec("resolver", ("migration.submitted",)), delivery_limit=7)
    assert queue.queue_arguments == {
        "x-queue-type": "quorum", "x-delivery-limit": 7,
        "x-dead-letter-exchange": "ferry.dead-letters", "x-dead-letter-routing-key": "resolver",
    }
    retry = retry_queue(QueueSpec("resolver", ()), 1.5)
    assert retry.name == "resolver.retry.1500ms"
    assert retry.queue_arguments["x-message-ttl"] == 1500
    assert retry.queue_arguments["x-dead-letter-routing-key"] == "resolver"


def test_queue_names_follow_the_design() -> None:
    assert queue_name("intake") == "intake.status"
    assert queue_name("archiver", "ey04") == "archiver.ey04"
    with pytest.raises(ValueError, match="needs a datacenter"):
        queue_name("archiver")


def test_settings_read_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FERRY_RETRY_DELAYS", "0.5, 2")
    monkeypatch.setenv("FERRY_RESOLVER_DATABASE_URL", "postgresql://x/y")
    monkeypatch.setenv("FERRY_STATE_DIR", "/tmp/ferry-state")
    settings = Settings()
    assert settings.retry_delays == (0.5, 2.0)
    # the embedded broker, durable, in the state directory, unless FERRY_BROKER_URL says
    assert settings.broker_url == "sqlite+ferry:///tmp/ferry-state/broker.sqlite3"
    assert settings.database_url("resolver") == "postgresql://x/y"
    assert settings.database_url("intake") == "sqlite:////tmp/ferry-state/intake.sqlite3"
    with pytest.raises(ValueError, match="unknown service 'billing'"):
        settings.database_url("billing")


def test_periodic_task_survives_a_failing_round_and_stops() -> None:
    import threading

    from shared.periodic import Periodic

    rounds: list[int] = []
    third = threading.Event()

    def tick() -> None:
        rounds.append(len(rounds))
        if len(rounds) == 1:
            raise RuntimeError("host unreachable this time")
        if len(rounds) == 3:
            third.set()

    task = Periodic("test-periodic", 0.01, tick)
    task.start()
    assert third.wait(5), rounds
    task.stop()
    done = len(rounds)
    assert done >= 3
    assert task._thread is not None and not task._thread.is_alive()
