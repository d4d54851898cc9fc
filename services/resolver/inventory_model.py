"""The old site's inventory, as both adapters answer it: the models, their kinds, the errors.

`services.resolver.inventory` chooses the adapter (a file, or HTTP in
`services.resolver.inventory_http`); both check what they read against these models. The
schema is documented in docs/inventory-api.md and shown in examples/inventory.yaml.
Every VM, environment, shared filesystem, database, database server and public IP names its
owner (`customer`); a database server the hosting company shares among customers is owned
by SHARED, and each database on it by one customer. A public IP is keyed by its address in
one spelling (the document's `old_ip` is written the same way), and carries the port
mappings to its backing VMs in the document's own shape, with old VM names.
"""

from __future__ import annotations

import ipaddress
from typing import Annotated, Any, Literal, TypeVar

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from shared.addresses import parse_address
from shared.document import HostName, Mountpoint, Port, PublicAddress
from shared.errors import ConfigurationError, PermanentError


def _check_address(value: str) -> str:
    if value != "local":
        try:
            parse_address(value)
        except ConfigurationError as error:
            raise ValueError(str(error)) from None
    return value


SHARED = "shared"  # the owner of a database server the hosting company shares among customers


def _check_customer(value: str) -> str:
    if value == SHARED:
        raise ValueError(f"{SHARED!r} owns only database servers (a server shared by "
                         "customers); this entity belongs to one customer")
    return value


Address = Annotated[str, AfterValidator(_check_address)]  # "local" or [user@]host[:port]
# The document's customer id (`customer.id`), never the reserved SHARED.
CustomerId = Annotated[HostName, AfterValidator(_check_customer)]
DatacenterName = Annotated[str, Field(pattern=r"^[a-z0-9][a-z0-9_-]{0,31}$")]
Bytes = Annotated[int, Field(ge=0)]


class InventoryModel(BaseModel):
    # A misspelt field in an inventory would silently fall back to a default: refuse it.
    model_config = ConfigDict(extra="forbid", frozen=True)


class Datacenter(InventoryModel):
    archive_hosts: tuple[str, ...] = ()


class XenHost(InventoryModel):
    datacenter: DatacenterName
    address: Address


class LocalFilesystem(InventoryModel):
    mountpoint: Mountpoint
    device: Mountpoint  # the LV / block device on the Xen host: an absolute path
    fs_type: str = Field(pattern=r"^[a-z0-9]{1,16}$")
    used_bytes: Bytes
    size_bytes: Bytes | None = None  # the device's size (the snapshot's COW is sized from it)
    snapshot_driver: Literal["dm", "lvm", "none"] = "dm"
    path: Mountpoint | None = None  # driver none: the directory on the VM to archive as is


class Vm(InventoryModel):
    datacenter: DatacenterName
    xen_host: HostName
    ssh: Address
    filesystems: tuple[LocalFilesystem, ...] = ()
    customer: CustomerId  # its owner: only that customer's document moves it


class SharedFilesystem(InventoryModel):
    mountpoint: Mountpoint
    used_bytes: Bytes = 0
    mounted_on: tuple[HostName, ...] = Field(min_length=1)
    path: Mountpoint | None = None  # where the VMs see it, when not at the mountpoint
    customer: CustomerId


class Environment(InventoryModel):
    datacenter: DatacenterName
    vms: tuple[HostName, ...] = ()
    shared_filesystems: tuple[SharedFilesystem, ...] = ()
    customer: CustomerId


class Database(InventoryModel):
    size_bytes: Bytes = 0
    customer: CustomerId  # on a shared server, each database still has one owner


class DatabaseServer(InventoryModel):
    datacenter: DatacenterName
    role: Literal["master", "replica"]
    engine: Literal["mysql", "postgresql"]
    version: str = Field(default="", max_length=40)
    ssh: Address
    master: HostName | None = None  # replicas: their master
    replicas: tuple[HostName, ...] = ()  # masters: their replicas
    databases: dict[Annotated[str, Field(pattern=r"^[a-z0-9][a-z0-9_.-]{0,62}$")], Database] = {}
    data_dir: Mountpoint | None = None  # left out of a db_server_root archive
    root: Mountpoint = "/"  # what a db_server_root archive takes
    pause_replication: bool = False  # pause the replica's SQL thread while dumping
    root_used_bytes: Bytes = 0  # used space under `root` (what its archive needs in staging)
    # Paths that hold one customer's things on the server (an upload spool, a per-customer
    # config), written like data_dir (absolute, as the server sees them under `root`): left
    # out of the root archive, every customer's, since that one archive is shipped to every
    # customer on the server (their data travels in their database dumps).
    customer_paths: dict[CustomerId, tuple[Mountpoint, ...]] = {}
    # One customer's server, or SHARED: the hosting company's, with customers' databases
    customer: HostName

    @model_validator(mode="after")
    def _owners_agree(self) -> DatabaseServer:
        for owner, paths in sorted(self.customer_paths.items()):
            if "/" in paths:
                raise ValueError(f"customer_paths of {owner!r} names '/': that would leave "
                                 "the whole root out")
        if self.customer != SHARED:
            for name, database in sorted(self.databases.items()):
                if database.customer != self.customer:
                    raise ValueError(
                        f"database {name!r} belongs to customer {database.customer!r} on a "
                        f"server of customer {self.customer!r} (a server that holds several "
                        f"customers' databases is `customer: {SHARED}`)")
        return self


class PortMapping(InventoryModel):
    """A port of a public IP forwarded to the old VMs behind it: the document's port mapping
    (`public_ips[].port_mappings[]`), with old VM names where it has new VM duids, so a
    drafted document maps the same port to the new VMs that replace these."""

    protocol: Literal["tcp", "udp"]
    external_port: Port
    internal_port: Port
    vms: tuple[HostName, ...] = Field(min_length=1)  # its backing VMs, in order


class PublicIp(InventoryModel):
    """An old public IP (keyed by its address): whose it is, where, and what it forwards.
    A document's `migration.ip_equivalences[].old_ip` may name only its customer's."""

    datacenter: DatacenterName
    customer: CustomerId  # never SHARED: an address is one customer's
    port_mappings: tuple[PortMapping, ...] = ()

    @model_validator(mode="after")
    def _each_port_once(self) -> PublicIp:
        seen: set[tuple[str, int]] = set()
        for mapping in self.port_mappings:
            key = (mapping.protocol, mapping.external_port)
            if key in seen:
                raise ValueError(f"{mapping.protocol} port {mapping.external_port} is mapped "
                                 "twice")
            seen.add(key)
        return self

    @property
    def backing_vms(self) -> tuple[str, ...]:
        """The old VMs behind it, each once, in the order its mappings name them."""
        return tuple(dict.fromkeys(vm for mapping in self.port_mappings for vm in mapping.vms))


class InventoryDocument(InventoryModel):
    """A whole inventory, as the file adapter reads it."""

    datacenters: dict[DatacenterName, Datacenter] = {}
    xen_hosts: dict[HostName, XenHost] = {}
    vms: dict[HostName, Vm] = {}
    environments: dict[HostName, Environment] = {}
    database_servers: dict[HostName, DatabaseServer] = {}
    # keyed by the address in one spelling (2001:DB8::0010 is read as 2001:db8::10)
    public_ips: dict[PublicAddress, PublicIp] = {}

    @field_validator("public_ips", mode="before")
    @classmethod
    def _each_address_once(cls, value: Any) -> Any:
        # Two spellings of one address would silently become one entry (the later wins).
        if isinstance(value, dict):
            seen: dict[str, str] = {}
            for key in value:
                try:
                    spelled = str(ipaddress.ip_address(key)) if isinstance(key, str) else key
                except ValueError:
                    continue  # the key's own validation says what is wrong with it
                if spelled in seen:
                    raise ValueError(f"public IP {key!r} is listed twice (also as "
                                     f"{seen[spelled]!r})")
                seen[spelled] = key
        return value


# What each lookup is called in messages, and its collection (file keys and URL paths).
KINDS: dict[type[InventoryModel], tuple[str, str, str]] = {
    Datacenter: ("datacenter", "datacenters", "datacenters"),
    XenHost: ("Xen host", "xen_hosts", "xen-hosts"),
    Vm: ("old VM", "vms", "vms"),
    Environment: ("old environment", "environments", "environments"),
    DatabaseServer: ("database server", "database_servers", "database-servers"),
    PublicIp: ("old public IP", "public_ips", "public-ips"),
}
M = TypeVar("M", bound=InventoryModel)


class UnknownEntityError(PermanentError):
    """The inventory does not know a name the migration refers to."""


class InventoryInvalidError(PermanentError):
    """The inventory answered with something that breaks its schema."""


class InventoryFileInvalidError(InventoryInvalidError, ConfigurationError):
    """An inventory file that breaks the schema: a wrong setting when the resolver starts
    (it stops, naming the field at fault), a failed migration when a changed file is read."""


def validation_summary(error: ValidationError, limit: int = 3) -> str:
    parts = []
    for item in error.errors()[:limit]:
        where = ".".join(str(p) for p in item["loc"]) or "(root)"
        message = item["msg"]
        if item["type"] == "missing" and item["loc"][-1:] == ("customer",):
            message = ("no owner: `customer` is required (on every VM, environment, shared "
                       "filesystem, database, database server and public IP)")
        parts.append(f"{where}: {message}")
    more = f"; and {error.error_count() - limit} more" if error.error_count() > limit else ""
    return "; ".join(parts) + more
