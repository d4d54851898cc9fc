"""The snapshotter service's own tables (the inbox and outbox come from shared.inbox_outbox).

`snapshot_jobs` is a leased job table. `state` drives the workers (pending, running, done,
failed, plus `active`: a snapshot that exists and is exported, holding its host's slot, not
claimable); `phase` says what the snapshot is doing, for people and for the next claim:
waiting -> creating -> active -> releasing (or invalid) -> released (or failed).
"""

from __future__ import annotations

from sqlalchemy import BigInteger, Boolean, Column, Index, Integer, MetaData, String, Table, Text

from shared.jobs import job_table

# The job state beyond shared.jobs' pending/running/done/failed: the snapshot exists and is
# exported, holds its host's slot, and is not claimable until marked for release.
ACTIVE = "active"
# Phases (`active` and `failed` are phases too, named as the states).
WAITING = "waiting"  # for a worker, or for a slot on its host
CREATING = "creating"  # the snapshot id is recorded; the host is being touched
RELEASING = "releasing"  # marked for release: a worker tears it down
INVALID = "invalid"  # its COW filled up: torn down, then retried with a larger COW
RELEASED = "released"

metadata = MetaData()

snapshot_jobs = job_table(
    "snapshot_jobs",
    metadata,
    Column("request_id", String(64), nullable=False, unique=True),
    Column("xen_host", String(255), nullable=False),
    Column("datacenter", String(32), nullable=False),
    Column("driver", String(8), nullable=False),
    Column("phase", String(16), nullable=False),
    Column("admitted", Boolean, nullable=False, default=False),  # holds a slot on its host
    Column("cow_attempt", Integer, nullable=False, default=0),  # COW-full retries so far
    Column("snapshot_id", String(80), nullable=True),  # ferry-<id>-<attempt> of this attempt
    Column("export_port", Integer, nullable=True),
    Column("cow_bytes", BigInteger, nullable=True),
    Column("release_reason", Text, nullable=True),
)
Index("ix_snapshot_jobs_host", snapshot_jobs.c.xen_host, snapshot_jobs.c.admitted)

# One row per Xen host: admission locks it (SELECT ... FOR UPDATE), so two workers cannot
# both take the last snapshot slot of a host.
snapshot_hosts = Table(
    "snapshot_hosts",
    metadata,
    Column("xen_host", String(255), primary_key=True),
)
