"""Archiver workers scaled out on RabbitMQ + PostgreSQL: per-datacenter work, one archive per
reuse key under concurrent requests, and a worker process SIGKILLed mid-archive."""

from __future__ import annotations

import contextlib
import hashlib
import json
import random
from collections import Counter
from pathlib import Path
from typing import Any

import zstandard
from kombu import Queue
from sqlalchemy import select

from services.archiver import SCHEMA as ARCHIVER_SCHEMA
from services.archiver.handlers import HANDLERS
from services.archiver.tables import archive_jobs, archive_requests
from shared.bus import connect, declare_topology
from shared.db import make_engine, upgrade
from shared.runtime import routing_keys
from shared.settings import Settings
from shared.topology import EVENTS_EXCHANGE, QueueSpec, queue_name
from tests.integration.test_archiver import (
    address,
    archive_request,
    archiver_settings,
    running,
    send,
    sshd,
)
from tests.support.helpers import wait_for
from tests.support.processes import ChildProcess, children
from tests.support.sshd import SshServer

ROOT = Path(__file__).resolve().parents[2]
__all__ = ["sshd"]  # the module-scoped sshd fixture, shared with test_archiver


def make_sources(base: Path, names: list[str], size: int) -> dict[str, Path]:
    rng = random.Random(3)
    made = {}
    for name in names:
        directory = base / name
        directory.mkdir(parents=True)
        (directory / "data.txt").write_bytes(
            b"".join(f"{name} line {i} {rng.random()}\n".encode() for i in range(size // 40)))
        made[name] = directory
    return made


def test_two_datacenters_two_workers_each_run_every_job_in_its_datacenter_once(
    sshd: SshServer, rabbit_url: str, pg_url: str, tmp_path: Path,
) -> None:
    sources = make_sources(tmp_path / "src", [f"fs{i}" for i in range(6)] + ["big"], 200_000)
    (sources["big"] / "more.bin").write_bytes(random.Random(1).randbytes(40 << 20))
    with connect(rabbit_url) as connection, contextlib.ExitStack() as stack:
        channel = connection.channel()
        watch = Queue("watch-completed", EVENTS_EXCHANGE, routing_key="archive.completed.*")(
            channel)
        watch.declare()
        # Given two datacenters, each with two archiver workers (service instances)
        settings = archiver_settings(tmp_path, sshd, rabbit_url, pg_url)
        for dc in ("dca", "dcb", "dca", "dcb"):
            stack.enter_context(running(settings, datacenter=dc, concurrency=2))
        # When each datacenter gets its own requests, and dca five at once for one big source
        requests = [(archive_request(f"{dc}-{name}", "shared_fs", f"fs:{name}", datacenter=dc,
                                     host=address(sshd), path=str(sources[name])), f"m-{dc}")
                    for dc in ("dca", "dcb") for name in sources if name != "big"]
        requests += [(archive_request(f"dca-big-{i}", "shared_fs", "fs:big", datacenter="dca",
                                      host=address(sshd), path=str(sources["big"])), f"m-big-{i}")
                     for i in range(5)]
        send(rabbit_url, *requests)
        engine = make_engine(pg_url)
        ids = [event.request_id for event, _ in requests]

        def answered() -> bool:
            with engine.connect() as db:
                states = [r.state for r in db.execute(select(archive_requests))]
            return len(states) == len(ids) and set(states) == {"completed"}

        wait_for(answered, timeout=90, what="every request answered")
        completed: list[Any] = []

        def received() -> bool:
            while (message := watch.get(no_ack=True)) is not None:
                completed.append(message)
            return len(completed) >= len(ids)

        wait_for(received, timeout=30, what="archive.completed published")
        with engine.connect() as db:
            jobs = list(db.execute(select(archive_jobs)))
        engine.dispose()
        channel.close()
    # Then every job ran once, in its own datacenter, and its file is in that datacenter's dir
    assert len(jobs) == 13
    assert Counter(j.datacenter for j in jobs) == {"dca": 7, "dcb": 6}
    for job in jobs:
        assert job.state == "done" and job.attempts == 1
        assert job.result["datacenter"] == job.datacenter
        assert Path(job.file_path).parent == tmp_path / "staging" / job.datacenter
    assert sorted(p.name for p in (tmp_path / "staging" / "dca").iterdir()) == sorted(
        name for j in jobs if j.datacenter == "dca"  # each archive, and its manifest
        for name in (Path(j.file_path).name, Path(j.file_path).name + ".manifest.jsonl"))
    # And the five requests for one source got one archive and five archive.completed
    bodies = [json.loads(m.body) for m in completed]
    assert sorted(b["payload"]["request_id"] for b in bodies) == sorted(ids)
    assert {m.delivery_info["routing_key"] for m in completed} == {
        "archive.completed.dca", "archive.completed.dcb"}
    big = [b for b in bodies if b["payload"]["reuse_key"] == "fs:big"]
    assert len(big) == 5 and len({b["payload"]["archive_id"] for b in big}) == 1
    assert {b["migration_id"] for b in big} == {f"m-big-{i}" for i in range(5)}


def ArchiverProcess(settings_env: dict[str, str], log: Path) -> ChildProcess:  # noqa: N802
    """`python -m services.archiver` as a real process, ended only by its own PID."""
    return ChildProcess("services.archiver", "--datacenter", "dck", "--concurrency", "1",
                        env=settings_env, log=log)


def test_worker_killed_mid_archive_is_taken_over_and_leaves_no_partial_file(
    sshd: SshServer, rabbit_url: str, pg_url: str, tmp_path: Path,
) -> None:
    source = make_sources(tmp_path / "src", ["app"], 40_000_000)["app"]
    staging = tmp_path / "staging"
    env = {"FERRY_BROKER_URL": rabbit_url, "FERRY_ARCHIVER_DATABASE_URL": pg_url,
           "FERRY_STATE_DIR": str(tmp_path / "state"), "FERRY_STAGING_DIR": str(staging),
           "FERRY_SSH_KEY_PATH": str(sshd.user_key_path),
           "FERRY_SSH_KNOWN_HOSTS_PATH": str(sshd.known_hosts_path),
           "FERRY_LEASE_SECONDS": "2", "FERRY_JOB_POLL_SECONDS": "0.2",
           "FERRY_OUTBOX_POLL_SECONDS": "0.1",
           "FERRY_SHARED_FS_MOUNT_CHECK": "false"}  # its sources are plain directories
    engine = make_engine(pg_url)
    upgrade(engine, ARCHIVER_SCHEMA)  # the workers would too; the test reads the tables at once

    def job() -> Any:
        with engine.connect() as db:
            return db.execute(select(archive_jobs)).first()

    with children() as started:
        # Given a worker whose compressor is slow (zstd -19 on one thread throttles the stream)
        spec = QueueSpec(queue_name("archiver", "dck"), routing_keys(HANDLERS, "dck"))
        declare_topology(rabbit_url, spec, Settings())  # as the worker will: nothing is lost
        started.append(ArchiverProcess({**env, "FERRY_ZSTD_LEVEL": "19",
                                        "FERRY_COMPRESSION_THREADS": "1"}, tmp_path / "a.log"))
        send(rabbit_url, (archive_request("r1", "shared_fs", "fs:app", datacenter="dck",
                                          host=address(sshd), path=str(source)), "m-1"))
        wait_for(lambda: job() is not None and job().bytes_done > 0, timeout=60,
                 what="archive streaming on the first worker")
        # When it is SIGKILLed mid-archive
        started[0].kill()
        first = job()
        assert first.state == "running" and 0 < first.bytes_done < 40_000_000
        # its partial archive and partial manifest
        assert [p.name.endswith(".partial") for p in (staging / "dck").iterdir()] == [True, True]
        # Then another worker takes the job over once the lease expires and completes it
        started.append(ArchiverProcess(env, tmp_path / "b.log"))

        def answered() -> bool:
            with engine.connect() as db:
                return db.execute(select(archive_requests.c.state)).scalar() == "completed"

        wait_for(answered, timeout=90, what="archive completed by the second worker")
        done = job()
    engine.dispose()
    assert done.state == "done" and done.attempts == 2
    assert done.result["worker"] != first.lease_owner
    # And only the sealed archive is left: no partial file of either attempt
    final = Path(done.file_path)
    assert sorted((staging / "dck").iterdir()) == [final, Path(f"{final}.manifest.jsonl")]
    assert ".partial left by an earlier attempt" in (tmp_path / "b.log").read_text()
    body = final.read_bytes()
    assert hashlib.sha256(body).hexdigest() == done.sha256
    raw = zstandard.ZstdDecompressor().stream_reader(body).read()
    assert len(raw) == done.raw_bytes
    assert b"app line 999999" in raw
