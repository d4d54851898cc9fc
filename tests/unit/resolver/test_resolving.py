"""resolve_migration on the embedded database (SQLite): allocations, events, idempotency,
exhausted pools and unknown entities."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Engine, func, select

from services.resolver import SCHEMA as RESOLVER_SCHEMA
from services.resolver.allocation import Allocator
from services.resolver.handlers import (
    ConflictingSubmissionError,
    Resolver,
    fail_migration,
    resolve_migration,
)
from services.resolver.inventory import FileInventory, UnknownEntityError
from services.resolver.pools import Pools, seed_pools
from services.resolver.tables import internal_ips, name_sequences, names, public_ips, vlans
from shared.contracts import MigrationSubmitted
from shared.document import DocumentInvalidError
from shared.envelope import Envelope
from shared.inbox_outbox import outbox_table
from shared.runtime import deliver, deliver_failure, open_database
from shared.settings import Settings
from tests.unit.resolver.documents import example_document, inventory_for

CUSTOMERS = ("cust-a", "cust-b", "cust-c")  # besides cust-1042, each with its own old site


class Site:
    """The resolver's handler on a SQLite database of its own, and an inventory in which
    the example's customer and each of CUSTOMERS own their old entities."""

    def __init__(self, tmp_path: Path, **settings: Any) -> None:
        inventory = inventory_for(CUSTOMERS, tmp_path / "inventory.yaml")
        self.settings = Settings(state_dir=tmp_path, inventory=str(inventory), **settings)
        self.units = open_database(self.settings, RESOLVER_SCHEMA)
        self.engine: Engine = self.units.engine
        self.pools = Pools.from_settings(self.settings)
        seed_pools(self.engine, self.pools)
        self.resolver = Resolver(Allocator(self.pools), FileInventory(inventory))

    def handle(self, envelope: Envelope) -> bool:
        """Deliver as the runtime does; False when the inbox had seen the message."""
        event = envelope.event()
        assert isinstance(event, MigrationSubmitted)
        return deliver(resolve_migration, event, envelope, self.units, self.resolver)

    def events(self, migration_id: str | None = None) -> list[dict[str, Any]]:
        with self.engine.connect() as connection:
            bodies = connection.execute(select(outbox_table.c.body, outbox_table.c.routing_key)
                                        .order_by(outbox_table.c.seq)).all()
        found = [{**json.loads(body), "routing_key": key} for body, key in bodies]
        return [e for e in found if migration_id in (None, e["migration_id"])]

    def held_by(self, migration_id: str) -> int:
        with self.engine.connect() as connection:
            return sum(int(connection.execute(select(func.count()).select_from(table)
                                              .where(table.c.migration_id == migration_id))
                           .scalar_one())
                       for table in (names, public_ips, vlans, internal_ips))

    def counters(self) -> dict[str, int]:
        with self.engine.connect() as connection:
            rows = connection.execute(select(name_sequences.c.prefix,
                                             name_sequences.c.next_number)).all()
        return {prefix: number for prefix, number in rows}


def submitted(document: dict[str, Any], migration_id: str) -> Envelope:
    return Envelope.wrap(MigrationSubmitted(customer_id=document["customer"]["id"],
                                            document=document), migration_id=migration_id)


@pytest.fixture
def site(tmp_path: Path) -> Iterator[Site]:
    made = Site(tmp_path)
    yield made
    made.engine.dispose()


def resolved_payload(site: Site, migration_id: str) -> dict[str, Any]:
    events = [e for e in site.events(migration_id) if e["type"] == "migration.resolved"]
    assert len(events) >= 1, site.events(migration_id)
    payload: dict[str, Any] = events[-1]["payload"]
    return payload


def test_seeds_example_resolves_to_the_names_mappings_and_jobs_it_describes(site: Site) -> None:
    # When the seed's example is resolved on a fresh site
    site.handle(submitted(example_document(), "m-example"))
    payload = resolved_payload(site, "m-example")
    allocations, document = payload["allocations"], payload["resolved_document"]
    # Then vm_1..vm_6 are tm21-s00101..106 and env_1/env_2 tm21-e00050/51
    assert {d: v["name"] for d, v in allocations["vms"].items()} == {
        f"vm_{n}": f"tm21-s{100 + n:05d}" for n in range(1, 7)}
    assert allocations["environments"] == {"env_1": "tm21-e00050", "env_2": "tm21-e00051"}
    assert allocations["public_ips"] == {"ip_1": "198.51.100.1"}
    assert allocations["vlan"] == {"id": 100, "subnet": "10.128.100.0/24",
                                   "gateway": "10.128.100.1"}
    assert [v["internal_ip"] for v in allocations["vms"].values()] == [
        f"10.128.100.{n}" for n in range(2, 8)]
    # And the new IP's port 443 maps to tm21-s00101..104 on port 443
    https = document["public_ips"][0]["port_mappings"][0]
    assert document["public_ips"][0]["address"] == "198.51.100.1"
    assert (https["external_port"], https["internal_port"]) == (443, 443)
    assert https["vms"] == ["tm21-s00101", "tm21-s00102", "tm21-s00103", "tm21-s00104"]
    # And tm21-s00105/106 are the MySQL 5.0.51 master and replica
    group = {"engine": "mysql", "version": "5.0.51", "master": "tm21-s00105",
             "replicas": ["tm21-s00106"]}
    assert document["database_groups"] == [group]
    moves = document["migration"]
    assert moves["databases"][0]["new_database_group"] == group
    assert moves["shared_filesystems"] == [{"old_environment": "ey04-e00075",
                                            "mountpoint": "/data",
                                            "new_environment": "tm21-e00050",
                                            "new_vm": "tm21-s00101"}]
    assert moves["local_filesystems"] == [{"old_vm": f"ey04-s5000{n}",
                                           "new_vm": f"tm21-s0010{n + 1}"} for n in range(4)]
    assert moves["ip_equivalences"] == [{"old_ip": "203.0.113.10",
                                         "new_public_ip": "198.51.100.1"}]
    assert "duid" not in json.dumps(document)
    # And the jobs: every archive, and one request per job, routed by datacenter
    assert [j["kind"] for j in payload["jobs"]] == ["local_fs"] * 4 + [
        "shared_fs", "database", "db_server_root"]
    assert [e["routing_key"] for e in site.events("m-example")] == [
        "migration.resolved", *["snapshot.requested"] * 4, *["archive.requested.ey04"] * 3]


def test_redelivered_message_has_one_effect(site: Site) -> None:
    envelope = submitted(example_document(), "m-twice")
    assert site.handle(envelope) is True
    assert site.handle(envelope) is False
    assert len(site.events()) == 8
    assert site.held_by("m-twice") == 6 + 2 + 1 + 1 + 6  # names, IP, VLAN, internal IPs


def test_replayed_migration_gets_the_same_allocations_again(site: Site) -> None:
    # Given a resolved migration
    document = example_document()
    site.handle(submitted(document, "m-replay"))
    first = resolved_payload(site, "m-replay")
    # When migration.submitted for it arrives again as a new message (a replay)
    site.handle(submitted(document, "m-replay"))
    # Then it resolves again to exactly the same allocations, jobs and document
    events = [e for e in site.events("m-replay") if e["type"] == "migration.resolved"]
    assert len(events) == 2 and events[1]["payload"] == first
    assert site.held_by("m-replay") == 16
    assert site.counters() == {"tm21-e": 52, "tm21-s": 107}


def test_submission_reusing_a_migration_id_with_another_document_is_refused(
        site: Site) -> None:
    # Given a resolved migration of cust-a
    site.handle(submitted(example_document("cust-a"), "m-taken"))
    first = resolved_payload(site, "m-taken")
    events_before = len(site.events())
    # When a migration.submitted reuses its id with another customer's document, and with
    # the same customer's document changed (more public IPs)
    for other in (example_document("cust-b"), example_document("cust-a", public_ips=2)):
        envelope = submitted(other, "m-taken")
        with pytest.raises(ConflictingSubmissionError, match="m-taken"):
            site.handle(envelope)
        # Then the failure hook says nothing about the migration that has the id
        deliver_failure(fail_migration, envelope.event(), envelope,
                        ConflictingSubmissionError("refused"), site.units, site.resolver)
    # And nothing of it changed: allocations, what it holds, no event
    assert len(site.events()) == events_before
    assert resolved_payload(site, "m-taken") == first
    assert site.held_by("m-taken") == 16


def test_customers_second_migration_keeps_its_vlan_and_gets_fresh_names(site: Site) -> None:
    site.handle(submitted(example_document("cust-a"), "m-a1"))
    site.handle(submitted(example_document("cust-b"), "m-b1"))
    site.handle(submitted(example_document("cust-a"), "m-a2"))
    a1, b1, a2 = (resolved_payload(site, m)["allocations"] for m in ("m-a1", "m-b1", "m-a2"))
    assert a1["vlan"] == a2["vlan"] != b1["vlan"]
    assert a2["vms"]["vm_1"] == {"name": "tm21-s00113", "internal_ip": "10.128.100.8"}
    assert a2["environments"]["env_1"] == "tm21-e00054"


def test_exhausted_pool_fails_the_migration_holding_nothing(tmp_path: Path) -> None:
    # Given a public IP pool of two addresses, one of them taken
    site = Site(tmp_path, public_ip_pool="198.51.100.0/30")
    site.handle(submitted(example_document("cust-a"), "m-1"))
    before = site.counters()
    # When a migration needs two
    envelope = submitted(example_document("cust-b", public_ips=2), "m-2")
    site.handle(envelope)
    # Then it fails naming the pool, and holds no name, IP, VLAN or internal IP
    failed = site.events("m-2")
    assert [e["type"] for e in failed] == ["migration.failed"]
    assert failed[0]["payload"] == {
        "stage": "resolve",
        "reason": "public IP pool 198.51.100.0/30 exhausted: 2 needed, 1 free"}
    assert site.held_by("m-2") == 0 and site.counters() == before
    # And a redelivery of it says so only once
    assert site.handle(envelope) is False
    assert len(site.events("m-2")) == 1
    # And the next migration gets the free address and the very next names
    site.handle(submitted(example_document("cust-c"), "m-3"))
    third = resolved_payload(site, "m-3")["allocations"]
    assert third["public_ips"] == {"ip_1": "198.51.100.2"}
    assert third["vms"]["vm_1"]["name"] == "tm21-s00107"
    site.engine.dispose()


def test_name_sequence_running_out_of_five_digits_is_an_exhausted_pool(tmp_path: Path) -> None:
    site = Site(tmp_path, vm_first_number=99998)
    site.handle(submitted(example_document(), "m-1"))
    assert site.events("m-1")[0]["payload"]["reason"] == (
        "name sequence tm21-sNNNNN exhausted: 6 needed, 2 free")
    assert site.held_by("m-1") == 0
    site.engine.dispose()


def test_unknown_old_vm_fails_before_anything_is_allocated(site: Site) -> None:
    document = example_document(local_filesystems=[{"old_vm": "ey04-s59999", "new_vm": "vm_1"}])
    envelope = submitted(document, "m-unknown")
    with pytest.raises(UnknownEntityError, match="old VM 'ey04-s59999'") as caught:
        site.handle(envelope)
    assert site.held_by("m-unknown") == 0 and site.events() == []
    # When the bus gives up on it, the failure hook says so once, naming the VM
    delivered = [deliver_failure(fail_migration, envelope.event(), envelope, caught.value,
                                 site.units, site.resolver) for _ in range(2)]
    assert delivered == [True, False]
    assert [e["payload"] for e in site.events()] == [{
        "stage": "resolve", "reason": "old VM 'ey04-s59999' is not in the inventory"}]


def test_invalid_document_is_a_permanent_error_listing_its_problems(site: Site) -> None:
    document = example_document()
    document["vms"][0]["memory_mib"] = 0
    with pytest.raises(DocumentInvalidError, match="/vms/0/memory_mib"):
        site.handle(submitted(document, "m-bad"))
    assert site.held_by("m-bad") == 0


def test_shrunk_pool_drops_free_addresses_and_keeps_taken_ones(site: Site) -> None:
    site.handle(submitted(example_document(), "m-1"))
    smaller = Pools.from_settings(Settings(public_ip_pool="198.51.100.200-198.51.100.201"))
    seed_pools(site.engine, smaller)
    seed_pools(site.engine, smaller)
    with site.engine.connect() as connection:
        rows = connection.execute(select(public_ips.c.address, public_ips.c.migration_id)
                                  .order_by(public_ips.c.position)).all()
    assert sorted(tuple(r) for r in rows) == [("198.51.100.1", "m-1"),
                                                ("198.51.100.200", None),
                                                ("198.51.100.201", None)]


def test_exhausted_vlan_range_and_internal_subnet_name_their_pool(tmp_path: Path) -> None:
    # Given one VLAN, with a /29 (five addresses for VMs)
    site = Site(tmp_path, vlan_range="100", internal_subnet_prefix=29)
    # When a customer needs six VMs in it
    site.handle(submitted(example_document("cust-a"), "m-a"))
    # Then the subnet is the pool that ran out
    assert site.events("m-a")[0]["payload"]["reason"] == (
        "internal subnet 10.128.3.32/29 of VLAN 100 exhausted: 6 needed, 5 free")
    # When another customer takes the only VLAN with a smaller migration, and a third comes
    def small(customer: str) -> dict[str, Any]:
        document = example_document(customer)
        document["environments"][1]["vms"] = []
        document["vms"] = document["vms"][:4]
        document["database_groups"], document["migration"]["databases"] = [], []
        return document

    site.handle(submitted(small("cust-b"), "m-b"))
    assert resolved_payload(site, "m-b")["allocations"]["vlan"]["id"] == 100
    site.handle(submitted(small("cust-c"), "m-c"))
    # Then the VLAN range is the pool that ran out, and the failures hold nothing
    assert site.events("m-c")[0]["payload"]["reason"] == (
        "VLAN range 100 exhausted: 1 needed, 0 free")
    assert site.held_by("m-a") == site.held_by("m-c") == 0
    site.engine.dispose()
