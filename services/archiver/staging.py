"""Staging space: room checked before an archive starts, files deleted once no one needs them.

- Before an archive starts (`reserve`), staging must have the source's used bytes (the
  inventory's) times `staging_space_margin` free, plus what the archives running in this
  staging still expect (what they counted on at their start, less what they wrote since).
  Without room the job waits, no attempt spent; an archive larger than the whole staging
  filesystem fails at once. Checks are serialised (an advisory lock on PostgreSQL, SQLite's
  write lock), so two archives starting together cannot both count on the same free bytes.
- A disk that fills anyway (ENOSPC while writing) fails the attempt with StagingFullError;
  the writer removes the partial file (jobs.py).
- `collect` deletes a finished archive's staging files once every request it answered was
  transferred and verified (transfer.completed) and it is past its reuse age: a shared
  database server's root `archive_reuse_seconds` after it finished (or at once when it may
  no longer be reused: refreshed, dropped), every other kind at once. The archiver runs it
  every `staging_gc_seconds` for its datacenter; `ferry archives gc` on demand.
"""

from __future__ import annotations

import logging
import math
import os
import time
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy import Connection, Engine, Row, func, select, text, update

from services.archiver.tables import (
    COMPLETED,
    WAITING,
    archive_jobs,
    archive_keys,
    archive_requests,
)
from shared.errors import PermanentError, TransientError
from shared.jobs import DONE, RUNNING, Lease, RetryIn
from shared.settings import Settings

log = logging.getLogger(__name__)

SERVER_ROOT = "db_server_root"  # the one kind whose archive is reused


class StagingFullError(TransientError):
    """The staging filesystem filled up while an archive was written (ENOSPC)."""


class StagingTooSmallError(PermanentError):
    """An archive needs more room than the whole staging filesystem has."""


def reservation_tag(owner: str, attempts: int) -> str:
    """Which attempt a reservation belongs to: a later attempt's is its own."""
    return f"{owner}#{attempts}"


def written(staging: Path, archive_id: str) -> int:
    """Bytes the archive's partial files in `staging` hold now."""
    total = 0
    for partial in staging.glob(f"{archive_id}.*.partial"):
        try:
            total += partial.stat().st_size
        except FileNotFoundError:
            continue
    return total


def _lock_staging(connection: Connection, staging: Path) -> None:
    if connection.dialect.name == "postgresql":  # SQLite: BEGIN IMMEDIATE holds the lock
        key = zlib.crc32(f"ferry-staging-{staging}".encode())
        connection.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": key})


def expected_by_running(connection: Connection, staging: Path, datacenter: str,
                        archive_id: str, now: float) -> int:
    """What the other archives running in this staging still expect to write: their
    reservation less what they wrote so far (a reservation of an earlier attempt, or of an
    attempt whose lease expired, counts nothing)."""
    t = archive_jobs
    rows = connection.execute(select(
        t.c.id, t.c.staging_reserved, t.c.reserved_for, t.c.lease_owner, t.c.attempts,
        t.c.lease_expires_at).where(
            t.c.datacenter == datacenter, t.c.state == RUNNING, t.c.id != archive_id,
            t.c.staging_reserved.is_not(None)))
    expected = 0
    for row in rows:
        live = (row.lease_expires_at or 0) >= now and row.reserved_for == reservation_tag(
            str(row.lease_owner), int(row.attempts))
        if live:
            expected += max(0, int(row.staging_reserved) - written(staging, row.id))
    return expected


def reserve(lease: Lease, staging: Path, datacenter: str, used_bytes: int,
            settings: Settings, *, started_at: float | None = None) -> RetryIn | None:
    """Count on room for this archive before it starts: None when there is (recorded on the
    job), a RetryIn (no attempt spent) when staging must free up first. A source of unknown
    size (used_bytes 0) is not checked. With `started_at`, the attempt's start (started_at,
    bytes_done 0) is written in the same transaction as the reservation: one per job start.
    Raises StagingTooSmallError when even an empty staging could not hold it, LeaseLostError."""
    need = math.ceil(used_bytes * settings.staging_space_margin)
    values: dict[str, Any] = ({} if started_at is None
                              else {"started_at": started_at, "bytes_done": 0})
    if need <= 0:
        if values:
            with lease.units.engine.begin() as connection:
                lease.update(connection, **values)
        return None
    with lease.units.engine.begin() as connection:
        _lock_staging(connection, staging)
        now = time.time()
        expected = expected_by_running(connection, staging, datacenter, lease.job_id, now)
        disk = os.statvfs(staging)
        free, size = disk.f_bavail * disk.f_frsize, disk.f_blocks * disk.f_frsize
        sizing = (f"archive {lease.job_id} needs {need} ({used_bytes} used bytes × "
                  f"{settings.staging_space_margin:g})")
        if need > size:
            raise StagingTooSmallError(f"{sizing}, but staging {staging} holds {size} bytes "
                                       f"in all")
        if free < need + expected:
            return RetryIn(settings.staging_wait_seconds, (
                f"waiting for {need + expected} bytes free in staging {staging} ({free} free): "
                f"{sizing}, running archives there still expect {expected}"),
                counts_as_attempt=False)
        lease.update(connection, staging_reserved=need,
                     reserved_for=reservation_tag(lease.owner, int(lease.job.attempts)),
                     **values)
    return None


# -- retention ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Freed:
    archive_id: str
    path: Path
    bytes: int


def not_reusable(job: Row[Any], now: float, max_age: float) -> str:
    """Why a finished archive may not answer a new request ("" when it may): the one rule
    the handlers (reuse) and `collect` (retention) both follow."""
    if job.kind != SERVER_ROOT:
        return f"a {job.kind} archive is made afresh for every request"
    if job.dropped_at is not None:
        return "dropped"
    if job.removed_at is not None:
        return "its staging file was deleted"
    age = now - float(job.finished_at or 0.0)
    if age > max_age:
        return f"{age:.0f} s old, reused up to {max_age:.0f} s"
    if not Path(str(job.file_path)).is_file():
        return f"its staging file {job.file_path} is gone"
    return ""


def past_reuse(connection: Connection, job: Row[Any], now: float, reuse_seconds: float) -> bool:
    """No later request will reuse this finished archive: not_reusable says why, or it is
    no longer its key's current archive (refreshed)."""
    if not_reusable(job, now, reuse_seconds):
        return True
    current = connection.execute(select(archive_keys.c.archive_id).where(
        archive_keys.c.datacenter == job.datacenter,
        archive_keys.c.reuse_key == job.reuse_key)).scalar()
    return bool(current != job.id)


def all_transferred(connection: Connection, archive_id: str) -> bool:
    """Every request this archive answered was transferred and verified (none waits)."""
    r = archive_requests
    left = connection.execute(select(func.count()).select_from(r).where(
        r.c.archive_id == archive_id,
        (r.c.state == WAITING) | ((r.c.state == COMPLETED) & r.c.transferred_at.is_(None)))
    ).scalar_one()
    return int(left) == 0


def remove_files(job: Row[Any]) -> list[Freed]:
    """Delete the archive's files in its staging directory: the archive and what lies
    beside it under its id (a manifest). Partial files are the sweep's, not touched."""
    final = Path(str(job.file_path))
    freed = []
    for path in sorted(final.parent.glob(f"{job.id}.*")):
        if path.name.endswith(".partial") or not path.is_file():
            continue
        size = path.stat().st_size
        path.unlink(missing_ok=True)
        freed.append(Freed(str(job.id), path, size))
    return freed


def collect(engine: Engine, settings: Settings, *, datacenter: str | None = None,
            now: float | None = None) -> list[Freed]:
    """Delete the staging files no one needs any more (see the module's docstring); what it
    freed. Only archives whose staging directory is on this host: the files of another
    host's staging are left to its archiver."""
    now = time.time() if now is None else now
    t, r, k = archive_jobs, archive_requests, archive_keys
    untransferred = select(r.c.archive_id).where(
        r.c.archive_id.is_not(None),
        (r.c.state == WAITING) | ((r.c.state == COMPLETED) & r.c.transferred_at.is_(None)))
    current = select(k.c.archive_id).where(k.c.archive_id.is_not(None))
    # what past_reuse and all_transferred will say yes to, so only those are locked below
    query = select(t.c.id).where(
        t.c.state == DONE, t.c.removed_at.is_(None), t.c.file_path.is_not(None),
        t.c.id.not_in(untransferred),
        (t.c.kind != SERVER_ROOT) | t.c.dropped_at.is_not(None)
        | (t.c.finished_at < now - settings.archive_reuse_seconds) | t.c.id.not_in(current),
    ).order_by(t.c.finished_at)
    if datacenter is not None:
        query = query.where(t.c.datacenter == datacenter)
    with engine.connect() as connection:
        candidates = list(connection.execute(query).scalars())
    freed: list[Freed] = []
    for archive_id in candidates:
        with engine.begin() as connection:
            # locked: a request being recorded for it waits (or it waits for that request)
            job = connection.execute(select(t).where(
                t.c.id == archive_id, t.c.state == DONE, t.c.removed_at.is_(None))
                .with_for_update()).first()
            if job is None or not Path(str(job.file_path)).parent.is_dir():
                continue
            if not past_reuse(connection, job, now, settings.archive_reuse_seconds):
                continue
            if not all_transferred(connection, archive_id):
                continue
            # deleted before the commit: a commit that fails leaves the row to the next pass
            removed = remove_files(job)
            connection.execute(update(t).where(t.c.id == archive_id).values(
                removed_at=now, updated_at=time.time()))
        for item in removed:
            log.info("staging: removed %s (%d bytes) of archive %s: transferred and past its "
                     "reuse age", item.path, item.bytes, archive_id)
        freed += removed
    return freed
