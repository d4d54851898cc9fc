"""The transfer service as real processes on RabbitMQ + PostgreSQL: a worker SIGKILLed
mid-transfer is replaced, and the migration completes exactly once."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from kombu import Queue
from sqlalchemy import Engine, func, select

from services.transfer import SCHEMA as TRANSFER_SCHEMA
from services.transfer.jobs import TransferLeases
from services.transfer.tables import transfer_attempts, transfers
from shared.bus import connect
from shared.db import make_engine, upgrade
from shared.digests import file_sha256
from shared.envelope import Envelope
from shared.inbox_outbox import inbox_table, outbox_table
from shared.jobs import new_job_values
from shared.topology import EVENTS_EXCHANGE
from tests.integration.test_transfer import MiB, Migration, make_archive
from tests.support.helpers import wait_for
from tests.support.processes import ChildProcess
from tests.support.sshd import SshServer

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def server() -> Iterator[SshServer]:
    with SshServer() as sshd:
        yield sshd


def transfer_process(env: dict[str, str]) -> ChildProcess:
    """`python -m services.transfer` as a real process, ended only by its own PID."""
    return ChildProcess("services.transfer", env=env, ready="running transfer")


def job(engine: Engine, archive_id: str) -> Any:
    with engine.connect() as connection:
        return connection.execute(
            select(transfers).where(transfers.c.archive_id == archive_id)).first()


def settled(engine: Engine, sent: list[Envelope]) -> bool:
    """Every message in `sent` handled, and every event the service announced published
    (confirmed by the broker): nothing is left that could still announce anything."""
    with engine.connect() as connection:
        handled = connection.execute(select(func.count(inbox_table.c.message_id.distinct()))
                                     .where(inbox_table.c.message_id.in_(
                                         [str(e.id) for e in sent]))).scalar_one()
        unpublished = connection.execute(select(func.count()).select_from(outbox_table)
                                         .where(outbox_table.c.published_at.is_(None))
                                         ).scalar_one()
    return handled == len(sent) and unpublished == 0


def announced(engine: Engine, *kinds: str) -> dict[str, tuple[str, dict[str, Any]]]:
    """The service's outbox events of `kinds`: {message id: (type, payload)}."""
    with engine.connect() as connection:
        bodies = connection.execute(select(outbox_table.c.body).where(
            outbox_table.c.routing_key.in_(kinds)).order_by(outbox_table.c.seq)).scalars()
        return {e["id"]: (e["type"], e["payload"]) for e in map(json.loads, bodies)}


def rsync_running_for(path: Path) -> list[int]:
    """PIDs whose command line names `path` (an rsync a dead worker would have left)."""
    found = []
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and str(path).encode() in (entry / "cmdline").read_bytes():
                found.append(int(entry.name))
        except OSError:
            continue
    return found


def test_worker_killed_mid_transfer_is_replaced_and_migration_completes_once(
    server: SshServer, tmp_path: Path, rabbit_url: str, pg_url: str,
    processes: list[ChildProcess],
) -> None:
    # Given a migration of three requests: r1 and r2 share a 48 MiB archive, r3 has a small one
    big, big_sha = make_archive(tmp_path, 48 * MiB, "big.tar.zst")
    small, small_sha = make_archive(tmp_path, 1 * MiB, "small.tar.zst")
    root = tmp_path / "new-site"
    env = {
        "FERRY_BROKER_URL": rabbit_url, "FERRY_TRANSFER_DATABASE_URL": pg_url,
        "FERRY_DESTINATION": f"{server.user}@{server.host}:{server.port}:{root}",
        "FERRY_SSH_KEY_PATH": str(server.user_key_path),
        "FERRY_SSH_KNOWN_HOSTS_PATH": str(server.known_hosts_path),
        "FERRY_LEASE_SECONDS": "2", "FERRY_JOB_POLL_SECONDS": "0.1",
        "FERRY_OUTBOX_POLL_SECONDS": "0.1", "FERRY_TRANSFER_BWLIMIT_KBPS": "8192",
        "FERRY_TRANSFER_PROGRESS_SECONDS": "0.5", "FERRY_TRANSFER_BACKOFF_SECONDS": "0.2",
        "FERRY_STATE_DIR": str(tmp_path / "state"), "PYTHONPATH": str(ROOT),
        "FERRY_STAGING_DIR": str(tmp_path),
    }
    engine = make_engine(pg_url)
    with connect(rabbit_url) as connection:
        channel = connection.channel()
        watch = Queue("watch-transfer", EVENTS_EXCHANGE, routing_key="#")(channel)
        watch.declare()
        first = transfer_process(env)
        processes.append(first)
        migration = Migration(rabbit_url)
        sent = [migration.resolve("r1", "r2", "r3"),
                migration.archive("r1", "big", big, big_sha),
                migration.archive("r3", "small", small, small_sha)]
        # When the worker is SIGKILLed while the big archive is about 40 % sent
        wait_for(lambda: (job(engine, "big") is not None
                          and job(engine, "big").bytes_done >= 0.4 * 48 * MiB),
                 timeout=40, what="big archive 40 % sent")
        owner = job(engine, "big").lease_owner
        first.kill()
        # Then its rsync died with it (nothing keeps writing into the partial file)
        wait_for(lambda: not rsync_running_for(big), timeout=10, what="orphan rsync gone")
        # And the request sharing the archive arrives meanwhile
        sent.append(migration.archive("r2", "big", big, big_sha))
        # When another worker starts, it takes the job over after the lease and completes it
        processes.append(transfer_process(env))
        wait_for(lambda: job(engine, "big").state == "done", timeout=60, what="big done")
        done = job(engine, "big")
        a = transfer_attempts
        with engine.connect() as db:
            runs = db.execute(select(a).where(a.c.job_id == done.id).order_by(a.c.attempt)).all()
        assert [(r.owner == owner, r.outcome) for r in runs] == [
            (True, "abandoned"), (False, "transferred")]
        assert runs[1].bytes_sent < 0.75 * 48 * MiB  # resumed, not restarted
        assert file_sha256(root / migration.id / big.name) == big_sha
        assert file_sha256(root / migration.id / small.name) == small_sha
        # And once every message sent is handled and every event announced is published,
        # each request was announced transferred once, the migration completed once
        wait_for(lambda: settled(engine, sent), timeout=30, what="messages handled, events out")
        events = announced(engine, "transfer.completed", "migration.completed")
        completed = sorted(p["request_id"] for kind, p in events.values()
                           if kind == "transfer.completed")
        assert completed == ["r1", "r2", "r3"]
        assert [p for kind, p in events.values() if kind == "migration.completed"] == [
            {"archives": 2, "bytes": 49 * MiB}]
        # And the bus carried exactly those events (a relay killed between publishing and
        # marking may publish one again: the same id, which consumers skip)
        seen: dict[str, str] = {}

        def drain() -> bool:
            while (message := watch.get(no_ack=True)) is not None:
                body = json.loads(message.body)
                seen[body["id"]] = body["type"]
            return set(events) <= set(seen)

        wait_for(drain, timeout=30, what="the announced events on the bus")
        assert {i for i, kind in seen.items() if kind in {
            "transfer.completed", "migration.completed"}} == set(events)
        channel.close()
    engine.dispose()


def test_parallel_limit_holds_when_many_workers_claim_at_once_on_postgres(pg_url: str) -> None:
    # Given six pending transfers to one destination, and a limit of two at a time
    engine = make_engine(pg_url)
    upgrade(engine, TRANSFER_SCHEMA)
    with engine.begin() as connection:
        for index in range(6):
            connection.execute(transfers.insert().values(new_job_values(
                f"job-{index}", "m-1", "shared_fs", {}, archive_id=f"a{index}",
                destination="root@h:/d", verify_failures=0)))
    leases = TransferLeases(engine, lease_seconds=30, max_parallel=2)
    # When eight workers claim at the same moment
    barrier = threading.Barrier(8)
    claimed: list[object] = []

    def claim(index: int) -> None:
        barrier.wait()
        claimed.append(leases.claim(f"worker-{index}"))

    threads = [threading.Thread(target=claim, args=(i,)) for i in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    # Then exactly two got a job
    assert sum(row is not None for row in claimed) == 2
    engine.dispose()
