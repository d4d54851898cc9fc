"""The resolver on RabbitMQ + PostgreSQL: the seed's example, redelivery and replay.

Also holds the helpers the other resolver integration tests share (a watch queue, publish).
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from kombu import Queue, binding
from sqlalchemy import func, select

from services.resolver.bootstrap import bootstrap
from services.resolver.tables import internal_ips, names, public_ips, vlans
from shared.bus import Publisher, connect
from shared.contracts import MigrationSubmitted
from shared.envelope import Envelope
from shared.inbox_outbox import outbox_table
from shared.runtime import Service
from shared.settings import Settings
from shared.topology import EVENTS_EXCHANGE
from tests.support.helpers import wait_for
from tests.unit.resolver.documents import INVENTORY, example_document

OUTPUT = ("migration.resolved", "migration.failed", "snapshot.requested", "archive.requested.*")


class Watch:
    """A queue of its own bound to the resolver's output; collects every event by type."""

    def __init__(self, broker_url: str, keys: tuple[str, ...] = OUTPUT) -> None:
        self._connection = connect(broker_url)
        self._channel = self._connection.channel()
        queue = Queue(f"watch-{uuid.uuid4().hex[:8]}", exchange=EVENTS_EXCHANGE,
                      bindings=[binding(EVENTS_EXCHANGE, routing_key=k) for k in keys],
                      auto_delete=True)
        self._queue = queue(self._channel)
        self._queue.declare()
        self.events: list[dict[str, Any]] = []

    def drain(self) -> list[dict[str, Any]]:
        while (message := self._queue.get(no_ack=True)) is not None:
            self.events.append(json.loads(message.body))
        return self.events

    def of(self, event_type: str, migration_id: str | None = None) -> list[dict[str, Any]]:
        return [e for e in self.drain() if e["type"] == event_type
                and migration_id in (None, e["migration_id"])]

    def wait(self, event_type: str, count: int, timeout: float = 60.0) -> list[dict[str, Any]]:
        wait_for(lambda: len(self.of(event_type)) >= count, timeout=timeout,
                 what=f"{count} {event_type}")
        return self.of(event_type)

    def close(self) -> None:
        self._channel.close()
        self._connection.release()


def submitted(document: dict[str, Any], migration_id: str) -> Envelope:
    return Envelope.wrap(MigrationSubmitted(customer_id=document["customer"]["id"],
                                            document=document), migration_id=migration_id)


def publish_all(broker_url: str, envelopes: list[Envelope]) -> None:
    publisher = Publisher(broker_url)
    try:
        for envelope in envelopes:
            publisher.publish(envelope.to_json(), routing_key=envelope.routing_key)
    finally:
        publisher.close()


def held_by(service_engine: Any, migration_id: str) -> int:
    with service_engine.connect() as connection:
        return sum(int(connection.execute(select(func.count()).select_from(table)
                                          .where(table.c.migration_id == migration_id))
                       .scalar_one()) for table in (names, public_ips, vlans, internal_ips))


def outbox_rows(service_engine: Any) -> int:
    with service_engine.connect() as connection:
        return int(connection.execute(select(func.count()).select_from(outbox_table))
                   .scalar_one())


def resolver_settings(broker_url: str, db_url: str, state_dir: Path, **extra: Any) -> Settings:
    values: dict[str, Any] = {
        "broker_url": broker_url, "resolver_database_url": db_url, "state_dir": state_dir,
        "inventory": str(INVENTORY), "outbox_poll_seconds": 0.1,
        "retry_delays": (0.2, 0.5), "max_attempts": 3, **extra}
    return Settings(**values)


@pytest.fixture
def running(rabbit_url: str, pg_url: str, tmp_path: Path) -> Iterator[tuple[Service, Watch]]:
    watch = Watch(rabbit_url)
    service = bootstrap(resolver_settings(rabbit_url, pg_url, tmp_path))
    service.start()
    yield service, watch
    service.stop()
    service.engine.dispose()
    watch.close()


def test_seeds_example_resolves_on_rabbitmq_and_postgres_as_the_seed_describes(
    running: tuple[Service, Watch],
) -> None:
    service, watch = running
    # When the seed's example is submitted to a fresh resolver
    publish_all(service.settings.broker_url, [submitted(example_document(), "m-seed")])
    resolved = watch.wait("migration.resolved", 1)[0]["payload"]
    # Then vm_1..vm_6 are tm21-s00101..tm21-s00106, env_1/env_2 tm21-e00050/51
    vms = {duid: vm["name"] for duid, vm in resolved["allocations"]["vms"].items()}
    assert vms == {f"vm_{n}": f"tm21-s{100 + n:05d}" for n in range(1, 7)}
    assert resolved["allocations"]["environments"] == {"env_1": "tm21-e00050",
                                                       "env_2": "tm21-e00051"}
    document = resolved["resolved_document"]
    # And the new IP's port 443 goes to tm21-s00101..104 on 443
    mapping = document["public_ips"][0]["port_mappings"][0]
    assert (mapping["external_port"], mapping["internal_port"]) == (443, 443)
    assert mapping["vms"] == [f"tm21-s0010{n}" for n in range(1, 5)]
    # And tm21-s00105 / tm21-s00106 are the new MySQL 5.0.51 master and replica
    assert document["database_groups"] == [{"engine": "mysql", "version": "5.0.51",
                                            "master": "tm21-s00105",
                                            "replicas": ["tm21-s00106"]}]
    # And the GFS /data of ey04-e00075 goes to tm21-e00050 on tm21-s00101
    assert document["migration"]["shared_filesystems"][0]["new_vm"] == "tm21-s00101"
    # And the job list is the seed's: four roots, the GFS, the database, the replica's root
    assert [(j["kind"], j["reuse_key"]) for j in resolved["jobs"]] == [
        *[("local_fs", f"local_fs:m-seed:ey04-s5000{n}:/") for n in range(4)],
        ("shared_fs", "shared_fs:m-seed:ey04-e00075:/data"),
        ("database", "database:m-seed:mysql-mega-2-replica:foobar_production"),
        ("db_server_root", "db_server_root:ey04:mysql-mega-2-replica:/:scrub-63ec66ae1e58"),
    ]
    snapshots = watch.wait("snapshot.requested", 4)
    assert sorted(s["payload"]["source"]["label"] for s in snapshots) == [
        f"ey04-s5000{n}:/" for n in range(4)]
    archives = watch.wait("archive.requested", 3)
    assert {a["payload"]["datacenter"] for a in archives} == {"ey04"}
    assert sorted(a["payload"]["request_id"] for a in archives) == [
        "m-seed:database:1", "m-seed:db_server_root:1", "m-seed:shared_fs:1"]


def test_redelivery_has_one_effect_and_replay_yields_the_same_allocations(
    running: tuple[Service, Watch],
) -> None:
    service, watch = running
    broker = service.settings.broker_url
    envelope = submitted(example_document(), "m-again")
    publish_all(broker, [envelope])
    first = watch.wait("migration.resolved", 1)[0]
    emitted = outbox_rows(service.engine)
    # When the same message is delivered again
    publish_all(broker, [envelope])
    assert service.consumer is not None
    wait_for(lambda: service.consumer.handled == 2,  # type: ignore[union-attr]
             what="redelivery handled")
    # Then nothing new is emitted (the handler's transaction commits before the ack that
    # counts it as handled) or allocated
    assert outbox_rows(service.engine) == emitted
    assert held_by(service.engine, "m-again") == 16
    # When the migration is submitted again as a new message (a replay)
    replay = submitted(example_document(), "m-again")
    publish_all(broker, [replay])
    watch.wait("migration.resolved", 2)
    # Then it resolves to the very same allocations, and still holds only those; the
    # outbox is published in order, so a copy caused by the redelivery would be the second
    first_again, second = watch.of("migration.resolved")
    assert [first_again["causation_id"], second["causation_id"]] == [str(envelope.id),
                                                                      str(replay.id)]
    assert second["id"] != first["id"]
    assert second["payload"] == first["payload"]
    assert held_by(service.engine, "m-again") == 16
