"""Links cut on the network rig (tests/support/netrig.py), every service its own process on
RabbitMQ + PostgreSQL: the link to the new site cut mid-transfer for 30 s resumes where it
stopped and completes verified; a link to a VM cut mid-archive fails that attempt cleanly
and the archive is retried and completed once the link is back."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import zstandard
from sqlalchemy import Engine, select

from services.archiver import SCHEMA as ARCHIVER_SCHEMA
from services.archiver.handlers import HANDLERS
from services.archiver.tables import archive_jobs, archive_requests
from services.transfer.tables import transfer_attempts, transfers
from shared.bus import declare_topology
from shared.db import make_engine, upgrade
from shared.digests import file_sha256
from shared.runtime import routing_keys
from shared.settings import Settings
from shared.topology import QueueSpec, queue_name
from tests.integration.test_archiver import archive_request, send
from tests.integration.test_transfer import MiB, Migration, make_archive
from tests.support.helpers import wait_for
from tests.support.netrig import NetRig
from tests.support.processes import ChildProcess

ROOT = Path(__file__).resolve().parents[2]
# How long a link stays cut: the 30 s. FERRY_TEST_CUT_SECONDS changes it (the retry
# schedules below cover up to about a minute; the archive case needs more than its 20 s
# command timeout, the transfer case more than rsync's 5 s timeout).
CUT_SECONDS = float(os.environ.get("FERRY_TEST_CUT_SECONDS", "30"))
ARCHIVE_COMMAND_TIMEOUT = 20


@pytest.fixture
def rig() -> Iterator[NetRig]:
    with NetRig(datacenters=["ey04"], vms_per_dc=1) as built:
        yield built


def hold_cut(rig: NetRig, link: str, since: float) -> None:
    """Keep `link` cut until CUT_SECONDS after `since`, then restore it. (The wait is the
    outage being tested, not a synchronisation.)"""
    time.sleep(max(0.0, since + CUT_SECONDS - time.monotonic()))
    rig.restore(link)


# -- the link to the new site, mid-transfer --------------------------------------------


def transfer_job(engine: Engine, archive_id: str) -> Any:
    with engine.connect() as connection:
        return connection.execute(
            select(transfers).where(transfers.c.archive_id == archive_id)).first()


def transfer_runs(engine: Engine, job_id: str) -> list[Any]:
    a = transfer_attempts
    with engine.connect() as connection:
        return list(connection.execute(
            select(a).where(a.c.job_id == job_id).order_by(a.c.attempt)).all())


def test_new_site_link_cut_mid_transfer_resumes_where_it_stopped_and_verifies(
    rig: NetRig, tmp_path: Path, rabbit_url: str, pg_url: str, processes: list[ChildProcess],
) -> None:
    assert CUT_SECONDS >= 10, f"FERRY_TEST_CUT_SECONDS={CUT_SECONDS}: at least 10 s (rsync's " \
        "5 s timeout must fire while the link is down)"
    # Given a 16 MiB archive and the link to the new site shaped to 16 mbit (about 8 s whole)
    size = 16 * MiB
    source, digest = make_archive(tmp_path, size, "big.tar.zst")
    rig.shape("16mbit")
    env = {
        "FERRY_BROKER_URL": rabbit_url, "FERRY_TRANSFER_DATABASE_URL": pg_url,
        "FERRY_DESTINATION": rig.destination, "FERRY_SSH_KEY_PATH": str(rig.key),
        "FERRY_SSH_KNOWN_HOSTS_PATH": str(rig.known_hosts), "FERRY_SSH_CONNECT_TIMEOUT": "3",
        "FERRY_STATE_DIR": str(tmp_path / "state"), "FERRY_STAGING_DIR": str(tmp_path),
        "FERRY_LEASE_SECONDS": "5", "FERRY_JOB_POLL_SECONDS": "0.1",
        "FERRY_OUTBOX_POLL_SECONDS": "0.1", "FERRY_TRANSFER_PROGRESS_SECONDS": "0.5",
        # rsync --timeout: a stalled copy ends in 5 s; retries 1, 2, 4, 8, 8 … s apart
        "FERRY_TRANSFER_TIMEOUT_SECONDS": "5", "FERRY_TRANSFER_BACKOFF_SECONDS": "1",
        "FERRY_TRANSFER_BACKOFF_MAX_SECONDS": "8", "FERRY_TRANSFER_ATTEMPTS": "20",
    }
    engine = make_engine(pg_url)
    processes.append(ChildProcess("services.transfer", env=env, ready="running transfer",
                                  log=tmp_path / "transfer.log"))
    migration = Migration(rabbit_url)
    migration.resolve("r1")
    migration.archive("r1", "big", source, digest)
    arriving = rig.destination_root / migration.id / source.name
    # When a quarter of it has arrived at the new site, the link is cut
    wait_for(lambda: arriving.exists() and arriving.stat().st_size >= size // 4, timeout=30,
             what="a quarter of the archive at the destination")
    rig.cut("new-site")
    cut_at = time.monotonic()
    # Then the stalled copy is given up while the link is down (rsync's timeout), to be retried
    job = transfer_job(engine, "big")
    wait_for(lambda: [r.outcome for r in transfer_runs(engine, job.id)][:1] == ["retry"],
             timeout=CUT_SECONDS + 30, what="the stalled attempt given up")
    hold_cut(rig, "new-site", cut_at)
    held = arriving.stat().st_size  # what the new site had when the link came back
    assert size // 4 <= held < size
    # And once the link is back the transfer completes, verified at the destination
    wait_for(lambda: transfer_job(engine, "big").state in {"done", "failed"}, timeout=60,
             what="the transfer finished after the link came back")
    done = transfer_job(engine, "big")
    runs = transfer_runs(engine, done.id)
    log = (tmp_path / "transfer.log").read_text()
    assert done.state == "done", f"{done.error}\n{log[-3000:]}"
    assert file_sha256(arriving) == digest == done.result["sha256"]
    # every attempt but the last was a transient failure, the last one resumed: it sent only
    # what was missing (rsync --append-verify from the partial file), not the whole archive
    assert [r.outcome for r in runs[:-1]] == ["retry"] * (len(runs) - 1)
    assert runs[0].exit_code in {12, 30, 255}, runs[0]
    last = runs[-1]
    assert last.outcome == "transferred"
    missing = size - held
    # (within 1 MiB: the stalled attempt's receiver may still flush a buffer after we look)
    assert abs(last.literal_bytes - missing) <= MiB, (last.literal_bytes, missing)
    assert last.bytes_sent < missing + 2 * MiB < size, (last.bytes_sent, missing)
    # the attempts made while the link was down could not reach the new site, and said so
    server = rig.hosts["new-site"].address
    assert all((r.error or "").startswith(f"{server}: cannot connect") for r in runs[1:-1]), [
        r.error for r in runs[1:-1]]
    engine.dispose()


# -- the link to a VM, mid-archive ------------------------------------------------------


def test_vm_link_cut_mid_archive_fails_the_attempt_cleanly_and_the_retry_completes(
    rig: NetRig, tmp_path: Path, rabbit_url: str, pg_url: str, processes: list[ChildProcess],
) -> None:
    assert CUT_SECONDS > ARCHIVE_COMMAND_TIMEOUT + 2, (
        f"FERRY_TEST_CUT_SECONDS={CUT_SECONDS}: a cut must outlast the archiver's "
        f"{ARCHIVE_COMMAND_TIMEOUT} s command timeout for the attempt to fail")
    # Given a VM with a shared filesystem of 6 MB of random data behind an 8 mbit link
    vm = rig.hosts["ey04-vm1"]
    data = vm.root / "data"
    data.mkdir()
    (data / "blob.bin").write_bytes(os.urandom(6_000_000))
    rig.shape("8mbit", name=vm.link)
    staging = tmp_path / "staging"
    env = {
        "FERRY_BROKER_URL": rabbit_url, "FERRY_ARCHIVER_DATABASE_URL": pg_url,
        "FERRY_STATE_DIR": str(tmp_path / "state"), "FERRY_STAGING_DIR": str(staging),
        "FERRY_SSH_KEY_PATH": str(rig.key), "FERRY_SSH_KNOWN_HOSTS_PATH": str(rig.known_hosts),
        "FERRY_SSH_CONNECT_TIMEOUT": "3", "FERRY_LEASE_SECONDS": "5",
        "FERRY_JOB_POLL_SECONDS": "0.2", "FERRY_OUTBOX_POLL_SECONDS": "0.1",
        "FERRY_SHARED_FS_MOUNT_CHECK": "false",  # a plain directory stands in for the mount
        # the archiver's only bound on a stalled source command is its command timeout:
        # 20 s, well above the 6 s this archive takes, below the cut
        "FERRY_COMMAND_TIMEOUT": str(ARCHIVE_COMMAND_TIMEOUT),
        "FERRY_RETRY_DELAYS": "1,2,4,8", "FERRY_MAX_ATTEMPTS": "12",
    }
    engine = make_engine(pg_url)
    upgrade(engine, ARCHIVER_SCHEMA)

    def job() -> Any:
        with engine.connect() as db:
            return db.execute(select(archive_jobs)).first()

    def partials() -> list[Path]:
        return sorted(staging.rglob("*.partial")) if staging.exists() else []

    spec = QueueSpec(queue_name("archiver", "ey04"), routing_keys(HANDLERS, "ey04"))
    declare_topology(rabbit_url, spec, Settings())
    processes.append(ChildProcess("services.archiver", "--datacenter", "ey04",
                                  "--concurrency", "1", env=env, log=tmp_path / "archiver.log"))
    send(rabbit_url, (archive_request("r1", "shared_fs", "fs:data", host=vm.address,
                                      path=str(data)), "m-1"))
    # When a quarter of the source has streamed (its partial file in staging), the link is cut
    wait_for(lambda: job() is not None and job().bytes_done >= 1_500_000 and partials(),
             timeout=30, what="a quarter of the archive streamed")
    rig.cut(vm.link)
    cut_at = time.monotonic()
    # Then, while the link is down, the stalled attempt is stopped by the command timeout and
    # counted, and its partial archive and manifest are removed
    wait_for(lambda: "CommandTimedOut" in (job().error or ""), timeout=CUT_SECONDS + 30,
             what="the cut attempt given up")
    assert job().state != "done" and job().attempts >= 1
    wait_for(lambda: not partials(), timeout=10, what="the failed attempt's partial files gone")
    hold_cut(rig, vm.link, cut_at)

    # And after the link is back a retry completes the archive
    def answered() -> Any:
        with engine.connect() as db:
            return db.execute(select(archive_requests.c.state)).scalar() in {"completed",
                                                                             "failed"}

    wait_for(answered, timeout=90, what="the archive request answered")
    done = job()
    log = (tmp_path / "archiver.log").read_text()
    assert done.state == "done", f"{done.error}\n{log[-3000:]}"
    # every attempt before it failed on the network, naming the VM: the first timed out in
    # mid-stream, the ones made while the link was down could not connect
    failed = [line.split(" failed, again in ", 1)[1].split(": ", 1)[1]
              for line in log.splitlines()
              if f"job {done.id} attempt" in line and " failed, again in " in line]
    assert done.attempts == len(failed) + 1 >= 2, (done.attempts, failed)
    assert failed[0].startswith(f"shared.errors.CommandTimedOut: {vm.address}: timed out")
    assert all(f.startswith(f"shared.errors.HostUnreachableError: {vm.address}: cannot connect")
               for f in failed[1:]), failed
    # only the sealed archive and its manifest are left: no partial file of any attempt
    final = Path(done.file_path)
    assert sorted((staging / "ey04").iterdir()) == [final, Path(f"{final}.manifest.jsonl")]
    assert file_sha256(final) == done.sha256
    raw = zstandard.ZstdDecompressor().stream_reader(final.read_bytes()).read()
    assert len(raw) == done.raw_bytes and raw.count((data / "blob.bin").read_bytes()[:4096]) == 1
    engine.dispose()
