"""A document moves only its own customer's things: planning refuses, naming each old entity
of another customer and its owner (an old public IP too), before anything is planned,
allocated or snapshotted; an old IP the inventory does not list is refused as unknown."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

from services.resolver.handlers import fail_migration
from services.resolver.inventory import FileInventory, UnknownEntityError
from services.resolver.planning import NotOwnedError, plan_archives
from shared.document import validate_document
from shared.runtime import deliver_failure
from tests.unit.resolver.documents import (
    EXAMPLE_CUSTOMER,
    INVENTORY,
    example_document,
    example_inventory,
    inventory_for,
)
from tests.unit.resolver.test_resolving import Site, submitted

Edit = Callable[[dict[str, Any]], None]
OTHER = "cust-2077"  # owns other_customer_production on the shared server in the example
REFUSED = f"customer {EXAMPLE_CUSTOMER!r} may move only what it owns: "


def give_vm(data: dict[str, Any]) -> None:
    data["vms"]["ey04-s50001"]["customer"] = OTHER


def give_environment(data: dict[str, Any]) -> None:
    data["environments"]["ey04-e00075"]["customer"] = OTHER


def give_shared_filesystem(data: dict[str, Any]) -> None:
    data["environments"]["ey04-e00075"]["shared_filesystems"][0]["customer"] = OTHER


def give_database(data: dict[str, Any]) -> None:
    for server in data["database_servers"].values():
        server["databases"]["foobar_production"]["customer"] = OTHER


def give_database_servers(data: dict[str, Any]) -> None:
    # a server of one customer (not shared) holds only that customer's databases
    for server in data["database_servers"].values():
        server["customer"] = OTHER
        for database in server["databases"].values():
            database["customer"] = OTHER


def give_public_ip(data: dict[str, Any]) -> None:
    data["public_ips"]["203.0.113.10"]["customer"] = OTHER


def give_everything(data: dict[str, Any]) -> None:
    for edit in (give_vm, give_environment, give_shared_filesystem, give_database,
                 give_public_ip):
        edit(data)


VM = f"old VM 'ey04-s50001' belongs to customer {OTHER!r}"
ENVIRONMENT = f"old environment 'ey04-e00075' belongs to customer {OTHER!r}"
SHARED_FS = (f"shared filesystem '/data' of old environment 'ey04-e00075' belongs to "
             f"customer {OTHER!r}")
DATABASE = [f"database 'foobar_production' on {server!r} belongs to customer {OTHER!r}"
            for server in ("mysql-mega-2-master", "mysql-mega-2-replica")]
PUBLIC_IP = f"old public IP '203.0.113.10' belongs to customer {OTHER!r}"

# (case, the inventory edit giving it to another customer, what the refusal names)
CASES: list[tuple[str, Edit, list[str]]] = [
    ("vm", give_vm, [VM]),
    ("environment", give_environment, [ENVIRONMENT]),
    ("shared filesystem", give_shared_filesystem, [SHARED_FS]),
    ("database", give_database, DATABASE),
    ("database servers", give_database_servers, [
        f"database server 'mysql-mega-2-master' belongs to customer {OTHER!r}", DATABASE[0],
        f"database server 'mysql-mega-2-replica' belongs to customer {OTHER!r}", DATABASE[1]]),
    ("public ip", give_public_ip, [PUBLIC_IP]),
    ("all at once", give_everything, [VM, ENVIRONMENT, SHARED_FS, *DATABASE, PUBLIC_IP]),
]


def inventory_with(tmp_path: Path, edit: Edit | None) -> FileInventory:
    data = example_inventory()
    if edit is not None:
        edit(data)
    path = tmp_path / "inventory.yaml"
    path.write_text(yaml.safe_dump(data))
    return FileInventory(path)


@pytest.mark.parametrize("edit, named", [(e, n) for _, e, n in CASES],
                         ids=[case for case, _, _ in CASES])
def test_document_naming_another_customers_entity_is_refused_naming_each_and_its_owner(
        tmp_path: Path, edit: Edit, named: list[str]) -> None:
    # Given the example inventory with that entity another customer's
    document = validate_document(example_document())
    with pytest.raises(NotOwnedError) as caught:
        plan_archives(document, inventory_with(tmp_path, edit), "m-foreign")
    # Then the refusal names every such entity and its owner, in document order
    assert str(caught.value) == REFUSED + "; ".join(named)
    # And (the negative control) the same document plans once the entity is its customer's
    plan = plan_archives(document, inventory_with(tmp_path, None), "m-own")
    assert len(plan.jobs) == 7


def test_another_customers_database_on_a_shared_server_is_refused() -> None:
    # Given a shared server holding cust-1042's and cust-2077's databases
    document = example_document(databases=[
        {"name": "other_customer_production", "old_master": "mysql-mega-2-master",
         "old_replica": "mysql-mega-2-replica", "new_database_group": "db_1"}])
    # When cust-1042's document names cust-2077's database there
    with pytest.raises(NotOwnedError) as caught:
        plan_archives(validate_document(document), FileInventory(INVENTORY), "m")
    # Then the database is named with its owner; the shared servers are not refused
    assert str(caught.value) == REFUSED + "; ".join(
        f"database 'other_customer_production' on {server!r} belongs to customer {OTHER!r}"
        for server in ("mysql-mega-2-master", "mysql-mega-2-replica"))


def test_another_customers_old_ip_is_refused_naming_it_and_its_owner() -> None:
    # Given the example inventory, where 2001:db8:20::77 is cust-2077's
    document = example_document(ip_equivalences=[
        {"old_ip": "203.0.113.10", "new_public_ip": "ip_1"},
        {"old_ip": "2001:0db8:0020::0077", "new_public_ip": "ip_2"}], public_ips=2)
    # When cust-1042's document maps it (in any spelling) besides its own
    with pytest.raises(NotOwnedError) as caught:
        plan_archives(validate_document(document), FileInventory(INVENTORY), "m")
    # Then the address is named with its owner, and only it
    assert str(caught.value) == REFUSED + (
        f"old public IP '2001:db8:20::77' belongs to customer {OTHER!r}")


def test_old_ip_the_inventory_does_not_list_is_refused_holding_nothing(
        tmp_path: Path) -> None:
    # Given a resolver whose inventory lists cust-1042's old IP 203.0.113.10 only
    site = Site(tmp_path)
    before = site.counters()
    document = example_document(ip_equivalences=[
        {"old_ip": "198.51.100.77", "new_public_ip": "ip_1"}])
    # When cust-1042's document maps an old IP nobody is known to own
    with pytest.raises(UnknownEntityError) as caught:
        site.handle(submitted(document, "m-unlisted"))
    # Then it is refused as unknown, naming the address, before anything is held
    assert str(caught.value) == ("old public IP '198.51.100.77' is not in the inventory (an "
                                 "old IP moves only when the inventory says whose it is)")
    assert site.held_by("m-unlisted") == 0 and site.events() == []
    assert site.counters() == before
    # And (the control) the same document mapping the customer's own old IP resolves
    assert site.handle(submitted(example_document(), "m-listed"))
    assert [e["type"] for e in site.events("m-listed")][0] == "migration.resolved"
    site.engine.dispose()


def test_each_customer_plans_its_own_and_shares_only_the_servers_root(tmp_path: Path) -> None:
    # Given an inventory where cust-1042 and cust-b each own their old site, on one
    # shared database server
    inventory = FileInventory(inventory_for(["cust-b"], tmp_path / "inventory.json"))
    own = plan_archives(validate_document(example_document()), inventory, "m-a")
    other = plan_archives(validate_document(example_document("cust-b")), inventory, "m-b")
    # Then each moves its own sources; the server root is the one job alike for both
    assert {j.source.label for j in own.jobs} & {j.source.label for j in other.jobs} == {
        "mysql-mega-2-replica:/"}
    assert own.jobs[-1].model_dump(exclude={"request_id"}) == other.jobs[-1].model_dump(
        exclude={"request_id"})


def test_refused_migration_holds_nothing_and_its_failure_names_the_owners(
        tmp_path: Path) -> None:
    # Given a resolver whose inventory gives cust-1042's VM, environment, GFS and database
    # to cust-2077
    site = Site(tmp_path)
    give_everything_in(tmp_path / "inventory.yaml")  # the site's
    before = site.counters()
    envelope = submitted(example_document(), "m-foreign")
    # When cust-1042's document is resolved
    with pytest.raises(NotOwnedError) as caught:
        site.handle(envelope)
    # Then nothing is allocated and nothing emitted (no snapshot or archive request)
    assert site.held_by("m-foreign") == 0 and site.events() == []
    assert site.counters() == before
    # And the failure hook says migration.failed once, naming each entity and its owner
    delivered = deliver_failure(fail_migration, envelope.event(), envelope, caught.value,
                                site.units, site.resolver)
    assert delivered is True
    assert [(e["type"], e["payload"]) for e in site.events()] == [(
        "migration.failed",
        {"stage": "resolve", "reason": REFUSED + "; ".join([VM, ENVIRONMENT, SHARED_FS,
                                                            *DATABASE, PUBLIC_IP])})]
    site.engine.dispose()


def give_everything_in(file: Path) -> None:
    data = yaml.safe_load(file.read_text())
    give_everything(data)
    file.write_text(yaml.safe_dump(data) + "# given away\n")
