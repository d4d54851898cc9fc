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
    UnknownEntityError,
    Vm,
    XenHost,
    open_inventory,
    reference_problems,
)
from services.resolver.inventory_http import HttpInventory
from shared.errors import ConfigurationError
from shared.settings import Settings
from tests.unit.resolver.documents import INVENTORY


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
    ]
