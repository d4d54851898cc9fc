"""The file inventory: the example loads, unknown names and bad files are clear errors."""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

from services.resolver.inventory import (
    DatabaseServer,
    Environment,
    FileInventory,
    InventoryInvalidError,
    PublicIp,
    UnknownEntityError,
    Vm,
    XenHost,
    open_inventory,
    reference_problems,
)
from services.resolver.inventory_http import HttpInventory
from shared.errors import ConfigurationError
from shared.settings import Settings
from tests.unit.resolver.documents import EXAMPLE, EXAMPLE_CUSTOMER, INVENTORY


def test_example_inventory_describes_every_old_entity_of_the_example_document() -> None:
    inventory = FileInventory(INVENTORY)
    for name in ("ey04-s50000", "ey04-s50001", "ey04-s50002", "ey04-s50003"):
        vm = inventory.lookup(Vm, name)
        assert vm.datacenter == "ey04" and vm.filesystems[0].mountpoint == "/"
        assert inventory.lookup(XenHost, vm.xen_host).datacenter == "ey04"
    data = inventory.lookup(Environment, "ey04-e00075").shared_filesystems[0]
    assert data.mountpoint == "/data"
    replica = inventory.lookup(DatabaseServer, "mysql-mega-2-replica")
    assert replica.role == "replica" and replica.master == "mysql-mega-2-master"
    assert "foobar_production" in replica.databases
    # and each old IP the example maps, its customer's, forwarding to the VMs it moves
    for equivalence in EXAMPLE["migration"]["ip_equivalences"]:
        ip = inventory.lookup(PublicIp, equivalence["old_ip"])
        assert ip.customer == EXAMPLE_CUSTOMER and ip.datacenter == "ey04"
        assert ip.backing_vms == ("ey04-s50000", "ey04-s50001", "ey04-s50002", "ey04-s50003")
        assert [(m.protocol, m.external_port) for m in ip.port_mappings] == [
            ("tcp", 443), ("tcp", 80)]


def test_public_ip_is_keyed_by_its_address_in_one_spelling(tmp_path: Path) -> None:
    # Given an inventory listing an IPv6 address spelled long-hand
    data = yaml.safe_load(INVENTORY.read_text())
    data["public_ips"]["2001:DB8:0:0::10"] = data["public_ips"].pop("203.0.113.10")
    file = tmp_path / "inventory.yaml"
    file.write_text(yaml.safe_dump(data))
    # Then it is found by the spelling a document's old_ip has (intake writes one)
    inventory = FileInventory(file)
    assert inventory.lookup(PublicIp, "2001:db8::10").customer == EXAMPLE_CUSTOMER
    with pytest.raises(UnknownEntityError,
                       match="old public IP '203.0.113.10' is not in the inventory"):
        inventory.lookup(PublicIp, "203.0.113.10")


def test_unknown_name_is_an_unknown_entity_error_naming_it() -> None:
    inventory = FileInventory(INVENTORY)
    with pytest.raises(UnknownEntityError, match="old VM 'ey04-s59999' is not in the inventory"):
        inventory.lookup(Vm, "ey04-s59999")


def test_misspelt_field_in_an_inventory_file_is_refused_at_start(tmp_path: Path) -> None:
    data = yaml.safe_load(INVENTORY.read_text())
    data["vms"]["ey04-s50000"]["filesystems"][0]["snapshot_drvier"] = "lvm"
    path = tmp_path / "inventory.yaml"
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(ConfigurationError,
                       match=r"vms\.ey04-s50000\.filesystems\.0\.snapshot_drvier: Extra"):
        FileInventory(path)


def test_address_that_is_not_local_or_user_at_host_port_is_refused(tmp_path: Path) -> None:
    data = yaml.safe_load(INVENTORY.read_text())
    data["vms"]["ey04-s50000"]["ssh"] = "root@host; rm -rf /"
    path = tmp_path / "inventory.json"
    path.write_text(json.dumps(data))
    with pytest.raises(ConfigurationError, match="not a host address"):
        FileInventory(path)


def test_changed_file_is_read_again_without_a_restart(tmp_path: Path) -> None:
    # Given a file inventory that lacks a VM
    path = tmp_path / "inventory.yaml"
    path.write_text(INVENTORY.read_text())
    inventory = FileInventory(path)
    with pytest.raises(UnknownEntityError):
        inventory.lookup(Vm, "ey04-s50009")
    # When an operator adds it
    data = yaml.safe_load(INVENTORY.read_text())
    data["vms"]["ey04-s50009"] = data["vms"]["ey04-s50000"]
    path.write_text(yaml.safe_dump(data))
    os.utime(path, ns=(1, 1))  # a different stamp even within one clock tick
    # Then the next lookup finds it
    assert inventory.lookup(Vm, "ey04-s50009").xen_host == "xen-ey04-07"


def test_ferry_inventory_chooses_the_adapter() -> None:
    assert isinstance(open_inventory(Settings(inventory=str(INVENTORY))), FileInventory)
    http = open_inventory(Settings(inventory="http://127.0.0.1:9/api"))
    assert isinstance(http, HttpInventory)
    http.close()
    with pytest.raises(ConfigurationError, match="FERRY_INVENTORY is not set"):
        open_inventory(Settings())
    with pytest.raises(ConfigurationError, match="No such file"):
        open_inventory(Settings(inventory="/nonexistent/inventory.yaml"))


def _without(data: dict[str, Any], *path: str | int) -> None:
    entity: Any = data
    for key in path:
        entity = entity[key]
    del entity["customer"]


@pytest.mark.parametrize("path, named", [
    (("vms", "ey04-s50000"), "vms.ey04-s50000.customer"),
    (("environments", "ey04-e00075"), "environments.ey04-e00075.customer"),
    (("environments", "ey04-e00075", "shared_filesystems", 0),
     "environments.ey04-e00075.shared_filesystems.0.customer"),
    (("database_servers", "mysql-mega-2-replica"),
     "database_servers.mysql-mega-2-replica.customer"),
    (("database_servers", "mysql-mega-2-replica", "databases", "foobar_production"),
     "database_servers.mysql-mega-2-replica.databases.foobar_production.customer"),
    (("public_ips", "203.0.113.10"), "public_ips.203.0.113.10.customer"),
])
def test_entity_without_an_owner_is_an_inventory_error_naming_it(
        tmp_path: Path, path: tuple[str | int, ...], named: str) -> None:
    # Given the example inventory with one entity's owner left out
    data = yaml.safe_load(INVENTORY.read_text())
    _without(data, *path)
    file = tmp_path / "inventory.yaml"
    file.write_text(yaml.safe_dump(data))
    # Then reading it is an inventory error naming the entity (and, read at start, a
    # configuration error that stops the resolver)
    with pytest.raises(InventoryInvalidError) as caught:
        FileInventory(file)
    assert isinstance(caught.value, ConfigurationError)
    assert f"{named}: no owner: `customer` is required" in str(caught.value)


def test_owner_left_out_of_a_file_already_read_fails_the_next_lookup(tmp_path: Path) -> None:
    # Given a file inventory in use
    file = tmp_path / "inventory.yaml"
    file.write_text(INVENTORY.read_text())
    inventory = FileInventory(file)
    # When an operator's edit leaves a VM's owner out
    data = yaml.safe_load(INVENTORY.read_text())
    _without(data, "vms", "ey04-s50002")
    file.write_text(yaml.safe_dump(data))
    os.utime(file, ns=(1, 1))
    # Then the next lookup is an inventory error (permanent: the migration fails) naming it
    with pytest.raises(InventoryInvalidError, match=r"vms\.ey04-s50002\.customer: no owner"):
        inventory.lookup(Vm, "ey04-s50000")


@pytest.mark.parametrize("edit, says", [
    (lambda d: d["vms"]["ey04-s50000"].update(customer="shared"),
     "'shared' owns only database servers"),
    (lambda d: d["database_servers"]["mysql-mega-2-replica"].update(customer="cust-1042"),
     "database 'other_customer_production' belongs to customer 'cust-2077' on a server of "
     "customer 'cust-1042'"),
    (lambda d: d["database_servers"]["mysql-mega-2-replica"]["customer_paths"].update(
        {"cust-1042": ["/"]}), "customer_paths of 'cust-1042' names '/'"),
    (lambda d: d["database_servers"]["mysql-mega-2-replica"]["customer_paths"].update(
        {"cust-1042": ["var/x"]}), "not absolute"),
    (lambda d: d["public_ips"]["203.0.113.10"].update(customer="shared"),
     "public_ips.203.0.113.10.customer: Value error, 'shared' owns only database servers"),
    (lambda d: d["public_ips"]["203.0.113.10"]["port_mappings"][1].update(external_port=443),
     "public_ips.203.0.113.10: Value error, tcp port 443 is mapped twice"),
    (lambda d: d["public_ips"].update(
        {"2001:DB8:20:0::77": d["public_ips"]["2001:db8:20::77"]}),
     # (safe_dump sorts the keys: the long spelling comes first)
     "public_ips: Value error, public IP '2001:db8:20::77' is listed twice (also as "
     "'2001:DB8:20:0::77')"),
    (lambda d: d["public_ips"].update({"203.0.113.300": d["public_ips"]["203.0.113.10"]}),
     "public_ips.203.0.113.300.[key]: Value error, '203.0.113.300' is not an IPv4 or IPv6"),
    (lambda d: d["public_ips"]["203.0.113.10"]["port_mappings"][0].update(vms=[]),
     "public_ips.203.0.113.10.port_mappings.0.vms: Tuple should have at least 1 item"),
])
def test_owners_that_cannot_be_are_refused(tmp_path: Path, edit: Callable[[Any], Any],
                                           says: str) -> None:
    data = yaml.safe_load(INVENTORY.read_text())
    edit(data)
    file = tmp_path / "inventory.yaml"
    file.write_text(yaml.safe_dump(data))
    with pytest.raises(InventoryInvalidError, match=re.escape(says)):
        FileInventory(file)


def test_check_reports_entities_naming_another_customers(tmp_path: Path) -> None:
    data = yaml.safe_load(INVENTORY.read_text())
    data["vms"]["ey04-s50003"]["customer"] = "cust-2077"
    data["database_servers"]["mysql-mega-2-master"]["customer"] = "cust-2077"
    data["database_servers"]["mysql-mega-2-master"]["databases"] = {}
    file = tmp_path / "inventory.yaml"
    file.write_text(yaml.safe_dump(data))
    assert reference_problems(FileInventory(file).document()) == [
        "environment 'ey04-e00075' of customer 'cust-1042' names VM 'ey04-s50003' of "
        "customer 'cust-2077'",
        "shared filesystem ey04-e00075:/data of customer 'cust-1042' names VM 'ey04-s50003' "
        "of customer 'cust-2077'",
        "replica 'mysql-mega-2-replica' belongs to 'shared', its master "
        "'mysql-mega-2-master' to 'cust-2077'",
        "public IP '203.0.113.10' of customer 'cust-1042' names VM 'ey04-s50003' of customer "
        "'cust-2077'",
    ]


def test_check_reports_a_public_ip_forwarding_to_what_it_cannot(tmp_path: Path) -> None:
    # Given the example's IP forwarding also to another customer's VM, to one the inventory
    # lacks, and to one in another datacenter
    data = yaml.safe_load(INVENTORY.read_text())
    data["vms"]["ey04-s59000"] = {**data["vms"]["ey04-s50000"], "customer": "cust-2077"}
    data["vms"]["ey02-s10000"] = {**data["vms"]["ey04-s50000"], "datacenter": "ey02"}
    data["public_ips"]["203.0.113.10"]["port_mappings"][0]["vms"] += [
        "ey04-s59000", "ey04-s59999", "ey02-s10000"]
    file = tmp_path / "inventory.yaml"
    file.write_text(yaml.safe_dump(data))
    # Then `ferry inventory check` names each
    assert reference_problems(FileInventory(file).document()) == [
        "public IP '203.0.113.10' of customer 'cust-1042' names VM 'ey04-s59000' of customer "
        "'cust-2077'",
        "public IP '203.0.113.10' names VM 'ey04-s59999', which the inventory lacks",
        "public IP '203.0.113.10' in datacenter 'ey04' forwards to VM 'ey02-s10000' in 'ey02'",
    ]
    # And (the control) the example's own IPs are sound
    assert reference_problems(FileInventory(INVENTORY).document()) == []
