"""Settings from the environment (prefix FERRY_), built once at start and passed down."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

SERVICES = ("intake", "resolver", "snapshotter", "archiver", "transfer")


class Settings(BaseSettings):
    """Every knob Ferry reads. Tests build their own instead of touching the environment."""

    model_config = SettingsConfigDict(env_prefix="FERRY_", extra="ignore")

    broker_url: str = "memory://"
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
    staging_dir: Path = Path(".ferry/staging")
    compression: str = Field(default="zstd", pattern=r"^(zstd|gzip)$")
    destination: str | None = None  # user@host:/path, or a local path

    @field_validator("retry_delays", mode="before")
    @classmethod
    def _split_delays(cls, value: object) -> object:
        if isinstance(value, str):
            return tuple(float(part) for part in value.split(",") if part.strip())
        return value

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
