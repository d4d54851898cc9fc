"""The fleet benchmark's old site: per migration (customer) its VMs' root directories, its
environment's shared filesystems and its MariaDB databases (a few KiB each), an inventory
owning each entity to its customer, and one migration document per customer.

Totals are split over `migrations` customers so the fleet has exactly `local`, `shared` and
`databases` archive jobs; customers alternate between the datacenters ey04 and ey02. Each
datacenter has one shared database server pair (the hosting company's); each migration
with a database also plans that replica's db_server_root (reused across migrations).
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pymysql

from ferry.demo_site import new_vm

DCS = ("ey04", "ey02")


@dataclass
class Customer:
    id: str
    datacenter: str
    vms: list[str]
    shared: list[str]  # mountpoints of its old environment's shared filesystems
    databases: list[str]


@dataclass
class FleetSite:
    workdir: Path
    customers: list[Customer] = field(default_factory=list)
    schema_prefix: str = field(default_factory=lambda: f"ferry_fleet_{uuid.uuid4().hex[:6]}_")

    @property
    def source(self) -> Path:
        return self.workdir / "source"

    @property
    def inventory_path(self) -> Path:
        return self.workdir / "inventory.json"

    def documents(self) -> list[bytes]:
        return [json.dumps(document(c)).encode() for c in self.customers]

    @property
    def schemas(self) -> list[str]:
        return [db for c in self.customers for db in c.databases]


def split(total: int, parts: int) -> list[int]:
    base, extra = divmod(total, parts)
    return [base + (1 if i < extra else 0) for i in range(parts)]


def _tree(path: Path, seed: int) -> None:
    """A few KiB: two text files and a small binary, different per source."""
    path.mkdir(parents=True, exist_ok=True)
    (path / "etc").mkdir(exist_ok=True)
    (path / "etc" / "hostname").write_text(f"source-{seed}\n")
    (path / "notes.txt").write_text(f"line {seed}\n" * 150)
    (path / "blob.bin").write_bytes(uuid.UUID(int=seed).bytes * 64)


def build(workdir: Path, migrations: int, local: int, shared: int, databases: int,
          mysql: tuple[str, int, str]) -> FleetSite:
    site = FleetSite(workdir)
    for n, (n_vm, n_sh, n_db) in enumerate(zip(split(local, migrations),
                                               split(shared, migrations),
                                               split(databases, migrations), strict=True)):
        cid = f"cust-{n:04d}"
        dc = DCS[n % 2]
        customer = Customer(cid, dc, [f"{dc}-s{n:04d}{v:02d}" for v in range(n_vm)],
                            [f"/data{s}" for s in range(n_sh)],
                            [f"{site.schema_prefix}{n:04d}_{d}" for d in range(n_db)])
        site.customers.append(customer)
        for vm in customer.vms:
            _tree(site.source / "vms" / vm, hash(vm) & 0xFFFFFF)
        for mount in customer.shared:
            _tree(site.source / "envs" / cid / mount.strip("/"), hash((cid, mount)) & 0xFFFFFF)
    for dc in DCS:
        _tree(site.source / "servers" / f"mysql-{dc}-replica", hash(dc) & 0xFFFF)
    host, port, user = mysql
    connection = pymysql.connect(host=host, port=port, user=user, autocommit=True)
    try:
        with connection.cursor() as cursor:
            for schema in site.schemas:
                cursor.execute(f"CREATE DATABASE `{schema}`")
                cursor.execute(f"CREATE TABLE `{schema}`.t (id INT PRIMARY KEY, v TEXT)")
                cursor.executemany(f"INSERT INTO `{schema}`.t VALUES (%s, %s)",  # noqa: S608 (our name)
                                   [(i, f"{schema} row {i} " * 8) for i in range(20)])
    finally:
        connection.close()
    site.inventory_path.write_text(json.dumps(inventory(site), indent=1))
    return site


def drop(site: FleetSite, mysql: tuple[str, int, str]) -> None:
    """Drop the schemas `build` made (only names with this run's prefix)."""
    host, port, user = mysql
    connection = pymysql.connect(host=host, port=port, user=user, autocommit=True)
    try:
        with connection.cursor() as cursor:
            for schema in site.schemas:
                assert schema.startswith(site.schema_prefix)
                cursor.execute(f"DROP DATABASE IF EXISTS `{schema}`")
    finally:
        connection.close()


def inventory(site: FleetSite) -> dict[str, Any]:
    vms: dict[str, Any] = {}
    envs: dict[str, Any] = {}
    servers: dict[str, Any] = {}
    for dc in DCS:
        dbs = {db: {"size_bytes": 4096, "customer": c.id}
               for c in site.customers if c.datacenter == dc for db in c.databases}
        common = {"datacenter": dc, "engine": "mysql", "version": "5.0.51", "ssh": "local",
                  "customer": "shared", "databases": dbs, "data_dir": "/var/lib/mysql"}
        servers[f"mysql-{dc}-master"] = {**common, "role": "master",
                                         "replicas": [f"mysql-{dc}-replica"]}
        servers[f"mysql-{dc}-replica"] = {
            **common, "role": "replica", "master": f"mysql-{dc}-master",
            "root": str(site.source / "servers" / f"mysql-{dc}-replica"),
            "root_used_bytes": 8192, "pause_replication": False}
    for c in site.customers:
        for vm in c.vms:
            path = site.source / "vms" / vm
            vms[vm] = {"datacenter": c.datacenter, "xen_host": f"xen-{c.datacenter}",
                       "ssh": "local", "customer": c.id,
                       "filesystems": [{"mountpoint": "/", "device": f"/dev/vg/{vm}-root",
                                        "fs_type": "ext4", "used_bytes": 8192,
                                        "size_bytes": 16 << 30, "snapshot_driver": "none",
                                        "path": str(path)}]}
        if c.shared:
            envs[f"{c.id}-env"] = {
                "datacenter": c.datacenter, "customer": c.id, "vms": c.vms[:1],
                "shared_filesystems": [
                    {"mountpoint": m, "used_bytes": 8192, "mounted_on": c.vms[:1],
                     "customer": c.id,
                     "path": str(site.source / "envs" / c.id / m.strip("/"))}
                    for m in c.shared]}
    return {"datacenters": {dc: {"archive_hosts": ["local"]} for dc in DCS},
            "xen_hosts": {f"xen-{dc}": {"datacenter": dc, "address": "local"} for dc in DCS},
            "vms": vms, "environments": envs, "database_servers": servers, "public_ips": {}}


def document(c: Customer) -> dict[str, Any]:
    """examples/migration.json's shape: one new app VM per old VM (the first also mounts the
    shared filesystems), a database group of two when the customer has databases."""
    apps = [f"vm_{i + 1}" for i in range(len(c.vms))]

    vms = [new_vm(duid, "app", "env_1", [("/", 15), *((m, 10) for m in c.shared)] if i == 0
                  else [("/", 15)]) for i, duid in enumerate(apps)]
    environments = [{"duid": "env_1", "name_hint": f"{c.id} app", "vms": apps}]
    groups: list[dict[str, Any]] = []
    if c.databases:
        master, replica = f"vm_{len(apps) + 1}", f"vm_{len(apps) + 2}"
        vms += [new_vm(master, "db_master", "env_2", [("/", 15), ("/var/lib/mysql", 20)]),
                new_vm(replica, "db_replica", "env_2", [("/", 15), ("/var/lib/mysql", 20)])]
        environments.append({"duid": "env_2", "name_hint": f"{c.id} db",
                             "vms": [master, replica]})
        groups = [{"duid": "db_1", "engine": "mysql", "version": "5.0.51", "master": master,
                   "replicas": [replica]}]
    return {
        "version": 1,
        "customer": {"id": c.id, "name": f"Fleet customer {c.id}"},
        "environments": environments, "vms": vms, "public_ips": [],
        "database_groups": groups,
        "migration": {
            "shared_filesystems": [{"old_environment": f"{c.id}-env", "mountpoint": m,
                                    "new_environment": "env_1"} for m in c.shared],
            "ip_equivalences": [],
            "databases": [{"name": db, "old_master": f"mysql-{c.datacenter}-master",
                           "old_replica": f"mysql-{c.datacenter}-replica",
                           "new_database_group": "db_1"} for db in c.databases],
            "local_filesystems": [{"old_vm": old, "new_vm": new}
                                  for old, new in zip(c.vms, apps, strict=True)],
        },
    }
