"""The archive job: stream a source from its host, compress it here, seal it, answer requests.

Run by a `shared.jobs.JobWorker` under a lease: `Archiver.run` returns what the attempt made
(`Done`) or raises, the worker applies it. Every write to the job row is guarded by the lease;
the rename to the final name happens inside the transaction that marks the job done (its
`record`), after that transaction took the row, so a worker that lost its lease never seals
a file.
"""

from __future__ import annotations

import errno
import logging
import time
import uuid
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, select

from services.archiver.compress import (
    EXTENSIONS,
    ArchiveFile,
    ArchiveWriter,
    manifest_path,
    remove_partials,
    seal,
)
from services.archiver.manifest import ManifestWriter
from services.archiver.placement import mounting_host
from services.archiver.probe import Capabilities, Probes, usable_timeout
from services.archiver.records import (
    complete_waiting,
    fail_waiting,
    failure_details,
    payload_snapshot,
    snapshot_id,
    waiting_requests,
)
from services.archiver.replicas import Replica
from services.archiver.snapshots import SnapshotInvalidatedError, mounted_snapshot, run_dir
from services.archiver.sources import (
    TAR_CHANGED,
    ArchiveOrder,
    SourceCommand,
    dump_command,
    filesystem_command,
    snapshot_command,
    validate_order,
)
from services.archiver.staging import StagingFullError, reserve
from services.archiver.tables import archive_jobs
from shared.contracts import ArchiveProgress
from shared.errors import UnexpectedExit
from shared.failpoints import failpoint
from shared.hosts import Host, HostPool, LocalExecutor
from shared.inbox_outbox import UnitOfWork
from shared.jobs import RUNNING, Done, Failed, Lease, Outcome, RetryIn
from shared.settings import Settings

log = logging.getLogger(__name__)

WARNING_LINES = 20  # of tar's stderr kept as warnings


class Archiver:
    """Makes archives for one datacenter: `run` is the JobWorker's work, `fail` its failure."""

    def __init__(self, settings: Settings, engine: Engine, datacenter: str,
                 hosts: HostPool) -> None:
        self.settings = settings
        self.engine = engine  # read by sweep_partials; jobs write through their lease
        self.datacenter = datacenter
        self.hosts = hosts
        # absolute: archive.completed's path is read by other processes on this host
        self.staging = (settings.staging_dir / datacenter).absolute()
        self.probes = Probes()  # each source host's tools, asked once for the process

    def sweep_partials(self) -> list[Path]:
        """At start: delete this host's partial files of archives no one is making any more
        (finished, failed, waiting to start, or gone). A running job's partial stays: its
        next attempt removes it (remove_partials), wherever that attempt runs."""
        if not self.staging.is_dir():
            return []
        leftovers = {p: p.name.split(".", 1)[0] for p in self.staging.glob("*.partial")}
        with self.engine.connect() as connection:
            running = set(connection.execute(select(archive_jobs.c.id).where(
                archive_jobs.c.id.in_(set(leftovers.values())),
                archive_jobs.c.state == RUNNING)).scalars())
        swept = [path for path, archive_id in leftovers.items() if archive_id not in running]
        for path in swept:
            path.unlink(missing_ok=True)
            log.info("removed %s: no attempt is writing it", path)
        return swept

    def run(self, lease: Lease) -> Outcome:
        """Archive the leased job's source into a partial file; Done seals it and answers
        the waiting requests. Raises what the host, the source or the lease raise:
        TransientError is retried by the worker, PermanentError fails the job."""
        order = ArchiveOrder.model_validate(lease.job.payload)
        validate_order(order)
        self.staging.mkdir(parents=True, exist_ok=True)
        for leftover in remove_partials(self.staging, lease.job_id):
            log.info("%s: removed %s left by an earlier attempt", lease.job_id, leftover.name)
        started = time.time()  # recorded with the staging reservation, in one transaction
        waiting = reserve(lease, self.staging, self.datacenter, order.source.used_bytes,
                          self.settings, started_at=started)
        if waiting is not None:  # staging too full for it yet: no attempt spent
            return waiting
        warnings: list[str] = []
        position: dict[str, Any] | None = None
        archive: ArchiveFile | None = None
        try:
            if order.snapshot is not None and order.snapshot.over_nbd:
                # mounted here through the tunnel: tar runs on this host, not the Xen host
                with mounted_snapshot(order.snapshot, self.hosts, run_dir(self.settings),
                                      order.source.fs_type) as mounted:
                    local = LocalExecutor()
                    command = snapshot_command(order, str(mounted), self.settings,
                                               self.probes.of(local))
                    archive = self._stream(lease, local, command, warnings)
            else:
                host = self._source_host(order, warnings)
                tools = self.probes.of(host)  # once per host: old hosts get what they run
                if order.kind == "database":
                    dump = dump_command(order.source, self.settings, tools)  # before a pause
                    replica = Replica(host, order.source, self.settings,
                                      timeout=usable_timeout(host, tools, 60, warnings))
                    with replica.held(order.source.pause_replication, warnings) as position:
                        archive = self._stream(lease, host, dump, warnings, tools)
                else:
                    data_dir = self._data_dir(host, order, warnings, tools)
                    command = filesystem_command(order, self.settings, data_dir, tools)
                    archive = self._stream(lease, host, command, warnings, tools)
            lease.check()  # taken over meanwhile: the partial goes (below), nothing is sealed
        except BaseException:
            if archive is not None:  # not sealed: remove it (and its manifest)
                archive.path.unlink(missing_ok=True)
                if archive.manifest is not None:
                    archive.manifest.unlink(missing_ok=True)
            raise
        return self._done(lease, archive, started, warnings, position)

    def _source_host(self, order: ArchiveOrder, warnings: list[str]) -> Host:
        """The source's host; for a shared filesystem, the first of its VMs on which it is
        really mounted (placement.mounting_host: raises NotMountedError, NoMountingHostError)."""
        if order.kind != "shared_fs" or not self.settings.shared_fs_mount_check:
            return self.hosts.get(order.source.host)
        return mounting_host(self.hosts, order.source.host, order.source.alternates,
                             order.source.path or "", self.settings, warnings)

    def _data_dir(self, host: Host, order: ArchiveOrder, warnings: list[str],
                  tools: Capabilities) -> str | None:
        """A server root's database directory, asked of the server itself: never archived.
        Raises UnexpectedExit when it cannot be asked and the inventory named no excludes."""
        if order.kind != "db_server_root" or order.source.engine is None:
            return None
        timeout = usable_timeout(host, tools, 60, warnings)
        try:
            return Replica(host, order.source, self.settings, timeout=timeout).data_dir()
        except UnexpectedExit as error:
            if not order.source.excludes:
                raise
            warnings.append(f"could not ask {host.name} for its data directory "
                            f"({error.stderr_tail.strip()[-200:]}); left out only "
                            f"{', '.join(order.source.excludes)}")
            return None

    def _stream(self, lease: Lease, host: Host, command: SourceCommand,
                warnings: list[str], tools: Capabilities | None = None) -> ArchiveFile:
        compression = self.settings.compression
        name = f"{lease.job_id}.{command.extension}.{EXTENSIONS[compression]}"
        token = uuid.uuid4().hex[:8]
        partial = self.staging / f"{name}.{token}.partial"
        writer = ArchiveWriter(partial, compression, zstd_level=self.settings.zstd_level,
                               gzip_level=self.settings.gzip_level,
                               threads=self.settings.compression_threads)
        try:  # the manifest: every member, listed and hashed as the same chunks pass
            manifest = ManifestWriter(Path(f"{manifest_path(self.staging / name)}.{token}.partial"),
                                      name, command.extension)
        except BaseException:
            writer.abort()
            raise
        progress = _ProgressReporter(lease, self.datacenter,
                                     self.settings.archive_progress_seconds)

        def sink(chunk: bytes) -> None:
            writer.write(chunk)
            manifest.feed(chunk)
            failpoint("archiver.mid_stream")  # a partial file, its stream cut: swept, redone
            lease.progress(bytes_done=writer.raw_bytes)
            lease.check()  # taken over by another worker: stop streaming now
            progress.tick(writer.raw_bytes)

        warnings.extend(command.warnings)
        timeout = self.settings.command_timeout
        if tools is not None:
            timeout = usable_timeout(host, tools, timeout, warnings)
        try:
            result = host.run(command.argv, sink=sink, ok_exits=command.ok_exits,
                              timeout=timeout)
            archive = writer.close()
            listed = manifest.close(archive.sha256)
        except BaseException as error:
            writer.abort()
            manifest.abort()
            if isinstance(error, OSError) and error.errno == errno.ENOSPC:
                raise StagingFullError(f"staging {self.staging} filled up while archive "
                                       f"{lease.job_id} was written ({error.strerror}, "
                                       f"{writer.raw_bytes} raw bytes in); its partial files "
                                       f"are removed") from error
            raise
        if result.exited == TAR_CHANGED:
            lines = [line for line in result.stderr_tail.splitlines() if line.strip()]
            warnings.append(f"tar exited 1 (files changed while being read): "
                            f"{'; '.join(lines[-WARNING_LINES:]) or 'no message'}")
        return ArchiveFile(partial, archive.raw_bytes, archive.compressed_bytes, archive.sha256,
                           listed.path, listed.sha256, excluded=command.excluded)

    def _done(self, lease: Lease, archive: ArchiveFile, started: float, warnings: list[str],
              position: dict[str, Any] | None) -> Done:
        """The finished archive's row, and its record: seal the file, answer the requests."""
        final = self.staging / archive.path.name.rsplit(".", 2)[0]
        result = {"worker": lease.owner, "datacenter": self.datacenter}
        if archive.manifest is not None:
            result.update(manifest=str(manifest_path(final)),
                          manifest_sha256=archive.manifest_sha256)

        def record(uow: UnitOfWork) -> None:  # after the worker wrote the row, before commit
            # the row is ours until commit: no one else seals it (a file sealed by a commit
            # that then failed stays, and the next attempt replaces it). The manifest first:
            # a sealed archive always has its manifest beside it.
            if archive.manifest is not None:
                seal(archive.manifest, manifest_path(final))
            seal(archive.path, final)
            failpoint("archiver.after_seal")  # sealed, not recorded: made and sealed again
            job = uow.connection.execute(
                select(archive_jobs).where(archive_jobs.c.id == lease.job_id)).one()
            answered = complete_waiting(uow, job)
            log.info("archive %s sealed: %s, %d raw bytes -> %d, %d request(s) answered",
                     lease.job_id, final, archive.raw_bytes, archive.compressed_bytes, answered)

        return Done(result=result, values={
            "file_path": str(final), "raw_bytes": archive.raw_bytes,
            "compressed_bytes": archive.compressed_bytes, "sha256": archive.sha256,
            "started_at": started, "finished_at": time.time(), "warnings": warnings,
            "replication_position": position, "bytes_done": archive.raw_bytes, "error": None,
            "excluded": list(archive.excluded), "staging_reserved": None,
            "reserved_for": None,
        }, record=record)

    def fail(self, lease: Lease, error: BaseException, uow: UnitOfWork) -> Failed | RetryIn:
        """The job failed for good: archive.failed to every waiting request (in the failing
        transaction). Unless a newer snapshot came while this attempt read the old one: then
        it runs again, from the new one."""
        job = uow.connection.execute(
            select(archive_jobs).where(archive_jobs.c.id == lease.job_id)).one()
        if snapshot_id(job) != snapshot_id(lease.job):
            # no answer for the old snapshot (the snapshotter released it)
            return RetryIn(0, str(error), restart=True)
        details = failure_details(error, lease.job.source_host)
        invalidated = str(payload_snapshot(job.payload).get("invalidated") or "")
        reason = f"{type(error).__name__}: {error}"
        if invalidated and not isinstance(error, SnapshotInvalidatedError):
            reason = f"snapshot invalidated ({invalidated}); reading it failed: {reason}"
        fail_waiting(uow, job, reason, details, will_retry=bool(invalidated))
        return Failed(error, values={"result": details, "finished_at": time.time()})


class _ProgressReporter:
    """archive.progress to every waiting request, at most every archive_progress_seconds."""

    def __init__(self, lease: Lease, datacenter: str, every: float) -> None:
        self.lease = lease
        self.datacenter = datacenter
        self.every = every
        self.started = self.last = time.monotonic()

    def tick(self, bytes_done: int) -> None:
        now = time.monotonic()
        if now - self.last < self.every:
            return
        self.last = now
        rate = bytes_done / 1e6 / max(now - self.started, 1e-6)
        try:
            self._emit(bytes_done, rate)
        except Exception as error:  # noqa: BLE001 - progress is advisory: never fail the archive
            log.warning("archive %s: progress not recorded: %s", self.lease.job_id, error)

    def _emit(self, bytes_done: int, rate: float) -> None:
        with self.lease.units() as uow:
            for request in waiting_requests(uow.connection, self.lease.job_id):
                uow.outbox.add(ArchiveProgress(
                    datacenter=self.datacenter, request_id=request.request_id,
                    stage="archive", bytes_done=bytes_done, mb_per_s=round(rate, 1)),
                    migration_id=request.migration_id)
            uow.commit()
