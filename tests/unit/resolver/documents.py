"""Documents and inventories the resolver's tests share: the example, and variants of it.

The example inventory's old VMs, environment, database and public IP are customer
cust-1042's (the example document's customer). A test that resolves migrations of many
customers writes `inventory_for(customers)`: the example plus each customer's own copies of
those entities (an old IP's copy is another address, `own_ip`), which
`example_document(customer)` names for any other customer.
"""

from __future__ import annotations

import copy
import hashlib
import ipaddress
import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[3]
EXAMPLE = json.loads((ROOT / "examples" / "migration.json").read_text())
INVENTORY = ROOT / "examples" / "inventory.yaml"
EXAMPLE_CUSTOMER = EXAMPLE["customer"]["id"]  # cust-1042: owns the example's old entities


def own_name(name: str, customer: str) -> str:
    """The name of `customer`'s copy of the example's old VM or environment `name`."""
    return name if customer == EXAMPLE_CUSTOMER else f"{name}.{customer}"


def own_database(name: str, customer: str) -> str:
    return name if customer == EXAMPLE_CUSTOMER else f"{name}-{customer}"


def own_ip(address: str, customer: str) -> str:
    """`customer`'s own old IP standing for the example's `address`: an address of
    2001:db8::/32 drawn from both (distinct for any number of customers, in practice)."""
    if customer == EXAMPLE_CUSTOMER:
        return address
    digest = hashlib.sha256(f"{address}/{customer}".encode()).digest()
    return str(ipaddress.IPv6Address((0x20010DB8 << 96) | int.from_bytes(digest[:12], "big")))


def example_document(customer: str = EXAMPLE_CUSTOMER, public_ips: int = 1,
                     **migration: Any) -> dict[str, Any]:
    """The seed's example for `customer`, with `public_ips` public IPs (the extra ones carry
    no mapping) and any `migration` section replaced. For a customer other than cust-1042
    it moves that customer's own copies (see inventory_for)."""
    document: dict[str, Any] = copy.deepcopy(EXAMPLE)
    document["customer"]["id"] = customer
    moves = document["migration"]
    for local in moves["local_filesystems"]:
        local["old_vm"] = own_name(local["old_vm"], customer)
    for shared in moves["shared_filesystems"]:
        shared["old_environment"] = own_name(shared["old_environment"], customer)
    for database in moves["databases"]:
        database["name"] = own_database(database["name"], customer)
    for equivalence in moves["ip_equivalences"]:
        equivalence["old_ip"] = own_ip(equivalence["old_ip"], customer)
    for n in range(2, public_ips + 1):
        document["public_ips"].append({"duid": f"ip_{n}", "port_mappings": []})
    if public_ips == 0:
        document["public_ips"] = []
        moves["ip_equivalences"] = []
    moves.update(migration)
    return document


def example_inventory() -> dict[str, Any]:
    loaded: dict[str, Any] = yaml.safe_load(INVENTORY.read_text())
    return loaded


def inventory_for(customers: Iterable[str], path: Path,
                  data: dict[str, Any] | None = None) -> Path:
    """Writes (JSON when `path` ends in .json, else YAML) the example inventory (or `data`)
    plus, for each customer, its own copies of cust-1042's old VMs, environment, database
    (on the same shared servers) and public IPs (forwarding to its copies of the VMs).
    Returns `path`."""
    data = copy.deepcopy(data or example_inventory())
    originals = {name: vm for name, vm in data["vms"].items()
                 if vm["customer"] == EXAMPLE_CUSTOMER}
    environments = {name: env for name, env in data["environments"].items()
                    if env["customer"] == EXAMPLE_CUSTOMER}
    addresses = {address: ip for address, ip in data.get("public_ips", {}).items()
                 if ip["customer"] == EXAMPLE_CUSTOMER}
    for customer in customers:
        if customer == EXAMPLE_CUSTOMER:
            continue
        for name, vm in originals.items():
            data["vms"][own_name(name, customer)] = {**copy.deepcopy(vm), "customer": customer}
        for name, env in environments.items():
            copied = copy.deepcopy(env)
            copied["customer"] = customer
            copied["vms"] = [own_name(v, customer) for v in env["vms"]]
            for fs in copied["shared_filesystems"]:
                fs["customer"] = customer
                fs["mounted_on"] = [own_name(v, customer) for v in fs["mounted_on"]]
            data["environments"][own_name(name, customer)] = copied
        for server in data["database_servers"].values():
            for name, database in list(server["databases"].items()):
                if database["customer"] == EXAMPLE_CUSTOMER:
                    server["databases"][own_database(name, customer)] = {
                        **database, "customer": customer}
        for address, ip in addresses.items():
            copied = {**copy.deepcopy(ip), "customer": customer}
            for mapping in copied.get("port_mappings", []):
                mapping["vms"] = [own_name(v, customer) for v in mapping["vms"]]
            data["public_ips"][own_ip(address, customer)] = copied
    text = json.dumps(data) if path.suffix == ".json" else yaml.safe_dump(data)
    path.write_text(text)
    return path
