"""Reading and answering archive requests, inside the caller's transaction.

Handlers answer a request at once when its archive exists; the worker answers every request
waiting on an archive job in the transaction that completes (or fails) the job.
"""

from __future__ import annotations

import shlex
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from sqlalchemy import Connection, Row, select, update

from services.archiver.tables import COMPLETED, FAILED, WAITING, archive_requests
from shared.contracts import ArchiveCompleted, ArchiveFailed
from shared.errors import CommandError
from shared.inbox_outbox import UnitOfWork

STDERR_TAIL = 2000  # characters of stderr an archive.failed carries


def _when(timestamp: float | None) -> datetime:
    return datetime.fromtimestamp(timestamp or 0.0, UTC)


def completed_event(job: Row[Any], request_id: str, reused: bool) -> ArchiveCompleted:
    """archive.completed for one request of a finished archive job."""
    path = str(job.file_path)
    return ArchiveCompleted(
        datacenter=job.datacenter, request_id=request_id, archive_id=job.id, kind=job.kind,
        reuse_key=job.reuse_key, path=path, file_name=Path(path).name,
        raw_bytes=job.raw_bytes, compressed_bytes=job.compressed_bytes, sha256=job.sha256,
        started_at=_when(job.started_at), finished_at=_when(job.finished_at),
        warnings=tuple(job.warnings or ()), reused=reused, snapshot_id=snapshot_id(job),
        manifest_sha256=str((job.result or {}).get("manifest_sha256") or ""))


def payload_snapshot(payload: Any) -> dict[str, Any]:
    """A copy of the job payload's snapshot ({} for kinds other than local_fs)."""
    return dict((payload or {}).get("snapshot") or {})


def snapshot_id(job: Row[Any]) -> str:
    """The snapshot a local_fs archive read ("" for other kinds): the snapshotter tells its
    attempts apart by it."""
    return str(payload_snapshot(job.payload).get("snapshot_id", ""))


def failure_details(error: BaseException, host: str) -> dict[str, str]:
    """host, command and stderr tail of a failure, for the job row and archive.failed."""
    if isinstance(error, CommandError):
        return {"host": error.host, "command": shlex.join(error.argv)[:2000],
                "stderr_tail": error.stderr_tail[-STDERR_TAIL:]}
    return {"host": host, "command": "", "stderr_tail": ""}


def waiting_requests(connection: Connection, archive_id: str) -> list[Row[Any]]:
    return list(connection.execute(
        select(archive_requests).where(archive_requests.c.archive_id == archive_id,
                                       archive_requests.c.state == WAITING)
        .order_by(archive_requests.c.created_at)))


def _answer(connection: Connection, request_id: str, state: str) -> None:
    connection.execute(update(archive_requests)
                       .where(archive_requests.c.request_id == request_id)
                       .values(state=state, answered_at=time.time()))


def complete_waiting(uow: UnitOfWork, job: Row[Any]) -> int:
    """archive.completed for every request waiting on `job` (done). Returns how many."""
    requests = waiting_requests(uow.connection, job.id)
    for request in requests:
        _answer(uow.connection, request.request_id, COMPLETED)
        uow.outbox.add(completed_event(job, request.request_id, request.reused),
                       migration_id=request.migration_id)
    return len(requests)


def fail_waiting(uow: UnitOfWork, job: Row[Any], reason: str, details: dict[str, str], *,
                 will_retry: bool = False) -> int:
    """archive.failed for every request waiting on `job`. Returns how many. `will_retry`: the
    snapshot it read was invalidated, the snapshotter sends a new snapshot.ready."""
    requests = waiting_requests(uow.connection, job.id)
    for request in requests:
        _answer(uow.connection, request.request_id, FAILED)
        uow.outbox.add(ArchiveFailed(datacenter=job.datacenter, request_id=request.request_id,
                                     kind=job.kind, reason=reason[-4000:],
                                     snapshot_id=snapshot_id(job), will_retry=will_retry,
                                     **details),
                       migration_id=request.migration_id)
    return len(requests)
