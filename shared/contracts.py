"""One pydantic payload model per event type: both ends validate the same schema.

Events are past tense. `TYPE` is the routing key's first part; events a datacenter routes
carry a `datacenter` field and are published as `<type>.<datacenter>`.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from shared.errors import MalformedMessageError

ArchiveKind = Literal["local_fs", "shared_fs", "database", "db_server_root"]
SnapshotDriver = Literal["dm", "lvm", "none"]

EVENTS: dict[str, type[Event]] = {}


class Event(BaseModel):
    """Base of every payload. Subclasses set TYPE and register themselves."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    TYPE: ClassVar[str] = ""
    ROUTED_BY_DATACENTER: ClassVar[bool] = False

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if cls.TYPE:
            EVENTS[cls.TYPE] = cls


class _DatacenterEvent(Event):
    ROUTED_BY_DATACENTER: ClassVar[bool] = True
    datacenter: str = Field(pattern=r"^[a-z0-9][a-z0-9_-]{0,31}$")


class MigrationSubmitted(Event):
    TYPE: ClassVar[str] = "migration.submitted"
    customer_id: str
    document: dict[str, Any]  # exactly as received; parsed with shared.document


class ArchiveSource(BaseModel):
    """Where an archive's data lives on the old site, from the inventory (never free text)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    host: str  # the SSH address of the VM, replica or Xen host; "local" for the local executor
    path: str | None = None  # mountpoint or directory for filesystem kinds
    device: str | None = None  # block device / LV for local filesystems
    database: str | None = None
    engine: Literal["mysql", "postgresql"] | None = None
    excludes: tuple[str, ...] = ()
    pause_replication: bool = False
    label: str = ""  # human name: "ey04-s50000:/", "foobar_production@mysql-mega-2-replica"
    # local_fs: the inventory's filesystem type, the only type the archiver mounts it as
    # (never what the customer's bytes claim)
    fs_type: str | None = None
    # the inventory's used bytes: staging must have room for them (times a margin) first
    used_bytes: int = 0
    # shared_fs: the other VMs that mount it, tried in order when `host` cannot be used
    alternates: tuple[str, ...] = ()


class PlannedJob(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    request_id: str
    kind: ArchiveKind
    datacenter: str
    reuse_key: str
    source: ArchiveSource


class MigrationResolved(Event):
    """`jobs` lists every archive the migration needs (local_fs ones included): their
    request ids are the ones the later snapshot.* / archive.* events carry."""

    TYPE: ClassVar[str] = "migration.resolved"
    customer_id: str
    allocations: dict[str, Any]
    resolved_document: dict[str, Any]
    jobs: tuple[PlannedJob, ...]


class MigrationFailed(Event):
    TYPE: ClassVar[str] = "migration.failed"
    stage: str
    reason: str


class SnapshotRequested(Event):
    TYPE: ClassVar[str] = "snapshot.requested"
    request_id: str
    datacenter: str
    xen_host: str
    device: str
    size_bytes: int = Field(ge=0)
    driver: SnapshotDriver
    reuse_key: str
    source: ArchiveSource


class SnapshotReady(_DatacenterEvent):
    """The snapshot is exported (nbd on the Xen host's 127.0.0.1:port), or, with driver
    `none`, the source is to be archived as it is (`source.path` / `source.device`)."""

    TYPE: ClassVar[str] = "snapshot.ready"
    request_id: str
    snapshot_id: str
    driver: SnapshotDriver
    host: str
    export_name: str = ""
    port: int | None = Field(default=None, ge=1, le=65535)
    size_bytes: int = Field(ge=0)
    reuse_key: str
    source: ArchiveSource


class SnapshotReleased(Event):
    """The snapshot is gone from the host. `invalidated`: its COW filled up, so an archive
    reading it fails (archive.failed with will_retry=True) and the snapshotter re-requests
    the same snapshot job with a larger COW: a snapshot.ready with a new snapshot_id follows."""

    TYPE: ClassVar[str] = "snapshot.released"
    request_id: str
    snapshot_id: str
    host: str
    reason: str = ""
    invalidated: bool = False


class SnapshotFailed(Event):
    """No snapshot could be made (bad origin, host refused, COW still too small after the
    last attempt): the request's local_fs archive will not happen."""

    TYPE: ClassVar[str] = "snapshot.failed"
    request_id: str
    datacenter: str
    host: str
    reason: str


class ArchiveRequested(_DatacenterEvent):
    TYPE: ClassVar[str] = "archive.requested"
    request_id: str
    kind: ArchiveKind
    reuse_key: str
    source: ArchiveSource


class ArchiveProgress(_DatacenterEvent):
    TYPE: ClassVar[str] = "archive.progress"
    request_id: str
    stage: Literal["archive", "transfer"]
    bytes_done: int = Field(ge=0)
    bytes_total: int | None = Field(default=None, ge=0)
    mb_per_s: float | None = None
    eta_s: float | None = Field(default=None, ge=0)  # seconds left, when the stage knows


class ArchiveCompleted(_DatacenterEvent):
    TYPE: ClassVar[str] = "archive.completed"
    request_id: str
    archive_id: str
    kind: ArchiveKind
    reuse_key: str
    path: str
    file_name: str
    raw_bytes: int = Field(ge=0)
    compressed_bytes: int = Field(ge=0)
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    started_at: datetime
    finished_at: datetime
    warnings: tuple[str, ...] = ()
    reused: bool = False
    # local_fs: the snapshot.ready's snapshot_id it read, so the snapshotter tells attempts apart
    snapshot_id: str = ""
    # the sha256 of the manifest beside the archive (`<file_name>.manifest.jsonl`, see
    # shared.manifest); "" when the event does not say (the transfer then checks the
    # manifest against the archive's sha256 it names, and its own trailer)
    manifest_sha256: str = Field(default="", pattern=r"^([0-9a-f]{64})?$")


class ArchiveFailed(_DatacenterEvent):
    TYPE: ClassVar[str] = "archive.failed"
    request_id: str
    kind: ArchiveKind
    reason: str
    host: str = ""
    command: str = ""
    stderr_tail: str = ""
    will_retry: bool = False  # e.g. a snapshot whose COW filled up is retried with a larger one
    snapshot_id: str = ""  # local_fs: the snapshot.ready it read (see ArchiveCompleted)


class TransferCompleted(Event):
    TYPE: ClassVar[str] = "transfer.completed"
    request_id: str
    archive_id: str
    destination: str
    bytes: int = Field(ge=0)
    duration_s: float = Field(ge=0)
    mb_per_s: float = Field(ge=0)
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")


class TransferFailed(Event):
    TYPE: ClassVar[str] = "transfer.failed"
    request_id: str
    archive_id: str
    reason: str
    attempts: int = Field(ge=0)


class MigrationCompleted(Event):
    TYPE: ClassVar[str] = "migration.completed"
    archives: int = Field(ge=0)
    bytes: int = Field(ge=0)


def parse_event(event_type: str, payload: dict[str, Any]) -> Event:
    """Validate a payload against its type's model.

    Raises MalformedMessageError for an unknown type or a payload that fails its schema.
    """
    model = EVENTS.get(event_type)
    if model is None:
        raise MalformedMessageError(f"unknown event type {event_type!r}")
    try:
        return model.model_validate(payload)
    except ValidationError as error:
        first = error.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "payload"
        raise MalformedMessageError(
            f"{event_type} payload invalid ({error.error_count()} errors): {where}: {first['msg']}"
        ) from error


def routing_key_for(event_type: str, payload: dict[str, Any]) -> str:
    """`type`, or `type.<datacenter>` for datacenter-routed events."""
    model = EVENTS.get(event_type)
    if model is not None and model.ROUTED_BY_DATACENTER and payload.get("datacenter"):
        return f"{event_type}.{payload['datacenter']}"
    return event_type
