"""The old site's inventory, as both adapters answer it: the models, their kinds, the errors.

`services.resolver.inventory` chooses the adapter (a file, or HTTP in
`services.resolver.inventory_http`); both check what they read against these models. The
schema is documented in docs/inventory-api.md and shown in examples/inventory.yaml.
"""

from __future__ import annotations

from typing import Annotated, Literal, TypeVar

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError

from shared.addresses import parse_address
from shared.document import HostName, Mountpoint
from shared.errors import ConfigurationError, PermanentError


def _check_address(value: str) -> str:
    if value != "local":
        try:
            parse_address(value)
        except ConfigurationError as error:
            raise ValueError(str(error)) from None
    return value


Address = Annotated[str, AfterValidator(_check_address)]  # "local" or [user@]host[:port]
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


class SharedFilesystem(InventoryModel):
    mountpoint: Mountpoint
    used_bytes: Bytes = 0
    mounted_on: tuple[HostName, ...] = Field(min_length=1)
    path: Mountpoint | None = None  # where the VMs see it, when not at the mountpoint


class Environment(InventoryModel):
    datacenter: DatacenterName
    vms: tuple[HostName, ...] = ()
    shared_filesystems: tuple[SharedFilesystem, ...] = ()


class Database(InventoryModel):
    size_bytes: Bytes = 0


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


class InventoryDocument(InventoryModel):
    """A whole inventory, as the file adapter reads it."""

    datacenters: dict[DatacenterName, Datacenter] = {}
    xen_hosts: dict[HostName, XenHost] = {}
    vms: dict[HostName, Vm] = {}
    environments: dict[HostName, Environment] = {}
    database_servers: dict[HostName, DatabaseServer] = {}


# What each lookup is called in messages, and its collection (file keys and URL paths).
KINDS: dict[type[InventoryModel], tuple[str, str, str]] = {
    Datacenter: ("datacenter", "datacenters", "datacenters"),
    XenHost: ("Xen host", "xen_hosts", "xen-hosts"),
    Vm: ("old VM", "vms", "vms"),
    Environment: ("old environment", "environments", "environments"),
    DatabaseServer: ("database server", "database_servers", "database-servers"),
}
M = TypeVar("M", bound=InventoryModel)


class UnknownEntityError(PermanentError):
    """The inventory does not know a name the migration refers to."""


class InventoryInvalidError(PermanentError):
    """The inventory answered with something that breaks its schema."""


def validation_summary(error: ValidationError, limit: int = 3) -> str:
    parts = []
    for item in error.errors()[:limit]:
        where = ".".join(str(p) for p in item["loc"]) or "(root)"
        parts.append(f"{where}: {item['msg']}")
    more = f"; and {error.error_count() - limit} more" if error.error_count() > limit else ""
    return "; ".join(parts) + more
