"""Two datacenters as deployed: RabbitMQ + PostgreSQL, every service its own `ferry run`
process, per datacenter an archiver and a transfer worker on its own staging directory.

One migration with sources in both: every archive is made in its own datacenter's staging
and sent by its own datacenter's transfer process (its job's datacenter, the attempt's
owner pid). ey02's transfer is started late: its archives wait in `transfer.ey02` while
ey04's complete; once it runs, the rest complete; nothing failed, nothing dead-lettered."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import yaml
from sqlalchemy import func, select

from ferry.demo_site import build_site
from ferry.dlq import list_dead
from services.archiver.tables import archive_jobs
from services.transfer.tables import transfer_attempts, transfers
from shared.bus import connect
from shared.digests import file_sha256
from shared.topology import FIXED_QUEUES
from tests.e2e.checks import rows
from tests.e2e.harness import READY, Pipeline, pipeline_env
from tests.e2e.observed import pid_of
from tests.support.helpers import wait_for
from tests.support.processes import ChildProcess

DCS = ("ey04", "ey02")
SERVICES = ("intake", "resolver", "snapshotter", "archiver", "transfer")


@pytest.fixture
def site(tmp_path: Path) -> Iterator[Path]:
    """The demo's small site without its database, its first VM and /data in ey04, the
    other VMs in ey02 (their own Xen host there): 2 archives in ey04, 3 in ey02."""
    workdir = tmp_path / "site"
    built, _ = build_site(workdir, "small", None)
    inventory = yaml.safe_load(built.inventory_path.read_text())
    inventory["datacenters"]["ey02"] = {"archive_hosts": ["local"]}
    inventory["xen_hosts"]["xen-ey02"] = {"datacenter": "ey02", "address": built.address}
    first, *others = inventory["vms"]
    for name in others:
        inventory["vms"][name].update(datacenter="ey02", xen_host="xen-ey02")
    built.inventory_path.write_text(yaml.safe_dump(inventory, sort_keys=False))
    yield workdir


def waiting(broker_url: str, queue: str) -> int:
    with connect(broker_url) as connection:
        return int(connection.channel().queue_declare(queue=queue, passive=True).message_count)


def test_each_datacenter_sends_its_own_archives_and_one_without_transfer_waits(
        site: Path, rabbit_url: str, make_pg_database: Callable[[], str]) -> None:
    urls = {service: make_pg_database() for service in SERVICES}
    env = pipeline_env(site, site / "inventory.yaml", rabbit_url, urls)
    pipeline = Pipeline(env, archivers=0)
    staging = Path(env["FERRY_STAGING_DIR"])

    def run(name: str, service: str, dc: str) -> None:
        pipeline.processes[name] = ChildProcess.ferry("run", service, "--datacenter", dc,
                                                      env=env)

    try:
        # Given every service but ey02's transfer running, each its own process
        for name in ("intake", "resolver", "snapshotter"):
            pipeline.start(name)
        for dc in DCS:
            run(f"archiver-{dc}", "archiver", dc)
        run("transfer-ey04", "transfer", "ey04")
        for process in pipeline.processes.values():
            process.wait_ready(READY)
        pipeline.wait_for_api()
        # When the migration is submitted
        with pipeline.client() as client:
            response = client.post("/migrations", content=(site / "migration.json")
                                   .read_bytes(), headers={"Content-Type": "application/json"})
            assert response.status_code == 202, response.text
            migration_id = response.json()["id"]

            def state() -> str | None:
                status = pipeline.status(client, migration_id)
                return None if status is None else str(status["status"])

            def archived(dc: str) -> int:
                return int(rows(urls["archiver"], select(func.count()).where(
                    archive_jobs.c.datacenter == dc, archive_jobs.c.state == "done"))[0][0])

            def sent(dc: str) -> int:
                return int(rows(urls["transfer"], select(func.count()).where(
                    transfers.c.datacenter == dc, transfers.c.state == "done"))[0][0])

            # Then ey04's archives are made and sent; ey02's are made and wait in their queue
            wait_for(lambda: archived("ey04") == 2 and sent("ey04") == 2 and
                     archived("ey02") == 3, timeout=60, what="ey04 sent, ey02 archived")
            wait_for(lambda: waiting(rabbit_url, "transfer.ey02") >= 4, timeout=10,
                     what="ey02's plan and 3 archives waiting in transfer.ey02")
            assert rows(urls["transfer"], select(transfers.c.id).where(
                transfers.c.datacenter == "ey02")) == []
            assert state() not in {"completed", "failed"}
            # When ey02's transfer starts
            started = time.monotonic()
            run("transfer-ey02", "transfer", "ey02")
            wait_for(lambda: state() in {"completed", "failed"}, timeout=60,
                     what="the migration")
            assert state() == "completed", pipeline.tail()
        assert time.monotonic() - started < 60
        # And every archive was made in its datacenter's staging and sent by its transfer
        pids = {dc: pipeline.processes[f"transfer-{dc}"].pid for dc in DCS}
        jobs = rows(urls["transfer"], select(transfers))
        assert sorted(job.datacenter for job in jobs) == ["ey02"] * 3 + ["ey04"] * 2
        for job in jobs:
            assert job.state == "done" and job.attempts == 1, (job.archive_id, job.error)
            assert Path(job.payload["path"]).parent == staging / job.datacenter
            owners = rows(urls["transfer"], select(transfer_attempts.c.owner).where(
                transfer_attempts.c.job_id == job.id))
            assert [pid_of(owner) for (owner,) in owners] == [pids[job.datacenter]]
            arrived = site / "destination" / migration_id / job.payload["file_name"]
            assert file_sha256(arrived) == job.payload["sha256"] == job.result["sha256"]
        for made in rows(urls["archiver"], select(archive_jobs)):
            assert Path(made.file_path).parent == staging / made.datacenter, made.id
        # And nothing failed, nothing is dead
        for queue in [*FIXED_QUEUES, *(f"{s}.{dc}" for s in ("archiver", "transfer")
                                       for dc in DCS)]:
            assert list_dead(rabbit_url, queue) == [], queue
        logs = "".join(process.log() for process in pipeline.processes.values())
        assert "not in the staging directory" not in logs
    finally:
        pipeline.stop_all()
