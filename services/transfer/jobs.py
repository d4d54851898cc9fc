"""The transfer job: each claim of a transfer is one attempt at sending its archive.

An attempt creates the directory at the destination, runs rsync (which resumes from what
an earlier attempt left there), then compares the sha256 of the file at the destination
with the archive's, then sends the archive's manifest beside it and checks that too
(services.transfer.manifests). It returns what happened; the worker applies the transfer's
retry policy (exponential, jittered, `transfer_attempts` at most) to a transient failure. A
permanent failure, the last attempt or a second sha256 mismatch fails the job.
"""

from __future__ import annotations

import logging
import posixpath
import re
import threading
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sqlalchemy import ColumnElement, Engine, Row, and_, func, select

from services.transfer import ledger, rsync
from services.transfer.attempts import Attempt, Ending
from services.transfer.destination import (
    Destination,
    open_host,
    parse_destination,
    rsync_argv_to,
)
from services.transfer.manifests import (
    check_arrived,
    manifest_name,
    send_manifest,
    staged_manifest,
)
from services.transfer.progress import ProgressReporter
from services.transfer.tables import transfers
from shared.db import is_postgres
from shared.digests import file_sha256
from shared.errors import PermanentError, ServiceStoppingError, TransientError, UnexpectedExit
from shared.failpoints import failpoint
from shared.hosts import Host, HostPool, LocalExecutor
from shared.inbox_outbox import UnitOfWork
from shared.jobs import RUNNING, Done, Failed, Lease, Leases, Outcome, RetryIn
from shared.settings import Settings

log = logging.getLogger(__name__)

CLAIM_LOCK = zlib.crc32(b"ferry-transfer-claim")  # PostgreSQL advisory lock key
HASH_BYTES_PER_S = 20e6  # the slowest hashing we allow for at the destination
# openssl hashes with the CPU's SHA extensions where coreutils' sha256sum does not: 0.34 s of
# CPU against 1.6 s for 512 MiB on this machine; sha256sum where openssl is missing
HASHERS = (["openssl", "dgst", "-sha256", "-r", "--"], ["sha256sum", "--"])
_DIGEST = re.compile(rb"^([0-9a-f]{64})[ \t]")


class TransferInterruptedError(ServiceStoppingError):
    """The service is stopping: rsync was stopped, the next attempt resumes."""


class ChecksumMismatchError(PermanentError):
    """The file at the destination is not the archive, even after a resend from zero."""


@dataclass
class TransferContext:
    """What every attempt needs besides its lease, wired by bootstrap."""

    settings: Settings
    hosts: HostPool
    stopping: threading.Event = field(default_factory=threading.Event)
    # the only staging an attempt sends from: `<staging>/<dc>` for a datacenter's worker
    staging: Path | None = None

    @property
    def staging_dir(self) -> Path:
        return (self.staging or self.settings.staging_dir).absolute()

    def stop(self) -> None:
        """Stop the running rsyncs (at their next progress line) and close the destination
        connections; what that cuts short is given back as interrupted, not failed."""
        self.stopping.set()
        self.hosts.close_all()


class TransferLeases(Leases):
    """Leases on `transfers` that never let more than `max_parallel` transfers run at once
    on one link, (datacenter, destination), however many workers claim. A datacenter's
    leases claim only that datacenter's jobs: its workers can read no other staging."""

    def __init__(self, engine: Engine, lease_seconds: float, max_parallel: int,
                 datacenter: str | None = None) -> None:
        super().__init__(engine, transfers, lease_seconds)
        self.max_parallel = max_parallel
        self.datacenter = datacenter

    def mine(self) -> ColumnElement[bool] | None:
        """This datacenter's jobs (None: every job, a transfer serving all datacenters)."""
        return None if self.datacenter is None else transfers.c.datacenter == self.datacenter

    def room(self) -> ColumnElement[bool]:
        """Jobs whose link runs fewer than max_parallel live (unexpired) transfers."""
        busy = transfers.alias("busy")
        live = [busy.c.state == RUNNING, busy.c.lease_expires_at >= time.time()]
        if self.datacenter is not None:  # this datacenter's link to each destination
            live.append(busy.c.datacenter == self.datacenter)
        full = (select(busy.c.destination).where(*live)
                .group_by(busy.c.destination).having(func.count() >= self.max_parallel))
        return transfers.c.destination.not_in(full)

    def claim(self, owner: str, where: ColumnElement[bool] | None = None) -> Row[Any] | None:
        """Claim as Leases does, this datacenter's jobs only, within the per-link limit. On
        PostgreSQL, claims take turns on an advisory lock: two claims counting the same
        running jobs at once could both see room for one more. SQLite's BEGIN IMMEDIATE
        serialises them anyway."""
        room = and_(*(c for c in (self.room(), self.mine(), where) if c is not None))
        if not is_postgres(self.engine):
            return super().claim(owner, room)
        with self.engine.connect() as lock:  # held until this transaction ends, however
            lock.execute(select(func.pg_advisory_xact_lock(CLAIM_LOCK)))
            try:
                return super().claim(owner, room)
            finally:
                lock.rollback()


def run_transfer(lease: Lease, ctx: TransferContext) -> Outcome:
    """One attempt at the leased job; the worker applies the retry policy to what it returns.
    Raises LeaseLostError, PermanentError for a job no attempt can send (its name unsafe)."""
    job, settings = lease.job, ctx.settings
    destination = parse_destination(job.destination, settings)
    source, size = Path(job.payload["path"]), int(job.payload["bytes"])
    remote = destination.file_path(job.migration_id, job.payload["file_name"])
    attempt = Attempt.start(lease)
    try:
        check_source(source, size, job.payload["sha256"], job.archive_id, ctx.staging_dir)
        host = ctx.hosts.get(job.destination)
        host.run(["mkdir", "-p", "--", posixpath.dirname(remote)],
                 timeout=settings.ssh_connect_timeout + 30)
        attempt.stats = send(ctx, lease, destination, source, remote)
        digest = sha256_at(destination, host, remote, size, settings)
        if digest != job.payload["sha256"]:
            # rsync's quick check or --append would keep a damaged copy forever: remove it
            host.run(["rm", "-f", "--", remote], timeout=settings.ssh_connect_timeout + 30)
            return resend_from_zero(lease, attempt, (
                f"sha256 at {destination.address}:{remote} is {digest}, the archive's is "
                f"{job.payload['sha256']}; removed it"))
        manifest = transfer_manifest(ctx, lease, destination, host, source)
        failpoint("transfer.after_verify")  # verified, not recorded: rsync again is a no-op
    except TransientError as error:
        if ctx.stopping.is_set():
            # the stop cut this attempt short (rsync stopped, a host closed): no failed try
            return RetryIn(0, str(error), counts_as_attempt=False,
                           record=attempt.ended(Ending.INTERRUPTED, error))
        return RetryIn(None, str(error), record=attempt.ended(Ending.RETRY, error))
    except PermanentError as error:
        return Failed(error, record=attempt.ended(Ending.FAILED, error))
    return transferred(lease, attempt, destination, remote, digest, manifest)


def transfer_manifest(ctx: TransferContext, lease: Lease, destination: Destination, host: Host,
                      source: Path) -> dict[str, Any]:
    """Send the archive's manifest and check its sha256 there; what the job's result says of
    it. An archive made before manifests has none: sent without, no deep verify possible.
    Raises ManifestInvalidError, TransientError, and what rsync raises."""
    job, settings = lease.job, ctx.settings
    staged = staged_manifest(source, job.payload)
    if staged is None:
        log.info("transfer %s: archive %s has no manifest (made before manifests): sent "
                 "without, no deep verify possible", job.id, job.archive_id)
        return {"manifest": None}
    remote_manifest = destination.file_path(job.migration_id,
                                            manifest_name(job.payload["file_name"]))
    send_manifest(staged, destination, remote_manifest, settings)
    check_arrived(staged, sha256_at(destination, host, remote_manifest, staged.size, settings),
                  destination, host, remote_manifest, settings)
    return {"manifest": remote_manifest, "manifest_sha256": staged.sha256}


def resend_from_zero(lease: Lease, attempt: Attempt, reason: str) -> RetryIn:
    """Send the archive again at once, after its damaged copy was removed. Raises
    ChecksumMismatchError when that was the resend already."""
    job = lease.job
    if job.verify_failures:
        raise ChecksumMismatchError(f"{reason}, again after a resend from zero (is the staging "
                                    f"file {job.payload['path']} itself damaged?)")
    log.warning("transfer %s: %s, sending it again from zero", job.id, reason)
    return RetryIn(0, reason, values={"verify_failures": 1},
                   record=attempt.ended(Ending.SHA256_MISMATCH, reason))


def check_source(source: Path, size: int, sha256: str, archive_id: str,
                 staging: Path) -> None:
    """The staging file is the archive the archiver recorded, re-checked before anything is
    sent: inside staging, its size, its sha256. Raises PermanentError when it is not."""
    if not source.resolve().is_relative_to(staging.resolve()):
        raise PermanentError(f"archive {archive_id}: {source} is not in the staging directory "
                             f"{staging}")
    try:
        actual = source.stat().st_size
        if actual == size:
            digest = file_sha256(source)
    except OSError as error:
        raise PermanentError(f"archive {archive_id}: staging file {source} is unreadable: "
                             f"{error.strerror}") from error
    if actual != size:
        raise PermanentError(f"archive {archive_id}: staging file {source} has {actual} bytes, "
                             f"archive.completed recorded {size}")
    if digest != sha256:
        raise PermanentError(f"archive {archive_id}: staging file {source} has sha256 {digest}, "
                             f"archive.completed recorded {sha256}")


def send(ctx: TransferContext, lease: Lease, destination: Destination, source: Path,
         remote: str) -> dict[str, int]:
    """Run rsync with progress reporting; its --stats. Raises RsyncError, RsyncFailedError,
    HostKeyError, TransferInterruptedError, LeaseLostError."""
    settings = ctx.settings
    argv = rsync_argv_to(destination, source, remote, settings)
    reporter = ProgressReporter(lease, settings.transfer_progress_seconds)
    size = int(lease.job.payload["bytes"])

    def on_progress(progress: rsync.Progress) -> None:
        if ctx.stopping.is_set():
            raise TransferInterruptedError("the transfer service is stopping")
        if 0 < progress.bytes_done < size:
            failpoint("transfer.mid_rsync")  # part of it there: the next rsync appends the rest
        reporter.update(progress)

    output = rsync.RsyncOutput(on_progress=on_progress)
    try:
        LocalExecutor("rsync").run(argv, sink=output.feed)
    except UnexpectedExit as error:
        raise rsync.classify(error.exited, error.stderr_tail) from error
    output.close()
    return output.stats


def sha256_at(destination: Destination, host: Host, path: str, size: int,
              settings: Settings) -> str:
    """The sha256 of the file at the destination (sha256sum over SSH, or hashlib here)."""
    if destination.is_local:
        try:
            return file_sha256(Path(path))
        except OSError as error:
            raise TransientError(f"cannot read {path} to hash it: {error}") from error
    for hasher in HASHERS:
        result = host.run([*hasher, path], ok_exits=(0, 127),
                          timeout=settings.transfer_timeout_seconds + size / HASH_BYTES_PER_S)
        if result.exited == 127:
            continue  # not installed there: the next one
        match = _DIGEST.match(result.stdout)
        if match is None:
            raise TransientError(f"{hasher[0]} at {destination.address} printed "
                                 f"{result.stdout[:200]!r}, not a sha256")
        return match[1].decode()
    raise PermanentError(f"{destination.address} has neither openssl nor sha256sum to check "
                         f"{path} with")


def transferred(lease: Lease, attempt: Attempt, destination: Destination, remote: str,
                digest: str, manifest: dict[str, Any] | None = None) -> Done:
    """The job done with the verified copy; its record marks the job's requests transferred
    and announces them (the migration too, when that was its last), with the job's row."""
    job = lease.job
    # from the first attempt's start: retries and their waits count, as the operator waited
    duration = max(time.time() - attempt.first_started(), 1e-6)
    size = int(job.payload["bytes"])
    result = {"destination": f"{destination.address}:{remote}" if destination.host else remote,
              "bytes": size, "duration_s": round(duration, 3),
              "mb_per_s": round(size / duration / 1e6, 3), "sha256": digest,
              "attempt_stats": attempt.stats, **(manifest or {})}

    def record(uow: UnitOfWork) -> None:
        ledger.lock_migration(uow.connection, job.migration_id)
        attempt.record(uow.connection, Ending.TRANSFERRED)
        ledger.announce_transferred(uow.connection, uow.outbox, job, result)

    log.info("transfer %s: %s verified at %s (%.1f MB/s)", job.id, job.archive_id,
             result["destination"], result["mb_per_s"])
    return Done(result=result, values={"bytes_done": size, "eta_seconds": 0.0, "error": None},
                record=record)


def fail_transfer(lease: Lease, error: BaseException, uow: UnitOfWork) -> None:
    """The worker's failure hook, before it marks the job failed: transfer.failed for each
    of the job's requests, and the migration fails. What they say (the job's archive and
    its attempts) is in the claimed row already."""
    lease.update(uow.connection)  # the job row first, as every transaction here (ledger)
    ledger.lock_migration(uow.connection, lease.job.migration_id)
    ledger.announce_failed(uow.connection, uow.outbox, lease.job, str(error))


def destination_pool(settings: Settings) -> HostPool:
    """Hosts for recorded destinations, one connection each, opened on first use."""
    return HostPool(lambda text: open_host(parse_destination(text, settings), settings))
