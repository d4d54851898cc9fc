"""Settings from the environment (prefix FERRY_), built once at start and passed down."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Annotated

from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from shared.embedded_broker import embedded_url

SERVICES = ("intake", "resolver", "snapshotter", "archiver", "transfer")


class Settings(BaseSettings):
    """Every knob Ferry reads. Tests build their own instead of touching the environment."""

    model_config = SettingsConfigDict(env_prefix="FERRY_", extra="ignore")

    # Unset: the embedded broker in <state_dir>/broker.sqlite3 (shared.embedded_broker),
    # durable across a SIGKILL; `amqp://…` for RabbitMQ; `memory://` for tests in one process.
    broker_url: str = ""
    # Each service's own broker user (`ferry broker setup`); unset, FERRY_BROKER_URL's.
    intake_broker_url: str | None = None
    resolver_broker_url: str | None = None
    snapshotter_broker_url: str | None = None
    archiver_broker_url: str | None = None
    transfer_broker_url: str | None = None
    state_dir: Path = Path(".ferry")
    intake_database_url: str | None = None
    resolver_database_url: str | None = None
    snapshotter_database_url: str | None = None
    archiver_database_url: str | None = None
    transfer_database_url: str | None = None

    # Delay tiers for transient failures, in seconds; attempt n waits tier min(n, last).
    retry_delays: Annotated[tuple[float, ...], NoDecode] = (1.0, 5.0, 30.0, 120.0, 600.0)
    max_attempts: int = Field(default=6, ge=1)
    # Broker-side guard for a message that kills its consumer before any ack.
    delivery_limit: int = Field(default=10, ge=1)
    prefetch: int = Field(default=16, ge=1)
    outbox_relay: bool = True
    outbox_poll_seconds: float = Field(default=0.5, gt=0)
    lease_seconds: float = Field(default=60.0, gt=0)
    job_poll_seconds: float = Field(default=1.0, gt=0)
    datacenter: str | None = None
    concurrency: int = Field(default=2, ge=1)

    # Hosts on the old site are reached over SSH with one key and a strict known_hosts file.
    ssh_user: str = "root"
    ssh_key_path: Path | None = None
    ssh_known_hosts_path: Path | None = None
    ssh_connect_timeout: float = Field(default=10.0, gt=0)
    command_timeout: float | None = Field(default=None, gt=0)

    inventory: str | None = None  # a YAML/JSON file, or an http(s) URL of the old site's API
    inventory_timeout: float = Field(default=10.0, gt=0)  # seconds per inventory HTTP request
    inventory_token: str | None = None  # sent as `Authorization: Bearer` to an HTTP inventory

    # The new site's entities (resolver). Names: <site>-s<5 digits> for VMs, <site>-e<5 digits>
    # for environments, numbered from the first numbers, never reused.
    site: str = Field(default="tm21", pattern=r"^[a-z][a-z0-9]{0,15}$")
    vm_first_number: int = Field(default=101, ge=0, le=99999)
    env_first_number: int = Field(default=50, ge=0, le=99999)
    # Comma-separated CIDRs, single addresses and a-b ranges.
    public_ip_pool: str = "198.51.100.0/24"
    # Comma-separated VLAN ids and a-b ranges; VLAN n gets subnet n of internal_network.
    vlan_range: str = "100-4000"
    internal_network: str = "10.128.0.0/12"
    internal_subnet_prefix: int = Field(default=24, ge=16, le=29)
    staging_dir: Path = Path(".ferry/staging")
    compression: str = Field(default="zstd", pattern=r"^(zstd|gzip)$")
    destination: str | None = None  # user@host:/path, or a local path
    # Transfer to the new site (services/transfer): rsync over ssh, retried and resumed.
    # `destination` also takes user@host:port:/path; unset, it is <state_dir>/destination.
    destination_ssh_key_path: Path | None = None  # default: ssh_key_path
    destination_known_hosts_path: Path | None = None  # default: ssh_known_hosts_path
    transfer_bwlimit_kbps: int | None = Field(default=None, ge=1)  # rsync --bwlimit, KiB/s
    transfer_max_parallel: int = Field(default=2, ge=1)  # running transfers per destination
    transfer_timeout_seconds: int = Field(default=300, ge=1)  # rsync --timeout: stalled I/O
    transfer_attempts: int = Field(default=8, ge=1)
    transfer_backoff_seconds: float = Field(default=5.0, gt=0)  # doubles per attempt, jittered
    transfer_backoff_max_seconds: float = Field(default=900.0, gt=0)
    transfer_progress_seconds: float = Field(default=5.0, gt=0)  # between archive.progress

    # Archiver: source commands run under `nice -n 19 ionice -c3` unless FERRY_SOURCE_NICE=false
    # (the customer's VM or replica is live); compression runs on the archiver host.
    source_nice: bool = True
    zstd_level: int = Field(default=3, ge=1, le=19)
    gzip_level: int = Field(default=2, ge=0, le=3)  # ISA-L levels; 2 is its speed/size sweet spot
    # 0: every core of the archiver host; 1: zstd compresses in the streaming thread itself
    compression_threads: int = Field(default=0, ge=0)
    archive_progress_seconds: float = Field(default=5.0, gt=0)
    # Archiver reuse and staging retention (issue 13 part 3). Only a shared database
    # server's root archive is reused: for the other customers on that server, while it is
    # younger than archive_reuse_seconds (every other kind is archived afresh per request).
    # An archive's staging file is deleted once every request for it was transferred and
    # verified and it is past that age (other kinds: at once), every staging_gc_seconds
    # (0: only when `ferry archives gc` is run).
    archive_reuse_seconds: float = Field(default=86400.0, ge=0)
    staging_gc_seconds: float = Field(default=60.0, ge=0)
    # Before an archive starts, staging must have its source's used bytes times this margin
    # free, plus what the archives running there still expect; else the job waits (no
    # attempt spent) and looks again after staging_wait_seconds. 1.1: compressed output is
    # usually far smaller, but already compressed data (media, backups) barely shrinks, and
    # the source may have grown since the inventory counted it.
    staging_space_margin: float = Field(default=1.1, gt=0)
    staging_wait_seconds: float = Field(default=30.0, gt=0)
    # How mysqldump / pg_dump on the replica connect (None: the client's defaults there).
    source_db_user: str | None = None
    source_db_host: str | None = None
    source_db_port: int | None = Field(default=None, ge=1, le=65535)
    source_db_defaults_file: str | None = None  # mysql --defaults-extra-file on the source host
    # A shared filesystem is archived only from a VM whose mount table shows it mounted with
    # a shared type (services/archiver/placement.py lists them; add a site's own here) and
    # not empty. Off only for the demo and tests that archive a plain directory as one.
    shared_fs_mount_check: bool = True
    shared_fs_extra_types: Annotated[tuple[str, ...], NoDecode] = ()

    # Intake's HTTP API: where `ferry run intake` listens, and the bearer token it demands.
    # Without a token intake refuses to start, unless told insecure_no_auth, and then only
    # on a loopback address (`ferry run all` makes a token up instead).
    intake_bind: str = Field(default="127.0.0.1:8080", pattern=r"^\S+:[0-9]{1,5}$")
    api_token: str | None = None
    insecure_no_auth: bool = False
    # An inventory host `local` is this very machine (the archiver's or snapshotter's own),
    # reached without SSH: for the demo and the tests only, never by default.
    allow_local_hosts: bool = False

    # Snapshotter: COW size = share of the origin (doubled on each retry after a COW filled
    # up), from an LV in snapshot_cow_vg when set, else a loop-mounted file in snapshot_cow_dir
    # on the Xen host. At most snapshots_per_host at a time on one Xen host.
    snapshot_cow_share: float = Field(default=0.2, gt=0, le=1)
    snapshot_cow_vg: str | None = Field(default=None, pattern=r"^[A-Za-z0-9_.+][A-Za-z0-9_.+-]*$")
    snapshot_cow_dir: str = Field(default="/var/lib/ferry/cow", pattern=r"^/[A-Za-z0-9_./-]*$")
    snapshot_cow_attempts: int = Field(default=3, ge=1)  # COW-full retries before failing
    snapshots_per_host: int = Field(default=1, ge=1)
    snapshot_watch_seconds: float = Field(default=5.0, gt=0)  # COW usage poll while active
    snapshot_slot_wait_seconds: float = Field(default=5.0, gt=0)  # re-check a full host after
    reconcile_seconds: float = Field(default=180.0, gt=0)
    # Archiver: where shared.nbd records each snapshot it mounted (unset: <state_dir>/nbd);
    # the archiver undoes what dead workers left there at start and every reconcile_seconds.
    nbd_run_dir: Path | None = None

    # Metrics and logs for the operator (shared/metrics.py, shared/logs.py). Intake serves
    # /metrics on its API (without the bearer token unless metrics_require_token); the other
    # services, and `ferry run all`, on metrics_bind:<port> when a port is set: the service's
    # own FERRY_<SERVICE>_METRICS_PORT, else FERRY_METRICS_PORT; unset or 0, no metrics port.
    log_format: str = Field(default="text", pattern=r"^(text|json)$")
    metrics_port: int | None = Field(default=None, ge=0, le=65535)
    intake_metrics_port: int | None = Field(default=None, ge=0, le=65535)
    resolver_metrics_port: int | None = Field(default=None, ge=0, le=65535)
    snapshotter_metrics_port: int | None = Field(default=None, ge=0, le=65535)
    archiver_metrics_port: int | None = Field(default=None, ge=0, le=65535)
    transfer_metrics_port: int | None = Field(default=None, ge=0, le=65535)
    metrics_bind: str = "127.0.0.1"
    metrics_require_token: bool = False

    @field_validator("retry_delays", mode="before")
    @classmethod
    def _split_delays(cls, value: object) -> object:
        if isinstance(value, str):
            return tuple(float(part) for part in value.split(",") if part.strip())
        return value

    @field_validator("shared_fs_extra_types", mode="before")
    @classmethod
    def _split_types(cls, value: object) -> object:
        if isinstance(value, str):
            return tuple(part.strip() for part in value.split(",") if part.strip())
        return value

    @model_validator(mode="after")
    def _embedded_broker_by_default(self) -> Settings:
        if not self.broker_url:
            self.broker_url = embedded_url(self.state_dir)
        return self

    def database_url(self, service: str) -> str:
        """The service's own database URL: its FERRY_<SERVICE>_DATABASE_URL, else a SQLite file.

        Raises ValueError for a service Ferry does not have.
        """
        if service not in SERVICES:
            raise ValueError(f"unknown service {service!r}; known: {', '.join(SERVICES)}")
        url: str | None = getattr(self, f"{service}_database_url")
        if url:
            return url
        return f"sqlite:///{(self.state_dir / f'{service}.sqlite3').resolve()}"

    def broker_url_of(self, service: str) -> str:
        """The broker URL `service` connects with: its FERRY_<SERVICE>_BROKER_URL, else
        FERRY_BROKER_URL (also for a name that is not one of SERVICES, as tests' own)."""
        url: str | None = getattr(self, f"{service}_broker_url", None) if (
            service in SERVICES) else None
        return url or self.broker_url

    def for_service(self, service: str) -> Settings:
        """These settings as `service` uses them: broker_url is its own broker URL."""
        url = self.broker_url_of(service)
        return self if url == self.broker_url else self.model_copy(update={"broker_url": url})

    def metrics_port_of(self, services: Sequence[str]) -> int | None:
        """The port a process running `services` serves its metrics on: the one service's
        own FERRY_<SERVICE>_METRICS_PORT when it runs alone and has one, else
        FERRY_METRICS_PORT; None for no metrics port (unset or 0)."""
        port: int | None = None
        if len(services) == 1 and services[0] in SERVICES:
            port = getattr(self, f"{services[0]}_metrics_port")
        if port is None:
            port = self.metrics_port
        return port or None
