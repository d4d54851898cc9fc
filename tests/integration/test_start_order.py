"""Services started in the worst order lose nothing (RabbitMQ + PostgreSQL): intake alone
first takes a submission and publishes it; the resolver, started only afterwards, finds it
waiting in its queue, because every service declares every queue at start. And a
datacenter's archiver queue exists as soon as the resolver's inventory names it, before any
archiver of that datacenter ever ran."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import amqp.exceptions
import httpx
import yaml
from sqlalchemy import func, select

from ferry.loopback_sshd import free_port
from services.intake.bootstrap import bootstrap as intake_bootstrap
from services.resolver.bootstrap import bootstrap as resolver_bootstrap
from shared.bus import connect
from shared.inbox_outbox import outbox_table
from shared.runtime import Service
from shared.settings import Settings
from tests.support.helpers import wait_for

ROOT = Path(__file__).resolve().parents[2]
TOKEN = "start-order-token"


def unpublished(service: Service) -> int:
    with service.engine.connect() as connection:
        return int(connection.execute(select(func.count()).select_from(outbox_table).where(
            outbox_table.c.published_at.is_(None))).scalar_one())


def test_intake_alone_first_then_the_resolver_resolves_what_was_submitted(
        bare_rabbit_url: str, make_pg_database: Callable[[], str], tmp_path: Path) -> None:
    bind = f"127.0.0.1:{free_port()}"
    settings = Settings(
        broker_url=bare_rabbit_url, state_dir=tmp_path, intake_bind=bind, api_token=TOKEN,
        intake_database_url=make_pg_database(), resolver_database_url=make_pg_database(),
        inventory=str(ROOT / "examples" / "inventory.yaml"), outbox_poll_seconds=0.1)
    started: list[Service] = []
    try:
        # Given intake alone on a broker where nothing else ever ran
        intake = intake_bootstrap(settings)
        intake.start()
        started.append(intake)
        # When a document is submitted and intake has published migration.submitted
        answer = httpx.post(f"http://{bind}/migrations",
                            content=(ROOT / "examples" / "migration.json").read_bytes(),
                            headers={"Content-Type": "application/json",
                                     "Authorization": f"Bearer {TOKEN}"}, timeout=30)
        assert answer.status_code == 202, answer.text
        migration = answer.json()["id"]
        wait_for(lambda: unpublished(intake) == 0, what="migration.submitted published")
        # And only then the resolver starts
        resolver = resolver_bootstrap(settings)
        resolver.start()
        started.append(resolver)

        # Then the migration is resolved: the message waited in the resolver's queue
        def status() -> str:
            reply = httpx.get(f"http://{bind}/migrations/{migration}",
                              headers={"Authorization": f"Bearer {TOKEN}"}, timeout=10)
            return str(reply.json()["status"])

        wait_for(lambda: status() != "submitted", timeout=60, what="the migration resolved")
        assert status() == "archiving"
    finally:
        for service in reversed(started):
            service.stop()
            service.engine.dispose()


def queue_exists(broker_url: str, name: str) -> bool:
    """A passive declare: True when the queue exists, never creating it."""
    with connect(broker_url) as connection:
        channel = connection.channel()
        try:
            channel.queue_declare(name, passive=True)
        except amqp.exceptions.NotFound:
            return False
        channel.close()
    return True


def test_the_resolver_declares_every_inventory_datacenters_archiver_queue(
        bare_rabbit_url: str, make_pg_database: Callable[[], str], tmp_path: Path) -> None:
    inventory = tmp_path / "inventory.yaml"
    document = yaml.safe_load((ROOT / "examples" / "inventory.yaml").read_text())
    inventory.write_text(yaml.safe_dump(document))
    settings = Settings(broker_url=bare_rabbit_url, state_dir=tmp_path,
                        resolver_database_url=make_pg_database(), inventory=str(inventory))
    assert not queue_exists(bare_rabbit_url, "archiver.ey04")  # a fresh vhost: nothing yet
    # Given the resolver alone on a fresh broker
    resolver = resolver_bootstrap(settings)
    resolver.start()
    try:
        # Then each datacenter its inventory names has its archiver queue, and its dead queue
        for datacenter in ("ey04", "ey02"):
            assert queue_exists(bare_rabbit_url, f"archiver.{datacenter}"), datacenter
            assert queue_exists(bare_rabbit_url, f"archiver.{datacenter}.dead"), datacenter
        assert not queue_exists(bare_rabbit_url, "archiver.ey09")  # not in the inventory
        # When the inventory file names a new datacenter
        document["datacenters"]["ey09"] = {"archive_hosts": ["archive-ey09.internal"]}
        inventory.write_text(yaml.safe_dump(document))
        # Then its queue follows, without a restart
        wait_for(lambda: queue_exists(bare_rabbit_url, "archiver.ey09"), timeout=30,
                 what="archiver.ey09 declared after the inventory changed")
    finally:
        resolver.stop()
        resolver.engine.dispose()
