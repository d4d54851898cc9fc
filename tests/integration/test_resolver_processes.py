"""Three resolver processes on one PostgreSQL, fed by RabbitMQ: nothing allocated twice,
and an exhausted pool fails only the migration that ran out."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import create_engine, text

from services.resolver.bootstrap import NAME
from services.resolver.handlers import HANDLERS, fail_migration, resolve_migration
from shared.bus import connect, declare_topology
from shared.runtime import handler_name, routing_keys
from shared.topology import QueueSpec
from tests.integration.test_resolver_backbone import (
    Watch,
    held_by,
    publish_all,
    resolver_settings,
    submitted,
)
from tests.support.helpers import wait_for
from tests.support.processes import ChildProcess
from tests.unit.resolver.documents import example_document, inventory_for

StartResolvers = Callable[..., list[ChildProcess]]


@pytest.fixture
def start_resolvers(tmp_path: Path, processes: list[ChildProcess]) -> StartResolvers:
    """Starts `count` resolver processes (`python -m services.resolver`) and waits until
    each said it started; the `processes` fixture ends them."""

    def start(count: int, broker_url: str, db_url: str, **env: str) -> list[ChildProcess]:
        # The queue exists before anything is published, so nothing is routed nowhere.
        declare_topology(broker_url, QueueSpec(NAME, routing_keys(HANDLERS)),
                         resolver_settings(broker_url, db_url, tmp_path))
        # every customer these tests migrate owns its own copy of the example's old site
        inventory = inventory_for([*(f"cust-{n:02d}" for n in range(30)),
                                   *(f"cust-big-{n}" for n in range(4))],
                                  tmp_path / "inventory.json")
        environment = {"FERRY_BROKER_URL": broker_url, "FERRY_RESOLVER_DATABASE_URL": db_url,
                       "FERRY_INVENTORY": str(inventory), "FERRY_STATE_DIR": str(tmp_path),
                       "FERRY_OUTBOX_POLL_SECONDS": "0.1", "FERRY_RETRY_DELAYS": "0.2,0.5",
                       **env}
        batch = [ChildProcess("services.resolver", env=environment,
                              log=tmp_path / f"resolver-{len(processes) + n}.log")
                 for n in range(count)]
        processes.extend(batch)
        for process in batch:  # started together, waited for one after the other
            process.wait_ready("resolver: started")
        return batch

    return start


def rows(db_url: str, sql: str, **params: Any) -> list[tuple[Any, ...]]:
    engine = create_engine(db_url)
    with engine.connect() as connection:
        found = [tuple(row) for row in connection.execute(text(sql), params)]
    engine.dispose()
    return found


def settled(broker_url: str, db_url: str, messages: int) -> None:
    """Wait until the resolvers handled `messages` messages (each commits its inbox row
    before the ack) and published everything they emitted (marked only once the broker
    confirmed it); then check nothing waits in their queue and no failure hook ran. After
    this, every event there will be is in a watch queue."""
    resolve, fail = handler_name(resolve_migration), handler_name(fail_migration)
    wait_for(lambda: rows(db_url, "SELECT count(*) FROM inbox WHERE handler = :h",
                          h=resolve) == [(messages,)], timeout=60, what="every message handled")
    wait_for(lambda: rows(db_url, "SELECT count(*) FROM outbox WHERE published_at IS NULL")
             == [(0,)], timeout=60, what="the outbox published")
    assert rows(db_url, "SELECT count(*) FROM inbox WHERE handler = :h", h=fail) == [(0,)]
    with connect(broker_url) as connection:
        channel = connection.channel()
        declared = channel.queue_declare(NAME, passive=True)
        channel.close()
    assert declared.message_count == 0, declared


def test_forty_migrations_on_three_processes_allocate_nothing_twice(
    rabbit_url: str, pg_url: str, start_resolvers: StartResolvers,
) -> None:
    # Given 3 resolver processes on one database, and 30 customers, 10 of them migrating twice
    start_resolvers(3, rabbit_url, pg_url)
    watch = Watch(rabbit_url)
    customers = [f"cust-{n % 30:02d}" for n in range(40)]
    envelopes = [submitted(example_document(c, public_ips=1 + n % 2), f"m-{n:02d}")
                 for n, c in enumerate(customers)]
    # When all 40 are submitted at once
    publish_all(rabbit_url, envelopes)
    # Then all 40 are resolved
    resolved = {e["migration_id"]: e["payload"]
                for e in watch.wait("migration.resolved", 40, timeout=120)}
    assert sorted(resolved) == [f"m-{n:02d}" for n in range(40)]
    settled(rabbit_url, pg_url, 40)
    assert watch.of("migration.failed") == [] and len(watch.of("migration.resolved")) == 40
    # And over the tables: no name, number, public IP, VLAN or internal IP taken twice
    for sql in (
        "SELECT name FROM names GROUP BY name HAVING count(*) > 1",
        "SELECT prefix, number FROM names GROUP BY prefix, number HAVING count(*) > 1",
        "SELECT address FROM public_ips WHERE migration_id IS NOT NULL GROUP BY address"
        " HAVING count(*) > 1",
        "SELECT customer_id FROM vlans WHERE customer_id IS NOT NULL GROUP BY customer_id"
        " HAVING count(*) > 1",
        "SELECT subnet FROM vlans GROUP BY subnet HAVING count(*) > 1",
        "SELECT address FROM internal_ips WHERE migration_id IS NOT NULL GROUP BY address"
        " HAVING count(*) > 1",
        # every internal IP lies in its customer's VLAN
        "SELECT i.address FROM internal_ips i JOIN vlans v ON v.id = i.vlan_id"
        " WHERE i.migration_id IS NOT NULL AND NOT (i.address::inet << v.subnet::cidr)",
    ):
        assert rows(pg_url, sql) == [], sql
    # And names were numbered without a gap: 240 VMs from 101, 80 environments from 50
    assert rows(pg_url, "SELECT prefix, min(number), max(number), count(*) FROM names"
                        " GROUP BY prefix ORDER BY prefix") == [
        ("tm21-e", 50, 129, 80), ("tm21-s", 101, 340, 240)]
    assert rows(pg_url, "SELECT count(*) FROM vlans WHERE customer_id IS NOT NULL") == [(30,)]
    assert rows(pg_url, "SELECT count(*) FROM public_ips WHERE migration_id IS NOT NULL") == [
        (60,)]
    # And what the 40 events announce agrees: every entity distinct, one VLAN per customer
    allocations = [resolved[e.migration_id]["allocations"] for e in envelopes]
    vm_names = [vm["name"] for a in allocations for vm in a["vms"].values()]
    internal = [vm["internal_ip"] for a in allocations for vm in a["vms"].values()]
    addresses = [ip for a in allocations for ip in a["public_ips"].values()]
    env_names = [name for a in allocations for name in a["environments"].values()]
    for announced in (vm_names, internal, addresses, env_names):
        assert len(announced) == len(set(announced))
    vlan_of: dict[str, set[int]] = {}
    for customer, allocation in zip(customers, allocations, strict=True):
        vlan_of.setdefault(customer, set()).add(allocation["vlan"]["id"])
    assert all(len(ids) == 1 for ids in vlan_of.values())
    assert len({ids.pop() for ids in vlan_of.values()}) == 30
    watch.close()


def test_pool_exhausted_mid_way_fails_that_migration_only_holding_nothing(
    rabbit_url: str, pg_url: str, start_resolvers: StartResolvers,
) -> None:
    # Given ten public IPs, 20 migrations needing none and 4 needing 3 each, on 3 processes
    start_resolvers(3, rabbit_url, pg_url,
                    FERRY_PUBLIC_IP_POOL="198.51.100.1-198.51.100.10")
    watch = Watch(rabbit_url)
    big = {f"m-big-{n}" for n in range(4)}
    envelopes = [submitted(example_document(f"cust-{n:02d}", public_ips=0), f"m-{n:02d}")
                 for n in range(20)]
    for n, migration_id in enumerate(sorted(big)):
        envelopes.insert(4 + 5 * n, submitted(example_document(f"cust-big-{n}", public_ips=3),
                                              migration_id))
    # When all are submitted at once
    publish_all(rabbit_url, envelopes)
    # Then exactly one of the big ones fails, naming the pool and what was missing
    failed = watch.wait("migration.failed", 1, timeout=120)
    resolved = watch.wait("migration.resolved", 23, timeout=120)
    # And nothing more comes: every message was handled once, all it emitted is published
    settled(rabbit_url, pg_url, len(envelopes))
    assert len(watch.of("migration.failed")) == 1 and len(watch.of("migration.resolved")) == 23
    loser = failed[0]["migration_id"]
    assert loser in big
    assert failed[0]["payload"] == {
        "stage": "resolve",
        "reason": "public IP pool 198.51.100.1-198.51.100.10 exhausted: 3 needed, 1 free"}
    # And it holds nothing: no name, IP, VLAN or internal IP
    engine = create_engine(pg_url)
    assert held_by(engine, loser) == 0
    engine.dispose()
    assert rows(pg_url, "SELECT count(*) FROM resolutions WHERE migration_id = :m",
                m=loser) == [(0,)]
    # And the others got everything: 9 IPs taken, one left free, names without a gap
    assert rows(pg_url, "SELECT count(*) FROM public_ips WHERE migration_id IS NULL") == [(1,)]
    assert {e["migration_id"] for e in resolved} == {e.migration_id for e in envelopes} - {loser}
    assert rows(pg_url, "SELECT min(number), max(number), count(*) FROM names"
                        " WHERE prefix = 'tm21-s'") == [(101, 101 + 23 * 6 - 1, 23 * 6)]
    watch.close()
