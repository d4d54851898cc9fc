"""Planning: one job per source, from the inventory, with stable ids and reuse keys."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

from services.resolver.inventory import FileInventory, M, UnknownEntityError
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
        ("m-1:local_fs:1", "local_fs", "ey04", "local_fs:m-1:ey04-s50000:/"),
        ("m-1:local_fs:2", "local_fs", "ey04", "local_fs:m-1:ey04-s50001:/"),
        ("m-1:local_fs:3", "local_fs", "ey04", "local_fs:m-1:ey04-s50002:/"),
        ("m-1:local_fs:4", "local_fs", "ey04", "local_fs:m-1:ey04-s50003:/"),
        ("m-1:shared_fs:1", "shared_fs", "ey04", "shared_fs:m-1:ey04-e00075:/data"),
        ("m-1:database:1", "database", "ey04",
         "database:m-1:mysql-mega-2-replica:foobar_production"),
        ("m-1:db_server_root:1", "db_server_root", "ey04",
         "db_server_root:ey04:mysql-mega-2-replica:/:scrub-63ec66ae1e58"),
    ]
    # And every source comes from the inventory
    local = plan.jobs[0].source
    assert (local.fs_type, local.used_bytes) == ("reiserfs", 6442450944)
    shared, database, root = (j.source for j in plan.jobs[4:])
    assert (shared.host, shared.path, shared.used_bytes) == (
        "root@ey04-s50000.internal", "/data", 32212254720)
    assert shared.alternates == tuple(f"root@ey04-s5000{n}.internal" for n in (1, 2, 3))
    assert (database.host, database.database, database.engine, database.used_bytes) == (
        "root@mysql-mega-2-replica.internal", "foobar_production", "mysql", 8589934592)
    assert database.label == "foobar_production@mysql-mega-2-replica"
    # And the shared server's root leaves out the data directory and every customer's paths
    assert (root.host, root.path, root.used_bytes) == (
        "root@mysql-mega-2-replica.internal", "/", 3221225472)
    assert root.excludes == ("/var/lib/mysql", "/etc/mysql/conf.d/foobar.cnf",
                             "/var/backups/mysql/foobar", "/var/backups/mysql/other_customer")
    assert (shared.fs_type, database.fs_type, root.fs_type) == (None, None, None)
    # And local filesystems are snapshot requests on their Xen hosts; the rest archive requests
    first = plan.snapshots[0]
    assert (first.request_id, first.xen_host, first.device, first.size_bytes, first.driver) == (
        "m-1:local_fs:1", "root@xen-ey04-07.internal", "/dev/vg_ey04/ey04-s50000-root",
        16106127360, "dm")
    assert first.source.label == "ey04-s50000:/"
    assert [s.xen_host for s in plan.snapshots[2:]] == ["root@xen-ey04-12.internal"] * 2
    assert [a.request_id for a in plan.archives] == [j.request_id for j in plan.jobs[4:]]


def test_two_databases_on_one_replica_share_one_root_archive(tmp_path: Path) -> None:
    def edit(data: dict[str, Any]) -> None:
        for server in data["database_servers"].values():
            server["databases"]["other_customer_production"]["customer"] = "cust-1042"

    document = example_document(databases=[
        {"name": name, "old_master": "mysql-mega-2-master", "old_replica": "mysql-mega-2-replica",
         "new_database_group": "db_1"}
        for name in ("foobar_production", "other_customer_production")])
    plan = plan_archives(validate_document(document), inventory_with(tmp_path, edit), "m-2")
    assert [j.reuse_key for j in plan.jobs if j.kind != "local_fs"] == [
        "shared_fs:m-2:ey04-e00075:/data",
        "database:m-2:mysql-mega-2-replica:foobar_production",
        "database:m-2:mysql-mega-2-replica:other_customer_production",
        "db_server_root:ey04:mysql-mega-2-replica:/:scrub-63ec66ae1e58",
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


def test_only_a_servers_root_keeps_its_reuse_key_from_one_migration_to_the_next() -> None:
    # Given the same customer's document planned for two migrations (a second attempt)
    document = validate_document(example_document())
    first, second = (plan_archives(document, FileInventory(INVENTORY), m)
                     for m in ("m-1", "m-2"))
    keys = [(a.kind, a.reuse_key == b.reuse_key) for a, b in zip(first.jobs, second.jobs,
                                                                    strict=True)]
    # Then every source but the database server's root gets a key of its own migration, so
    # the second archives afresh; the root is one archive per datacenter, server and root
    assert keys == [("local_fs", False)] * 4 + [("shared_fs", False), ("database", False),
                                                 ("db_server_root", True)]
    # And a replay of one migration plans the very same keys (the archiver coalesces them)
    assert plan_archives(document, FileInventory(INVENTORY), "m-1") == first


def test_a_reuse_key_longer_than_the_archivers_column_is_bounded_and_still_distinct(
        tmp_path: Path) -> None:
    deep = "/" + "/".join(["d" * 60] * 8)

    def edit(data: dict[str, Any]) -> None:
        data["vms"]["ey04-s50000"]["filesystems"][0]["mountpoint"] = deep
        data["vms"]["ey04-s50001"]["filesystems"][0]["mountpoint"] = deep + "x"

    plan = plan_archives(validate_document(example_document()), inventory_with(tmp_path, edit),
                         "m")
    first, second = plan.jobs[0].reuse_key, plan.jobs[1].reuse_key
    assert len(first) == len(second) == 255 and first != second
    assert first.startswith("local_fs:m:ey04-s50000:/ddd")


def test_shared_filesystem_alternates_are_the_later_mounting_vms_of_its_datacenter(
        tmp_path: Path) -> None:
    def edit(data: dict[str, Any]) -> None:
        data["datacenters"]["ey02"] = {}
        data["vms"]["ey04-s50002"]["datacenter"] = "ey02"  # not reachable from ey04's archiver
        data["xen_hosts"]["xen-ey04-12"]["datacenter"] = "ey02"
        data["environments"]["ey04-e00075"]["shared_filesystems"][0]["mounted_on"] = [
            "ey04-s50077", "ey04-s50001", "ey04-s50003", "ey04-s50088", "ey04-s50002",
            "ey04-s50000"]

    document = example_document(local_filesystems=[])
    plan = plan_archives(validate_document(document), inventory_with(tmp_path, edit), "m")
    shared = plan.archives[0].source
    assert shared.host == "root@ey04-s50001.internal"
    assert shared.alternates == ("root@ey04-s50003.internal", "root@ey04-s50000.internal")


def test_a_dedicated_server_root_leaves_out_its_data_dir_and_customer_paths(
        tmp_path: Path) -> None:
    def edit(data: dict[str, Any]) -> None:
        replica = data["database_servers"]["mysql-mega-2-replica"]
        replica.update(customer="cust-1042", root="/srv/root", customer_paths={
            "cust-1042": ["/var/lib/mysql", "/home/foobar"]})
        del replica["databases"]["other_customer_production"]
        del replica["root_used_bytes"]

    plan = plan_archives(validate_document(example_document()), inventory_with(tmp_path, edit),
                         "m")
    root = plan.jobs[-1]
    assert root.reuse_key.startswith("db_server_root:ey04:mysql-mega-2-replica:/srv/root:scrub-")
    assert root.source.excludes == ("/var/lib/mysql", "/home/foobar")  # each once
    assert root.source.used_bytes == 0


def test_a_changed_scrub_list_makes_the_server_root_a_new_archive(tmp_path: Path) -> None:
    def key(edit: Edit) -> str:
        plan = plan_archives(validate_document(example_document()),
                             inventory_with(tmp_path, edit), "m")
        return plan.jobs[-1].reuse_key

    def replica(data: dict[str, Any]) -> dict[str, Any]:
        found: dict[str, Any] = data["database_servers"]["mysql-mega-2-replica"]
        return found

    unchanged = key(lambda d: None)
    # Given another customer's database added, or the server's used bytes changed: the same
    # archive (nothing it leaves out changed)
    assert key(lambda d: replica(d)["databases"].update(
        {"third_production": {"size_bytes": 1, "customer": "cust-3"}})) == unchanged
    assert key(lambda d: replica(d).update(root_used_bytes=1)) == unchanged
    # When a customer's path is added (an archive made before holds it), or the data
    # directory moves: a new archive
    assert key(lambda d: replica(d)["customer_paths"].update(
        {"cust-3": ["/srv/cust-3"]})) != unchanged
    assert key(lambda d: replica(d).update(data_dir="/srv/mysql")) != unchanged


class CountingInventory(FileInventory):
    """The example file, counting what planning asks it (each ask is a request over HTTP)."""

    def __init__(self, path: Path) -> None:
        super().__init__(path)
        self.asked: Counter[tuple[str, str]] = Counter()

    def lookup(self, model: type[M], name: str) -> M:
        self.asked[(model.__name__, name)] += 1
        return super().lookup(model, name)


def test_the_ownership_pass_and_planning_ask_the_inventory_once_per_entity() -> None:
    # Given the example, and the example naming an old VM the inventory lacks
    inventory = CountingInventory(INVENTORY)
    plan_archives(validate_document(example_document()), inventory, "m")
    assert inventory.asked and max(inventory.asked.values()) == 1, inventory.asked
    missing = example_document(local_filesystems=[{"old_vm": "ey04-s59999", "new_vm": "vm_1"}])
    inventory = CountingInventory(INVENTORY)
    with pytest.raises(UnknownEntityError, match="ey04-s59999"):
        plan_archives(validate_document(missing), inventory, "m")
    # Then the name it lacks is asked once too, though ownership and planning both want it
    assert inventory.asked[("Vm", "ey04-s59999")] == 1, inventory.asked
