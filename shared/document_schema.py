"""The migration document's structure: its models and field types, and its shape errors.

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
rules that need the whole document live in `shared.document_rules`, above this module.
"""

from __future__ import annotations

import ipaddress
import re
import unicodedata
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    StrictInt,
    StrictStr,
    ValidationError,
    WithJsonSchema,
)
from pydantic_core import ErrorDetails

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
_MOUNTPOINT_CHARS = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789._/-")


def _show(value: object) -> str:
    """A submitted value as a reader should see it in a message: short, JSON-flavoured."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        return repr(value if len(value) <= 100 else value[:97] + "...")
    if isinstance(value, dict):
        return "an object"
    if isinstance(value, list | tuple):
        return "an array"
    return f"a {type(value).__name__}"


def _matching(pattern: str, what: str) -> AfterValidator:
    regex = re.compile(pattern[1:-1])  # fullmatch, so "$" cannot let a trailing newline in

    def check(value: str) -> str:
        if regex.fullmatch(value) is None:
            raise ValueError(f"{what} {_show(value)} does not match {pattern}")
        return value

    return AfterValidator(check)


def _check_mountpoint(value: str) -> str:
    shown = _show(value)
    if not value.startswith("/"):
        raise ValueError(f"mountpoint {shown} is not absolute: it must start with '/'")
    if len(value) > MOUNTPOINT_MAX_LENGTH:
        raise ValueError(f"mountpoint {shown} is longer than {MOUNTPOINT_MAX_LENGTH} characters")
    bad = sorted(set(value) - _MOUNTPOINT_CHARS)
    if bad:
        listed = ", ".join(repr(ch) for ch in bad)
        raise ValueError(f"mountpoint {shown} contains {listed}: only [A-Za-z0-9._/-] are allowed")
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
        raise ValueError(f"{_show(value)} must be 1 to {LABEL_MAX_LENGTH} characters long")
    categories = {unicodedata.category(ch) for ch in value}
    if "Cc" in categories:
        raise ValueError(f"{_show(value)} contains a control character")
    if "Cs" in categories:  # JSON allows "\ud800", but it cannot be stored as UTF-8
        raise ValueError(f"{_show(value)} contains an unpaired surrogate")
    return value


def _check_public_address(value: str) -> str:
    try:
        address = ipaddress.ip_address(value)
    except ValueError:
        raise ValueError(f"{_show(value)} is not an IPv4 or IPv6 address") from None
    if isinstance(address, ipaddress.IPv6Address) and address.scope_id is not None:
        raise ValueError(f"{_show(value)} carries a scope id; a public IP cannot")
    if address.is_unspecified or address.is_loopback or address.is_multicast:
        raise ValueError(f"{_show(value)} is not a usable public IP address")
    return str(address)  # one spelling per address, so duplicates are found


def _exactly_int(value: object) -> object:
    # Literal[1] alone would accept true and 1.0.
    if type(value) is not int:
        raise ValueError(f"version must be the integer 1, got {_show(value)}")
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
    _string_schema(
        minLength=1, maxLength=LABEL_MAX_LENGTH, pattern="^[^\\u0000-\\u001f\\u007f-\\u009f]*$"
    ),
]
PublicAddress = Annotated[
    StrictStr, AfterValidator(_check_public_address), _string_schema(format="ipvanyaddress")
]
PositiveInt = Annotated[StrictInt, Field(gt=0)]
Port = Annotated[StrictInt, Field(ge=1, le=65535)]
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
    vms: tuple[Duid, ...]


class Filesystem(DocumentModel):
    mountpoint: Mountpoint
    size_gib: PositiveInt
    fs_type: FsType


class Disk(DocumentModel):
    size_gib: PositiveInt
    filesystems: tuple[Filesystem, ...]


class Vm(DocumentModel):
    duid: Duid
    role: VmRole
    environment: Duid
    memory_mib: PositiveInt
    vcpus: PositiveInt
    disks: tuple[Disk, ...] = Field(min_length=1)


class PortMapping(DocumentModel):
    protocol: Literal["tcp", "udp"]
    external_port: Port
    vms: tuple[Duid, ...] = Field(min_length=1)
    internal_port: Port


class PublicIp(DocumentModel):
    duid: Duid
    port_mappings: tuple[PortMapping, ...]


class DatabaseGroup(DocumentModel):
    duid: Duid
    engine: Literal["mysql", "postgresql"]
    version: EngineVersion
    master: Duid
    replicas: tuple[Duid, ...]


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
    shared_filesystems: tuple[SharedFilesystemMove, ...]
    ip_equivalences: tuple[IpEquivalence, ...]
    databases: tuple[DatabaseMove, ...]
    local_filesystems: tuple[LocalFilesystemMove, ...]


class MigrationDocument(DocumentModel):
    version: Annotated[Literal[1], BeforeValidator(_exactly_int)]
    customer: Customer
    environments: tuple[Environment, ...]
    vms: tuple[Vm, ...]
    public_ips: tuple[PublicIp, ...]
    database_groups: tuple[DatabaseGroup, ...]
    migration: Migration


class DocumentError(BaseModel):
    """One problem in a submitted document: where (RFC 6901 JSON Pointer) and what."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    path: str
    message: str


def json_pointer(*parts: str | int) -> str:
    """The RFC 6901 pointer to `parts` ("" for the root), escaping "~" and "/"."""
    return "".join("/" + str(part).replace("~", "~0").replace("/", "~1") for part in parts)


def _structural_error(error: ErrorDetails) -> DocumentError:
    loc, kind, ctx = error["loc"], error["type"], error.get("ctx", {})
    got = _show(error.get("input"))
    if kind == "missing":
        message = f"required field {_show(loc[-1])} is missing"
    elif kind == "extra_forbidden":
        message = f"unknown field {_show(loc[-1])}"
    elif kind == "value_error":
        message = str(ctx["error"])
    elif kind == "model_type":
        message = f"expected an object, got {got}"
    elif kind in ("tuple_type", "list_type"):
        message = f"expected an array, got {got}"
    elif kind == "too_short":
        message = f"needs at least {ctx['min_length']} item(s), got {ctx['actual_length']}"
    elif kind == "literal_error":
        message = f"must be {ctx['expected']}, got {got}"
    else:  # pydantic's wording is plain enough: "Input should be greater than 0"
        message = f"{error['msg']}, got {got}"
    return DocumentError(path=json_pointer(*loc), message=message)


def structural_errors(exc: ValidationError) -> list[DocumentError]:
    """Every problem pydantic found in a document's shape, as DocumentErrors."""
    errors = [(e["type"], _structural_error(e)) for e in exc.errors()]
    # pydantic counts only the items that validated, so a one-item array whose item is
    # wrong is also "too short"; the item's own error is the one worth reading.
    return [
        error
        for kind, error in errors
        if kind != "too_short"
        or not any(other.path.startswith(error.path + "/") for _, other in errors)
    ]
