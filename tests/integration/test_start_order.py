"""Services started in the worst order lose nothing (RabbitMQ + PostgreSQL): intake alone
first takes a submission and publishes it; the resolver, started only afterwards, finds it
waiting in its queue, because every service declares every queue at start."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import httpx
from sqlalchemy import func, select

from ferry.loopback_sshd import free_port
from services.intake.bootstrap import bootstrap as intake_bootstrap
from services.resolver.bootstrap import bootstrap as resolver_bootstrap
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
