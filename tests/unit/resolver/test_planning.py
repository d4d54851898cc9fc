"""Planning: one job per source, from the inventory, with stable ids and reuse keys."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

from services.resolver.inventory import FileInventory, UnknownEntityError
from services.resolver.planning import PlanningError, plan_archives
from shared.document import validate_document
from tests.unit.resolver.documents import INVENTORY, example_document

Edit = Callable[[dict[str, Any]], None]


def inventory_with(tmp_path: Path, edit: Edit) -> FileInventory:
    data = yaml.safe_load(INVENTORY.read_text())
    edit(data)
    path = tmp_path / "inventory.yaml"
    path.write_text(yaml.safe_dump(data))
    return FileInventory(path)


def test_example_plans_the_seeds_seven_jobs_from_the_inventory() -> None:
    # Given the seed's example and its inventory
    plan = plan_archives(validate_document(example_document()), FileInventory(INVENTORY), "m-1")
    # Then: the four app VMs' roots, the GFS /data, the database and the replica's root
    assert [(j.request_id, j.kind, j.datacenter, j.reuse_key) for j in plan.jobs] == [
        ("m-1:local_fs:1", "local_fs", "ey04", "local_fs:ey04-s50000:/"),
        ("m-1:local_fs:2", "local_fs", "ey04", "local_fs:ey04-s50001:/"),
        ("m-1:local_fs:3", "local_fs", "ey04", "local_fs:ey04-s50002:/"),
        ("m-1:local_fs:4", "local_fs", "ey04", "local_fs:ey04-s50003:/"),
        ("m-1:shared_fs:1", "shared_fs", "ey04", "shared_fs:ey04-e00075:/data"),
        ("m-1:database:1", "database", "ey04", "database:mysql-mega-2-replica:foobar_production"),
        ("m-1:db_server_root:1", "db_server_root", "ey04", "db_server_root:mysql-mega-2-replica"),
    ]
    # And every source comes from the inventory
    shared, database, root = (j.source for j in plan.jobs[4:])
    assert (shared.host, shared.path) == ("root@ey04-s50000.internal", "/data")
    assert (database.host, database.database, database.engine) == (
        "root@mysql-mega-2-replica.internal", "foobar_production", "mysql")
    assert database.label == "foobar_production@mysql-mega-2-replica"
    assert (root.host, root.path, root.excludes) == (
        "root@mysql-mega-2-replica.internal", "/", ("/var/lib/mysql",))
    # And local filesystems are snapshot requests on their Xen hosts; the rest archive requests
    first = plan.snapshots[0]
    assert (first.request_id, first.xen_host, first.device, first.size_bytes, first.driver) == (
        "m-1:local_fs:1", "root@xen-ey04-07.internal", "/dev/vg_ey04/ey04-s50000-root",
        16106127360, "dm")
    assert first.source.label == "ey04-s50000:/"
    assert [s.xen_host for s in plan.snapshots[2:]] == ["root@xen-ey04-12.internal"] * 2
    assert [a.request_id for a in plan.archives] == [j.request_id for j in plan.jobs[4:]]


def test_two_databases_on_one_replica_share_one_root_archive() -> None:
    document = example_document(databases=[
        {"name": name, "old_master": "mysql-mega-2-master", "old_replica": "mysql-mega-2-replica",
         "new_database_group": "db_1"}
        for name in ("foobar_production", "other_customer_production")])
    plan = plan_archives(validate_document(document), FileInventory(INVENTORY), "m-2")
    assert [j.reuse_key for j in plan.jobs if j.kind != "local_fs"] == [
        "shared_fs:ey04-e00075:/data",
        "database:mysql-mega-2-replica:foobar_production",
        "database:mysql-mega-2-replica:other_customer_production",
        "db_server_root:mysql-mega-2-replica",
    ]


@pytest.mark.parametrize("section, entry, says", [
    ("local_filesystems", {"old_vm": "ey04-s59999", "new_vm": "vm_1"},
     "old VM 'ey04-s59999' is not in the inventory"),
    ("shared_filesystems", {"old_environment": "ey04-e09999", "mountpoint": "/data",
                            "new_environment": "env_1"},
     "old environment 'ey04-e09999' is not in the inventory"),
    ("shared_filesystems", {"old_environment": "ey04-e00075", "mountpoint": "/assets",
                            "new_environment": "env_1"},
     "has no shared filesystem at '/assets' in the inventory (it has: /data)"),
    ("databases", {"name": "nope_production", "old_master": "mysql-mega-2-master",
                   "old_replica": "mysql-mega-2-replica", "new_database_group": "db_1"},
     "database 'nope_production' is not on 'mysql-mega-2-replica'"),
    ("databases", {"name": "foobar_production", "old_master": "mysql-mega-2-master",
                   "old_replica": "mysql-mega-9-replica", "new_database_group": "db_1"},
     "database server 'mysql-mega-9-replica' is not in the inventory"),
])
def test_unknown_old_entity_fails_planning_naming_it(section: str, entry: dict[str, Any],
                                                     says: str) -> None:
    document = example_document(**{section: [entry]})
    if section == "shared_filesystems":
        # env_1 must have exactly one VM with the mountpoint (a document rule)
        document["vms"][0]["disks"][1]["filesystems"][0]["mountpoint"] = entry["mountpoint"]
    with pytest.raises(UnknownEntityError) as caught:
        plan_archives(validate_document(document), FileInventory(INVENTORY), "m-3")
    assert says in str(caught.value)


def test_unknown_xen_host_is_named_with_the_vm_that_needs_it(tmp_path: Path) -> None:
    def edit(data: dict[str, Any]) -> None:
        data["vms"]["ey04-s50001"]["xen_host"] = "xen-ey04-99"

    with pytest.raises(UnknownEntityError, match="Xen host 'xen-ey04-99' is not in the "
                       r"inventory \(the Xen host of old VM 'ey04-s50001'\)"):
        plan_archives(validate_document(example_document()), inventory_with(tmp_path, edit), "m")


@pytest.mark.parametrize("edit, says", [
    (lambda d: d["database_servers"]["mysql-mega-2-replica"].update(role="master"),
     "'mysql-mega-2-replica' is a master in the inventory, not a replica"),
    (lambda d: (d["database_servers"]["mysql-mega-2-replica"].update(master="other"),
                d["database_servers"]["mysql-mega-2-master"].update(replicas=[])),
     "'mysql-mega-2-replica' is not a replica of 'mysql-mega-2-master'"),
    (lambda d: d["database_servers"]["mysql-mega-2-replica"].update(engine="postgresql"),
     "is postgresql on 'mysql-mega-2-replica', but its new group runs mysql"),
])
def test_document_contradicting_the_inventory_fails_planning(tmp_path: Path, edit: Edit,
                                                             says: str) -> None:
    with pytest.raises(PlanningError) as caught:
        plan_archives(validate_document(example_document()), inventory_with(tmp_path, edit), "m")
    assert says in str(caught.value)


def test_shared_filesystem_is_taken_on_a_mounting_vm_the_inventory_knows(tmp_path: Path) -> None:
    def edit(data: dict[str, Any]) -> None:
        data["environments"]["ey04-e00075"]["shared_filesystems"][0]["mounted_on"] = [
            "ey04-s50077", "ey04-s50002"]

    plan = plan_archives(validate_document(example_document()), inventory_with(tmp_path, edit),
                         "m")
    assert plan.archives[0].source.host == "root@ey04-s50002.internal"


def test_driver_none_archives_the_inventory_path_as_it_is(tmp_path: Path) -> None:
    def edit(data: dict[str, Any]) -> None:
        data["vms"]["ey04-s50000"]["filesystems"][0].update(snapshot_driver="none",
                                                            path="/srv/quiet-root")

    plan = plan_archives(validate_document(example_document()), inventory_with(tmp_path, edit),
                         "m")
    snapshot = plan.snapshots[0]
    assert snapshot.driver == "none" and snapshot.source.path == "/srv/quiet-root"
    assert snapshot.size_bytes == 16106127360
