"""Ownership on RabbitMQ + PostgreSQL: a document naming another customer's old VM,
environment, shared filesystem, database or old public IP is refused with migration.failed
naming each and its owner, before anything is allocated, snapshotted or archived; the same document
resolves once the inventory says those are its customer's."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import yaml
from sqlalchemy import ColumnElement, Connection, Table, func, select

from services.resolver.bootstrap import bootstrap
from services.resolver.tables import internal_ips, names, public_ips, resolutions, vlans
from shared.inbox_outbox import outbox_table
from tests.integration.test_resolver_backbone import (
    Watch,
    held_by,
    publish_all,
    resolver_settings,
    submitted,
)
from tests.unit.resolver.documents import example_document, example_inventory
from tests.unit.resolver.test_ownership import CASES, REFUSED, Edit

SINGLE = [case for case in CASES if case[0] != "all at once"]  # each entity on its own


def count(connection: Connection, table: Table, *where: ColumnElement[bool]) -> int:
    query = select(func.count()).select_from(table).where(*where)
    return int(connection.execute(query).scalar_one())


@pytest.mark.parametrize("edit, named", [(edit, named) for _, edit, named in SINGLE],
                         ids=[case for case, _, _ in SINGLE])
def test_another_customers_entity_fails_the_migration_before_anything_is_held(
        rabbit_url: str, pg_url: str, tmp_path: Path, edit: Edit, named: list[str]) -> None:
    # Given a resolver whose inventory says the entity is another customer's
    data = example_inventory()
    edit(data)
    inventory = tmp_path / "inventory.yaml"
    inventory.write_text(yaml.safe_dump(data))
    watch = Watch(rabbit_url)
    service = bootstrap(resolver_settings(rabbit_url, pg_url, tmp_path,
                                          inventory=str(inventory)))
    service.start()
    try:
        # When cust-1042's document naming it is submitted
        document = example_document()
        publish_all(rabbit_url, [submitted(document, "m-foreign")])
        # Then the migration fails, naming each such entity and its owner
        failed = watch.wait("migration.failed", 1)
        assert [(e["migration_id"], e["payload"]) for e in failed] == [
            ("m-foreign", {"stage": "resolve", "reason": REFUSED + "; ".join(named)})]
        # And nothing was allocated: no name, public IP, VLAN, internal IP or resolution
        with service.engine.connect() as connection:
            assert count(connection, names) == count(connection, resolutions) == 0
            assert count(connection, public_ips, public_ips.c.migration_id.is_not(None)) == 0
            assert count(connection, vlans, vlans.c.customer_id.is_not(None)) == 0
            assert count(connection, internal_ips,
                         internal_ips.c.migration_id.is_not(None)) == 0
            # And the resolver emitted migration.failed and nothing else: no
            # migration.resolved, no snapshot.requested, no archive.requested
            emitted = connection.execute(select(outbox_table.c.routing_key,
                                                outbox_table.c.body)).all()
        assert [key for key, _ in emitted] == ["migration.failed"]
        assert json.loads(emitted[0][1])["migration_id"] == "m-foreign"
        for kind in ("migration.resolved", "snapshot.requested", "archive.requested"):
            assert watch.of(kind) == [], kind

        # When (the negative control) the inventory gives the entity back to cust-1042,
        # and the same document is submitted again
        inventory.write_text(yaml.safe_dump(example_inventory()) + "# owners corrected\n")
        os.utime(inventory, ns=(1, 1))
        publish_all(rabbit_url, [submitted(document, "m-own")])
        # Then it resolves, with its allocations, four snapshots and three archives asked for
        resolved = watch.wait("migration.resolved", 1)[0]
        assert resolved["migration_id"] == "m-own" and len(resolved["payload"]["jobs"]) == 7
        assert len(watch.wait("snapshot.requested", 4)) == 4
        assert len(watch.wait("archive.requested", 3)) == 3
        assert held_by(service.engine, "m-own") == 16  # committed with migration.resolved
        assert len(watch.of("migration.failed")) == 1
    finally:
        service.stop()
        service.engine.dispose()
        watch.close()

