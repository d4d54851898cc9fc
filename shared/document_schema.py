"""The migration document's structure: its models, field types and bounds.

Top-level shape (every object rejects fields it does not know):

    version            1
    customer           {id, name}
    environments[]     {duid, name_hint, vms[]}
    vms[]              {duid, role, environment, memory_mib, vcpus,
                        disks[] {size_gib, filesystems[] {mountpoint, size_gib, fs_type}}}
    public_ips[]       {duid, port_mappings[] {protocol, external_port, vms[], internal_port}}
    database_groups[]  {duid, engine, version, master, replicas[]}
    migration          {shared_filesystems[] {old_environment, mountpoint, new_environment},
                        ip_equivalences[]    {old_ip, new_public_ip},
                        databases[]          {name, old_master, old_replica, new_database_group},
                        local_filesystems[]  {old_vm, new_vm}}

A duid ("document-unique identifier") stands for a new entity that has no name yet; VMs,
environments, public IPs and database groups share one duid namespace. Old-site names
(hosts, environments, databases) are plain names matched by strict patterns, and
mountpoints are normalised absolute paths of safe characters, because all of them end up
in commands run on hosts. `shared.document.validate_document` is the one entry point; the
rules that need the whole document live in `shared.document_rules`, above this module, and
how problems are reported in `shared.document_errors`, below it.
"""

from __future__ import annotations

import ipaddress
import re
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    StrictInt,
    StrictStr,
    WithJsonSchema,
)

from shared.document_errors import (  # re-exported: the document's errors are part of it
    DocumentError,
    json_pointer,
    show,
    structural_errors,
)
from shared.labels import LABEL_JSON_PATTERN, hidden_character

__all__ = ["DocumentError", "json_pointer", "structural_errors"]  # and every name below

HOST_NAME_PATTERN = r"^[a-z0-9][a-z0-9.-]{0,62}$"
DATABASE_NAME_PATTERN = r"^[a-z0-9][a-z0-9_.-]{0,62}$"
DUID_PATTERN = DATABASE_NAME_PATTERN
VERSION_PATTERN = r"^[0-9]{1,4}(\.[0-9]{1,4}){0,3}[a-z]?$"
# The whole mountpoint rule as one regex, for the JSON Schema: segments of safe characters
# that are neither "." nor "..". The Python check below gives a precise message instead.
MOUNTPOINT_PATTERN = (
    r"^(/|(/([A-Za-z0-9_-][A-Za-z0-9._-]*|\.[A-Za-z0-9_-][A-Za-z0-9._-]*|\.\.[A-Za-z0-9._-]+))+)$"
)
MOUNTPOINT_MAX_LENGTH = 4096
LABEL_MAX_LENGTH = 200

# Bounds on every number and every list: the largest each has been seen to need, with room,
# so that no document is unbounded (the 1 MiB body limit bounds what intake reads; these
# bound what any validated document can hold, whoever hands it on). A list one item past
# its bound still fits in 1 MiB, so such a list is a 422 naming the bound, not a 413.
MAX_MEMORY_MIB = 32 * 1024 * 1024  # 32 TiB: the largest VM sold (AWS u7in-32tb, 896 vCPUs)
MAX_VCPUS = 1024  # KVM's per-guest limit (KVM_MAX_VCPUS, x86-64, Linux 5.15+); Xen's is lower
MAX_SIZE_GIB = 64 * 1024  # 64 TiB: the largest single cloud volume (EBS io2, GCE, Azure Ultra)
MAX_ENTITIES = 6_000  # VMs, environments, IPs, groups, and a list of VMs (the field: 4,500)
MAX_MOVES = 10_000  # each list under `migration` (the field: 6,500 shared filesystems)
MAX_DISKS = 64  # per VM (Nitro attaches at most 28 volumes to most types, Xen PV 16 xvd*)
MAX_FILESYSTEMS = 128  # per disk: a GPT partition table's default number of entries
MAX_PORT_MAPPINGS = 1024  # per public IP (the field: 2, for 80 and 443)
MAX_REPLICAS = 32  # per database group (the field: 1; MySQL and PostgreSQL fan out to tens)
# Parts of one kind in the whole document, bounding the products of the lists above (checked
# with the rules, in shared.document_rules). The field's largest document: ~11,000 each.
MAX_FILESYSTEMS_IN_ALL = 50_000
MAX_PORT_TARGETS_IN_ALL = 50_000
_MOUNTPOINT_CHARS = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789._/-")


def _matching(pattern: str, what: str) -> AfterValidator:
    regex = re.compile(pattern[1:-1])  # fullmatch, so "$" cannot let a trailing newline in

    def check(value: str) -> str:
        if regex.fullmatch(value) is None:
            hidden = hidden_character(value)  # say which, not only "no match"
            raise ValueError(f"{what} {show(value)} does not match {pattern}"
                             + (f": it contains {hidden}" if hidden else ""))
        return value

    return AfterValidator(check)


def _check_mountpoint(value: str) -> str:
    shown = show(value)
    if not value.startswith("/"):
        raise ValueError(f"mountpoint {shown} is not absolute: it must start with '/'")
    if len(value) > MOUNTPOINT_MAX_LENGTH:
        raise ValueError(f"mountpoint {shown} is longer than {MOUNTPOINT_MAX_LENGTH} characters")
    bad = sorted(set(value) - _MOUNTPOINT_CHARS)
    if bad:
        listed = ", ".join(repr(ch) for ch in bad)
        hidden = hidden_character(value)
        raise ValueError(f"mountpoint {shown} contains {listed}: only [A-Za-z0-9._/-] are allowed"
                         + (f"; the first hidden one is {hidden}" if hidden else ""))
    if value == "/":
        return value
    if value.endswith("/"):
        raise ValueError(f"mountpoint {shown} ends with '/'")
    segments = value[1:].split("/")
    if "" in segments:
        raise ValueError(f"mountpoint {shown} contains '//'")
    if "." in segments or ".." in segments:
        raise ValueError(f"mountpoint {shown} contains a '.' or '..' segment")
    return value


def _check_label(value: str) -> str:
    if not 1 <= len(value) <= LABEL_MAX_LENGTH:
        raise ValueError(f"{show(value)} must be 1 to {LABEL_MAX_LENGTH} characters long")
    if (hidden := hidden_character(value)) is not None:
        raise ValueError(f"{show(value)} contains {hidden}: a label may not hold control, "
                         "bidi or zero-width characters")
    return value


def _check_public_address(value: str) -> str:
    if (hidden := hidden_character(value)) is not None:
        raise ValueError(f"{show(value)} is not an IP address: it contains {hidden}")
    try:
        address = ipaddress.ip_address(value)
    except ValueError:
        raise ValueError(f"{show(value)} is not an IPv4 or IPv6 address") from None
    if isinstance(address, ipaddress.IPv6Address) and address.scope_id is not None:
        raise ValueError(f"{show(value)} carries a scope id; a public IP cannot")
    if address.is_unspecified or address.is_loopback or address.is_multicast:
        raise ValueError(f"{show(value)} is not a usable public IP address")
    return str(address)  # one spelling per address, so duplicates are found


def _exactly_int(value: object) -> object:
    # Literal[1] alone would accept true and 1.0.
    if type(value) is not int:
        raise ValueError(f"version must be the integer 1, got {show(value)}")
    return value


def _string_schema(**schema: Any) -> WithJsonSchema:
    return WithJsonSchema({"type": "string", **schema})


Duid = Annotated[StrictStr, _matching(DUID_PATTERN, "duid"), _string_schema(pattern=DUID_PATTERN)]
HostName = Annotated[
    StrictStr, _matching(HOST_NAME_PATTERN, "name"), _string_schema(pattern=HOST_NAME_PATTERN)
]
DatabaseName = Annotated[
    StrictStr,
    _matching(DATABASE_NAME_PATTERN, "database name"),
    _string_schema(pattern=DATABASE_NAME_PATTERN),
]
EngineVersion = Annotated[
    StrictStr, _matching(VERSION_PATTERN, "version"), _string_schema(pattern=VERSION_PATTERN)
]
Mountpoint = Annotated[
    StrictStr,
    AfterValidator(_check_mountpoint),
    _string_schema(pattern=MOUNTPOINT_PATTERN, maxLength=MOUNTPOINT_MAX_LENGTH),
]
Label = Annotated[
    StrictStr,
    AfterValidator(_check_label),
    _string_schema(minLength=1, maxLength=LABEL_MAX_LENGTH, pattern=LABEL_JSON_PATTERN),
]
PublicAddress = Annotated[
    StrictStr, AfterValidator(_check_public_address), _string_schema(format="ipvanyaddress")
]
PositiveInt = Annotated[StrictInt, Field(gt=0)]
Port = Annotated[StrictInt, Field(ge=1, le=65535)]
MemoryMib = Annotated[StrictInt, Field(gt=0, le=MAX_MEMORY_MIB)]
Vcpus = Annotated[StrictInt, Field(gt=0, le=MAX_VCPUS)]
SizeGib = Annotated[StrictInt, Field(gt=0, le=MAX_SIZE_GIB)]
VmRole = Literal["app", "util", "db_master", "db_replica"]
FsType = Literal["ext3", "ext4", "xfs", "reiserfs"]


class DocumentModel(BaseModel):
    """Base of every document model: unknown fields are errors, and nothing changes later."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class Customer(DocumentModel):
    id: HostName
    name: Label


class Environment(DocumentModel):
    duid: Duid
    name_hint: Label = Field(description="A human hint; the resolver assigns the real name.")
    vms: tuple[Duid, ...] = Field(max_length=MAX_ENTITIES)


class Filesystem(DocumentModel):
    mountpoint: Mountpoint
    size_gib: SizeGib
    fs_type: FsType


class Disk(DocumentModel):
    size_gib: SizeGib
    filesystems: tuple[Filesystem, ...] = Field(max_length=MAX_FILESYSTEMS)


class Vm(DocumentModel):
    duid: Duid
    role: VmRole
    environment: Duid
    memory_mib: MemoryMib
    vcpus: Vcpus
    disks: tuple[Disk, ...] = Field(min_length=1, max_length=MAX_DISKS)


class PortMapping(DocumentModel):
    protocol: Literal["tcp", "udp"]
    external_port: Port
    vms: tuple[Duid, ...] = Field(min_length=1, max_length=MAX_ENTITIES)
    internal_port: Port


class PublicIp(DocumentModel):
    duid: Duid
    port_mappings: tuple[PortMapping, ...] = Field(max_length=MAX_PORT_MAPPINGS)


class DatabaseGroup(DocumentModel):
    duid: Duid
    engine: Literal["mysql", "postgresql"]
    version: EngineVersion
    master: Duid
    replicas: tuple[Duid, ...] = Field(max_length=MAX_REPLICAS)


class SharedFilesystemMove(DocumentModel):
    """An old environment's shared (GFS) filesystem, restored on the one new VM mounting it."""

    old_environment: HostName
    mountpoint: Mountpoint
    new_environment: Duid


class IpEquivalence(DocumentModel):
    old_ip: PublicAddress
    new_public_ip: Duid


class DatabaseMove(DocumentModel):
    name: DatabaseName
    old_master: HostName
    old_replica: HostName
    new_database_group: Duid


class LocalFilesystemMove(DocumentModel):
    old_vm: HostName
    new_vm: Duid


class Migration(DocumentModel):
    shared_filesystems: tuple[SharedFilesystemMove, ...] = Field(max_length=MAX_MOVES)
    ip_equivalences: tuple[IpEquivalence, ...] = Field(max_length=MAX_MOVES)
    databases: tuple[DatabaseMove, ...] = Field(max_length=MAX_MOVES)
    local_filesystems: tuple[LocalFilesystemMove, ...] = Field(max_length=MAX_MOVES)


class MigrationDocument(DocumentModel):
    version: Annotated[Literal[1], BeforeValidator(_exactly_int)]
    customer: Customer
    environments: tuple[Environment, ...] = Field(max_length=MAX_ENTITIES)
    vms: tuple[Vm, ...] = Field(max_length=MAX_ENTITIES)
    public_ips: tuple[PublicIp, ...] = Field(max_length=MAX_ENTITIES)
    database_groups: tuple[DatabaseGroup, ...] = Field(max_length=MAX_ENTITIES)
    migration: Migration
