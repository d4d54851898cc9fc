"""The old site's inventory ("internal API"): one interface, a file adapter and an HTTP one.

`FERRY_INVENTORY` chooses: an http(s) URL → `HttpInventory` (services.resolver.inventory_http),
anything else → a YAML or JSON file. Both answer with the same models
(services.resolver.inventory_model, importable from here too); the schema is documented in
docs/inventory-api.md and shown in examples/inventory.yaml. Lookups raise
UnknownEntityError (permanent: the migration fails naming the entity) or TransientError
(the inventory could not be reached: retried).
"""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path
from typing import Any, Protocol

import yaml
from pydantic import ValidationError

from services.resolver.inventory_http import HttpInventory
from services.resolver.inventory_model import (
    KINDS,
    SHARED,
    Address,
    Bytes,
    CustomerId,
    Database,
    DatabaseServer,
    Datacenter,
    DatacenterName,
    Environment,
    InventoryDocument,
    InventoryFileInvalidError,
    InventoryInvalidError,
    InventoryModel,
    LocalFilesystem,
    M,
    PortMapping,
    PublicIp,
    SharedFilesystem,
    UnknownEntityError,
    Vm,
    XenHost,
    validation_summary,
)
from shared.errors import ConfigurationError
from shared.settings import Settings

__all__ = [
    "Address",
    "Bytes",
    "CustomerId",
    "Database",
    "DatabaseServer",
    "Datacenter",
    "DatacenterName",
    "Environment",
    "FileInventory",
    "Inventory",
    "InventoryDocument",
    "InventoryFileInvalidError",
    "InventoryInvalidError",
    "InventoryModel",
    "KINDS",
    "LocalFilesystem",
    "M",
    "open_inventory",
    "PortMapping",
    "PublicIp",
    "reference_problems",
    "SHARED",
    "SharedFilesystem",
    "UnknownEntityError",
    "validation_summary",
    "Vm",
    "XenHost",
]


class Inventory(Protocol):
    def lookup(self, model: type[M], name: str) -> M:
        """The entity `name` of `model`'s kind. Raises UnknownEntityError, TransientError."""
        ...

    def close(self) -> None: ...


class FileInventory:
    """A YAML or JSON file; re-read when it changes, so a fixed inventory needs no restart."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = threading.Lock()
        self._stamp: tuple[int, int] | None = None
        self._document = self._load()

    def _load(self) -> InventoryDocument:
        try:
            stat = os.stat(self.path)
            text = self.path.read_text()
        except OSError as error:
            raise ConfigurationError(f"inventory {self.path}: {error.strerror}") from None
        try:
            data: Any = (json.loads(text) if self.path.suffix == ".json"
                         else yaml.safe_load(text))
            document = InventoryDocument.model_validate(data or {})
        except (ValueError, yaml.YAMLError) as error:
            detail = (validation_summary(error) if isinstance(error, ValidationError)
                      else str(error).splitlines()[0])
            raise InventoryFileInvalidError(
                f"inventory {self.path} is invalid: {detail}") from None
        self._stamp = (stat.st_mtime_ns, stat.st_size)
        return document

    def document(self) -> InventoryDocument:
        with self._lock:
            try:
                stat = os.stat(self.path)
            except OSError:
                return self._document  # mid-replace: keep the last good one
            if (stat.st_mtime_ns, stat.st_size) != self._stamp:
                self._document = self._load()
            return self._document

    def lookup(self, model: type[M], name: str) -> M:
        what, collection, _ = KINDS[model]
        entities: dict[str, Any] = getattr(self.document(), collection)
        if name not in entities:
            raise UnknownEntityError(f"{what} {name!r} is not in the inventory")
        found: M = entities[name]
        return found

    def close(self) -> None:
        pass


def open_inventory(settings: Settings) -> Inventory:
    """The adapter FERRY_INVENTORY names. Raises ConfigurationError when unset or unusable."""
    where = settings.inventory
    if not where:
        raise ConfigurationError("FERRY_INVENTORY is not set: give the old site's inventory "
                                 "as a YAML/JSON file or an http(s) URL")
    if where.startswith(("http://", "https://")):
        return HttpInventory(where, timeout=settings.inventory_timeout,
                             token=settings.inventory_token)
    return FileInventory(Path(where))


def reference_problems(document: InventoryDocument) -> list[str]:
    """Names an inventory uses but does not define, servers that disagree about who
    replicates whom, and entities that name another customer's (an environment's VMs, the
    VMs a shared filesystem is mounted on, a replica and its master, the VMs behind a public
    IP): what `ferry inventory check` reports for a file."""
    problems: list[str] = []

    def need(kind: str, known: dict[str, Any], name: str | None, used_by: str) -> None:
        if name is not None and name not in known:
            problems.append(f"{used_by} names {kind} {name!r}, which the inventory lacks")

    def same_owner(used_by: str, owner: str, vm_name: str) -> None:
        vm = document.vms.get(vm_name)
        if vm is not None and vm.customer != owner:
            problems.append(f"{used_by} of customer {owner!r} names VM {vm_name!r} of "
                            f"customer {vm.customer!r}")

    for name, xen in document.xen_hosts.items():
        need("datacenter", document.datacenters, xen.datacenter, f"Xen host {name!r}")
    for name, vm in document.vms.items():
        need("datacenter", document.datacenters, vm.datacenter, f"VM {name!r}")
        need("Xen host", document.xen_hosts, vm.xen_host, f"VM {name!r}")
    for name, env in document.environments.items():
        need("datacenter", document.datacenters, env.datacenter, f"environment {name!r}")
        for vm_name in env.vms:
            need("VM", document.vms, vm_name, f"environment {name!r}")
            same_owner(f"environment {name!r}", env.customer, vm_name)
        for fs in env.shared_filesystems:
            for vm_name in fs.mounted_on:
                need("VM", document.vms, vm_name, f"{name}:{fs.mountpoint}")
                same_owner(f"shared filesystem {name}:{fs.mountpoint}", fs.customer, vm_name)
    servers = document.database_servers
    for name, server in servers.items():
        need("datacenter", document.datacenters, server.datacenter, f"server {name!r}")
        need("database server", servers, server.master, f"server {name!r}")
        for replica in server.replicas:
            need("database server", servers, replica, f"server {name!r}")
            if replica in servers and servers[replica].master not in (None, name):
                problems.append(f"{name!r} lists replica {replica!r}, whose master is "
                                f"{servers[replica].master!r}")
        if server.master in servers and servers[server.master].customer != server.customer:
            problems.append(f"replica {name!r} belongs to {server.customer!r}, its master "
                            f"{server.master!r} to {servers[server.master].customer!r}")
    for address, ip in document.public_ips.items():
        used_by = f"public IP {address!r}"
        need("datacenter", document.datacenters, ip.datacenter, used_by)
        for vm_name in ip.backing_vms:
            need("VM", document.vms, vm_name, used_by)
            same_owner(used_by, ip.customer, vm_name)
            backing = document.vms.get(vm_name)
            if backing is not None and backing.datacenter != ip.datacenter:
                problems.append(f"{used_by} in datacenter {ip.datacenter!r} forwards to VM "
                                f"{vm_name!r} in {backing.datacenter!r}")
    return problems
