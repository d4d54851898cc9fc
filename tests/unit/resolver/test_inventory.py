"""The file inventory: the example loads, unknown names and bad files are clear errors."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import yaml

from services.resolver.inventory import (
    DatabaseServer,
    Environment,
    FileInventory,
    UnknownEntityError,
    Vm,
    XenHost,
    open_inventory,
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
