"""The queues every service declares at start are the ones the consumers bind: a service
whose HANDLERS change without shared/topology.py changing fails here."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import insert

from ferry.broker import grant, inventory_datacenters
from ferry.event_map import DC, event_routes
from services.archiver import handlers as archiver
from services.resolver import handlers as resolver
from services.snapshotter import handlers as snapshotter
from services.transfer import handlers as transfer
from shared.db import make_engine
from shared.inbox_outbox import metadata as messaging
from shared.inbox_outbox import outbox_table
from shared.relay import OutboxRelay
from shared.runtime import routing_keys
from shared.settings import SERVICES, Settings
from shared.topology import (
    DEAD_EXCHANGE,
    EVENTS_EXCHANGE,
    FIXED_BINDINGS,
    RETRY_EXCHANGE,
    QueueSpec,
    all_queues,
    queue_name,
    standing_queues,
    standing_queues_for,
)


@pytest.mark.parametrize("service, handlers", [
    ("resolver", resolver.HANDLERS), ("snapshotter", snapshotter.HANDLERS)])
def test_each_fixed_queue_is_bound_as_its_consumer_binds_it(service: str,
                                                            handlers: dict[str, object]) -> None:
    assert set(FIXED_BINDINGS[queue_name(service)]) == set(routing_keys(handlers))


def test_intake_hears_everything() -> None:
    assert FIXED_BINDINGS[queue_name("intake")] == ("#",)


def test_a_datacenters_standing_queue_takes_what_its_archiver_is_sent() -> None:
    [spec] = [s for s in standing_queues(["ey04"]) if s.name == "archiver.ey04"]
    # every key its archiver binds, those not routed by datacenter too (snapshot.released,
    # transfer.completed): an archiver whose user may not bind them relies on these
    assert set(spec.routing_keys) == set(routing_keys(archiver.HANDLERS, "ey04"))


def test_a_datacenters_transfer_queue_takes_its_archives_and_every_plan() -> None:
    # Given the queues standing for two datacenters
    specs = {s.name: s for s in standing_queues(["ey04", "ey02"])}
    # Then each datacenter has its own transfer queue, bound as its worker binds it: its own
    # archives' ends, and migration.resolved (not routed by datacenter) on each
    assert "transfer" not in specs
    for dc in ("ey04", "ey02"):
        spec = specs[f"transfer.{dc}"]
        assert spec.name == queue_name("transfer", dc)
        assert set(spec.routing_keys) == set(routing_keys(transfer.HANDLERS, dc)) == {
            f"archive.completed.{dc}", f"archive.failed.{dc}", "migration.resolved"}
    # and never the other datacenter's archives
    assert "archive.completed.ey02" not in specs["transfer.ey04"].routing_keys


def test_publishing_a_datacenters_event_declares_both_of_its_queues_first() -> None:
    # an archive.completed for a datacenter whose transfer worker never ran waits in its queue
    for key in ("archive.requested.ey02", "archive.completed.ey02", "archive.failed.ey02",
                "snapshot.ready.ey02"):
        assert {s.name for s in standing_queues_for(key)} == {"archiver.ey02", "transfer.ey02"}
    assert standing_queues_for("migration.resolved") == []
    assert standing_queues_for("transfer.completed") == []


class _LosesItsFirstPublish:
    """A publisher whose connection drops during its first publish (a fake: a real broker
    cannot be made to drop one publish on cue); records what each call asked to declare."""

    def __init__(self) -> None:
        self.declared: list[set[str]] = []

    def publish(self, body: bytes, *, routing_key: str, declare: Any = ()) -> None:
        self.declared.append({queue.name for queue in declare})
        if len(self.declared) == 1:
            raise ConnectionResetError("connection lost while declaring")


def test_a_datacenters_queues_are_declared_again_after_a_publish_that_failed(
        tmp_path: Path) -> None:
    # Given an archive request for a datacenter no worker of which ever ran
    engine = make_engine(f"sqlite:///{tmp_path}/outbox.sqlite3")
    messaging.create_all(engine)
    with engine.begin() as connection:
        connection.execute(insert(outbox_table).values(
            message_id="m1", routing_key="archive.requested.ey02", body="{}", created_at=0.0))
    relay = OutboxRelay(engine, "memory://")
    publisher = _LosesItsFirstPublish()
    # When the connection drops during the first publish
    with pytest.raises(ConnectionResetError):
        relay.publish_pending(publisher)  # type: ignore[arg-type]
    # Then the next try declares the datacenter's queues again, and once through, no more
    assert relay.publish_pending(publisher) == 1  # type: ignore[arg-type]
    assert publisher.declared[1] == publisher.declared[0] >= {"archiver.ey02", "transfer.ey02"}
    with engine.begin() as connection:
        connection.execute(insert(outbox_table).values(
            message_id="m2", routing_key="archive.completed.ey02", body="{}", created_at=0.0))
    assert relay.publish_pending(publisher) == 1  # type: ignore[arg-type]
    assert publisher.declared[2] == set()
    engine.dispose()


# -- each service's broker user (ferry/broker.py) --------------------------------------------

def _may(pattern: str, name: str) -> bool:
    return re.fullmatch(pattern, name) is not None


def test_each_user_may_publish_exactly_the_events_its_code_emits() -> None:
    routes = event_routes()
    for service in SERVICES:
        events = dict(grant(service).topics)[EVENTS_EXCHANGE.name]
        for route in routes:
            key = route.routing_key.replace(DC, "ey04")
            assert _may(events, key) == (service in route.emitters), (service, key)
        assert not _may(events, "#") and not _may(events, "archive.completed")
    # the forgery the issue found: only the archiver may say an archive is complete
    assert [s for s in SERVICES if _may(dict(grant(s).topics)[EVENTS_EXCHANGE.name],
                                        "archive.completed.ey04")] == ["archiver"]


def test_each_user_may_touch_only_its_own_queues_and_never_the_default_exchange() -> None:
    queues = {"intake": "intake.status", "resolver": "resolver", "snapshotter": "snapshotter",
              "archiver": "archiver.ey04", "transfer": "transfer.ey04"}
    for service, own in queues.items():
        rights = grant(service)
        topics = dict(rights.topics)
        assert rights.configure == "^$" and not _may(rights.write, "amq.default")
        assert not _may(rights.write, "") and not _may(rights.write, "ferry.dead")
        for other in queues.values():
            mine = other == own
            assert _may(rights.read, other) == mine, (service, other)
            assert _may(topics[DEAD_EXCHANGE.name], other) == mine, (service, other)
            assert _may(topics[RETRY_EXCHANGE.name], f"{other}.retry.1000ms") == mine
            assert not _may(topics[RETRY_EXCHANGE.name], other)  # expiry is the broker's
        assert not _may(rights.read, f"{own}.dead")  # operators replay, with the admin's


def test_retries_and_dead_letters_never_go_through_the_default_exchange() -> None:
    spec = QueueSpec("resolver", ("migration.submitted",))
    work, dead, *retries = all_queues(spec, 10, (1.0, 5.0))
    assert work.queue_arguments["x-dead-letter-exchange"] == DEAD_EXCHANGE.name
    assert {b.exchange.name: b.routing_key for b in work.bindings}[RETRY_EXCHANGE.name] == (
        "resolver")
    assert dead.exchange.name == DEAD_EXCHANGE.name and dead.routing_key == "resolver"
    for retry in retries:
        assert retry.exchange.name == RETRY_EXCHANGE.name == retry.queue_arguments[
            "x-dead-letter-exchange"]
        assert retry.queue_arguments["x-dead-letter-routing-key"] == "resolver"
    assert {e.type for e in (EVENTS_EXCHANGE, RETRY_EXCHANGE, DEAD_EXCHANGE)} == {"topic"}


def test_each_service_reads_its_own_broker_url_else_the_shared_one(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FERRY_BROKER_URL", "amqp://admin@rabbit/ferry")
    monkeypatch.setenv("FERRY_ARCHIVER_BROKER_URL", "amqp://ferry-archiver@rabbit/ferry")
    settings = Settings()
    assert settings.for_service("archiver").broker_url == "amqp://ferry-archiver@rabbit/ferry"
    assert settings.for_service("resolver").broker_url == "amqp://admin@rabbit/ferry"
    assert settings.for_service("echo") is settings  # a test's own service
    assert Settings(broker_url="memory://").for_service("intake").broker_url == "memory://"


def test_broker_setup_takes_the_datacenters_an_inventory_file_names() -> None:
    root = Path(__file__).resolve().parents[2]
    assert inventory_datacenters(Settings(inventory=str(root / "examples/inventory.yaml"))) == [
        "ey02", "ey04"]
    # an HTTP inventory lists none: setup then asks for -d
    assert inventory_datacenters(Settings(inventory="http://127.0.0.1:9/inventory")) == []
    assert inventory_datacenters(Settings(inventory=None)) == []
