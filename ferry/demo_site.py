"""The demo's old site: VM root trees, a shared /data, a MariaDB database, the inventory
describing them (every host `local`, snapshot driver `none`) and a migration document in
the shape of examples/migration.json.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import yaml

from ferry.sample_site import SIZES, TreeSize, make_tree

APP_VMS = {"small": 4, "medium": 20}
DATACENTER = "ey04"
OLD_ENV = "ey04-e00075"
MASTER, REPLICA = "mysql-mega-2-master", "mysql-mega-2-replica"
ROWS = {"small": 20_000, "medium": 200_000}
CUSTOMER = "cust-demo"  # the document's customer, the owner of every old entity it moves
OLD_IP = "203.0.113.10"  # the app VMs' old public IP (ports 443 and 80), the customer's


@dataclass
class DemoSite:
    workdir: Path
    size: str
    database: str | None = None
    database_rows: int = 0
    address: str = "local"  # how every old host is reached: the local executor, or an sshd

    @property
    def source(self) -> Path:
        return self.workdir / "source"

    @property
    def inventory_path(self) -> Path:
        return self.workdir / "inventory.yaml"

    @property
    def document_path(self) -> Path:
        return self.workdir / "migration.json"

    def root(self, vm: str) -> Path:
        return self.source / "vms" / vm / "root"

    @property
    def data(self) -> Path:
        return self.source / "envs" / OLD_ENV / "data"

    @property
    def sources(self) -> dict[str, Path]:
        """Archive label -> the directory it is made from."""
        labels = {f"{old_vm(i)}:/": self.root(old_vm(i)) for i in range(APP_VMS[self.size])}
        return {**labels, f"{REPLICA}:/": self.root(REPLICA), f"{OLD_ENV}:/data": self.data}


def old_vm(index: int) -> str:
    return f"ey04-s{50000 + index:05d}"


def build_trees(site: DemoSite) -> int:
    """Root trees for every app VM and the replica, and the shared /data; returns bytes."""
    sizes = SIZES[site.size]
    written = sum(make_tree(site.root(old_vm(i)), sizes["root"], seed=i, rootfs=True)
                  for i in range(APP_VMS[site.size]))
    replica_root = site.root(REPLICA)
    written += make_tree(replica_root, TreeSize(200, 0, 0), seed=999, rootfs=True)
    (replica_root / "var/lib/mysql").mkdir(parents=True, exist_ok=True)
    (replica_root / "var/lib/mysql/ibdata1").write_bytes(b"\0" * 4096)  # excluded: data dir
    return written + make_tree(site.data, sizes["data"], seed=4242)


@dataclass(frozen=True)
class MysqlAddress:
    host: str
    port: int
    user: str
    password: str


def mysql_address(mysql_url: str) -> MysqlAddress:
    """`[mysql://][user[:password]@]host[:port]`, defaulting to root@127.0.0.1:3306."""
    parsed = urlparse(mysql_url if "://" in mysql_url else f"mysql://{mysql_url}")
    return MysqlAddress(parsed.hostname or "127.0.0.1", parsed.port or 3306,
                        parsed.username or "root", parsed.password or "")


def _connect(mysql_url: str) -> Any:
    import pymysql

    address = mysql_address(mysql_url)
    return pymysql.connect(host=address.host, port=address.port, user=address.user,
                           password=address.password, connect_timeout=5, autocommit=True)


def drop_database(mysql_url: str, name: str) -> None:
    """Remove a demo database (only ever one this module created: ferry_demo_<hex>)."""
    if not name.startswith("ferry_demo_") or not name[11:].isalnum():
        raise ValueError(f"refusing to drop {name!r}: not a demo database")
    connection = _connect(mysql_url)
    with connection.cursor() as cursor:
        cursor.execute(f"DROP DATABASE IF EXISTS `{name}`")
    connection.close()


def build_database(site: DemoSite, mysql_url: str) -> str | None:
    """A database with rows on the MariaDB at mysql_url; None (and why) when unreachable."""
    import pymysql

    try:
        connection = _connect(mysql_url)
    except pymysql.err.OperationalError as error:
        return f"no MariaDB at {mysql_url} ({error.args[-1]})"
    name = f"ferry_demo_{uuid.uuid4().hex[:8]}"
    rows = ROWS[site.size]
    with connection.cursor() as cursor:
        cursor.execute(f"CREATE DATABASE `{name}`")
        cursor.execute(f"USE `{name}`")
        cursor.execute("CREATE TABLE customers (id INT PRIMARY KEY, name VARCHAR(100), "
                       "email VARCHAR(200), created_at DATETIME) ENGINE=InnoDB")
        cursor.execute("CREATE TABLE orders (id INT PRIMARY KEY, customer_id INT, "
                       "total DECIMAL(10,2), status VARCHAR(20), note TEXT) ENGINE=InnoDB")
        batch = 5_000
        for start in range(0, rows, batch):
            stop = min(rows, start + batch)
            cursor.executemany("INSERT INTO customers VALUES (%s, %s, %s, %s)", [
                (i, f"customer {i}", f"c{i}@example.com", f"2012-01-{i % 28 + 1:02d} 10:00:00")
                for i in range(start, stop)])
            cursor.executemany("INSERT INTO orders VALUES (%s, %s, %s, %s, %s)", [
                (i, i % 997, (i * 37) % 10000 / 100, ("paid", "open", "refunded")[i % 3],
                 f"order note {i} " * (i % 5)) for i in range(start, stop)])
    connection.close()
    site.database, site.database_rows = name, rows
    return None


def inventory(site: DemoSite) -> dict[str, Any]:
    vms: dict[str, Any] = {}
    for index in range(APP_VMS[site.size]):
        root = site.root(old_vm(index))
        vms[old_vm(index)] = {
            "datacenter": DATACENTER, "xen_host": "xen-demo", "ssh": site.address,
            "customer": CUSTOMER,
            "filesystems": [{"mountpoint": "/", "device": f"/dev/vg_demo/{old_vm(index)}-root",
                             "fs_type": "ext4", "used_bytes": du(root),
                             "size_bytes": 16 << 30, "snapshot_driver": "none",
                             "path": str(root)}],
        }
    data = site.data
    databases = ({site.database: {"size_bytes": 0, "customer": CUSTOMER}}
                 if site.database else {})
    # the hosting company's servers, shared: each database on them is one customer's
    server = {"datacenter": DATACENTER, "engine": "mysql", "version": "5.0.51",
              "ssh": site.address, "customer": "shared",
              "databases": databases, "data_dir": "/var/lib/mysql"}
    return {
        "datacenters": {DATACENTER: {"archive_hosts": ["local"]}},
        "xen_hosts": {"xen-demo": {"datacenter": DATACENTER, "address": site.address}},
        "vms": vms,
        "environments": {OLD_ENV: {
            "datacenter": DATACENTER, "vms": list(vms), "customer": CUSTOMER,
            "shared_filesystems": [{"mountpoint": "/data", "used_bytes": du(data),
                                    "mounted_on": [old_vm(0)], "path": str(data),
                                    "customer": CUSTOMER}],
        }},
        "database_servers": {
            MASTER: {**server, "role": "master", "replicas": [REPLICA]},
            REPLICA: {**server, "role": "replica", "master": MASTER,
                      "root": str(site.root(REPLICA)),
                      "pause_replication": False},
        },
        "public_ips": {OLD_IP: {
            "datacenter": DATACENTER, "customer": CUSTOMER,
            "port_mappings": [{"protocol": "tcp", "external_port": port,
                               "internal_port": port, "vms": list(vms)}
                              for port in (443, 80)]}},
    }


def new_vm(duid: str, role: str, env: str, mounts: list[tuple[str, int]]) -> dict[str, Any]:
    """A document's new VM: one ext4 disk per (mountpoint, size in GiB), 5 GiB to spare."""
    return {"duid": duid, "role": role, "environment": env, "memory_mib": 1792, "vcpus": 2,
            "disks": [{"size_gib": size + 5, "filesystems": [
                {"mountpoint": mount, "size_gib": size, "fs_type": "ext4"}]}
                for mount, size in mounts]}


def document(site: DemoSite) -> dict[str, Any]:
    """examples/migration.json's shape, with APP_VMS[size] app VMs."""
    apps = [f"vm_{i + 1}" for i in range(APP_VMS[site.size])]
    master, replica = f"vm_{len(apps) + 1}", f"vm_{len(apps) + 2}"

    vms = [new_vm(duid, "app", "env_1", [("/", 15), ("/data", 50)] if i == 0 else [("/", 15)])
           for i, duid in enumerate(apps)]
    vms += [new_vm(master, "db_master", "env_2", [("/", 15), ("/var/lib/mysql", 95)]),
            new_vm(replica, "db_replica", "env_2", [("/", 15), ("/var/lib/mysql", 95)])]
    databases = ([{"name": site.database, "old_master": MASTER, "old_replica": REPLICA,
                   "new_database_group": "db_1"}] if site.database else [])
    return {
        "version": 1,
        "customer": {"id": CUSTOMER, "name": "Foobar Inc. (demo)"},
        "environments": [{"duid": "env_1", "name_hint": "foobar app", "vms": apps},
                         {"duid": "env_2", "name_hint": "foobar db", "vms": [master, replica]}],
        "vms": vms,
        "public_ips": [{"duid": "ip_1", "port_mappings": [
            {"protocol": "tcp", "external_port": port, "vms": apps, "internal_port": port}
            for port in (443, 80)]}],
        "database_groups": [{"duid": "db_1", "engine": "mysql", "version": "5.0.51",
                             "master": master, "replicas": [replica]}],
        "migration": {
            "shared_filesystems": [{"old_environment": OLD_ENV, "mountpoint": "/data",
                                    "new_environment": "env_1"}],
            "ip_equivalences": [{"old_ip": OLD_IP, "new_public_ip": "ip_1"}],
            "databases": databases,
            "local_filesystems": [{"old_vm": old_vm(i), "new_vm": duid}
                                  for i, duid in enumerate(apps)],
        },
    }


def build_site(workdir: Path, size: str, mysql_url: str | None,
               address: str = "local") -> tuple[DemoSite, str | None]:
    """Everything under workdir/source plus inventory.yaml and migration.json (every old
    host at `address`). Returns the site and, when the database was left out, why."""
    site = DemoSite(workdir=workdir, size=size, address=address)
    build_trees(site)
    why_no_db = build_database(site, mysql_url) if mysql_url else "no MariaDB URL given"
    write_description(site)
    return site, why_no_db


def write_description(site: DemoSite) -> None:
    """The site's inventory.yaml and migration.json, as they stand now."""
    site.inventory_path.write_text(yaml.safe_dump(inventory(site), sort_keys=False))
    site.document_path.write_text(json.dumps(document(site), indent=2))


def du(path: Path) -> int:
    """Bytes in regular files under `path` (what `df` would call used, roughly)."""
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file() and not p.is_symlink())
