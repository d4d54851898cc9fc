"""Transfer: the transfer service's code path against plain `rsync -e ssh`, same file, same run,
and what each sends again after the connection dies at 50 %.

The destination is a real sshd on 127.0.0.1 (both ends share this machine's cores). The
service path is everything a transfer job does: claim, `mkdir -p` over SSH, rsync with
progress parsing, sha256 at the destination, commit with its events. Runs alternate.

    .venv/bin/python bench/transfer.py [--mib 512] [--runs 3]
"""

from __future__ import annotations

import argparse
import hashlib
import logging
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from sqlalchemy import select  # noqa: E402

from services.transfer import rsync  # noqa: E402
from services.transfer.bootstrap import bootstrap  # noqa: E402
from services.transfer.tables import transfer_attempts, transfers  # noqa: E402
from shared.bus import Publisher  # noqa: E402
from shared.contracts import (  # noqa: E402
    ArchiveCompleted,
    ArchiveSource,
    MigrationResolved,
    PlannedJob,
)
from shared.envelope import Envelope  # noqa: E402
from shared.hosts import LocalExecutor  # noqa: E402
from shared.runtime import Service  # noqa: E402
from shared.settings import Settings  # noqa: E402
from tests.support.sshd import SshServer  # noqa: E402

MiB = 1 << 20


def make_file(path: Path, size: int) -> str:
    digest = hashlib.sha256()
    with path.open("wb") as file:
        for offset in range(0, size, 16 * MiB):
            chunk = os.urandom(min(16 * MiB, size - offset))
            digest.update(chunk)
            file.write(chunk)
    return digest.hexdigest()


def children(pid: int) -> list[int]:
    try:
        return [int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


def name_of(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return ""


def kill_at_half(directory: Path, size: int, ssh_pids: Callable[[], list[int]]) -> list[int]:
    """Wait until the files in `directory` hold half of `size`, then SIGKILL `ssh_pids()`."""
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        files = list(directory.rglob("*")) if directory.exists() else []
        if sum(f.stat().st_size for f in files if f.is_file()) >= size // 2:
            killed = ssh_pids()
            for pid in killed:
                os.kill(pid, signal.SIGKILL)
            return killed
        time.sleep(0.01)
    raise RuntimeError(f"{directory} never held half of {size} bytes")


def our_rsync_ssh() -> list[int]:
    """ssh processes whose parent is an rsync that a thread of this process started."""
    ours = [int(p) for task in Path(f"/proc/{os.getpid()}/task").iterdir()
            for p in (task / "children").read_text().split()]
    return [ssh for rsync in ours if name_of(rsync) == "rsync"
            for ssh in children(rsync) if name_of(ssh) == "ssh"]


class Bench:
    def __init__(self, server: SshServer, work: Path) -> None:
        self.server = server
        self.work = work
        self.ssh = (f"ssh -i {server.user_key_path} -o UserKnownHostsFile={server.known_hosts_path}"
                    f" -o StrictHostKeyChecking=yes -o BatchMode=yes -p {server.port}")
        self.runs = 0

    def target(self, name: str) -> str:
        return f"{self.server.user}@{self.server.host}:{self.work / 'plain' / name}"

    # -- plain rsync ------------------------------------------------------------------
    def plain(self, source: Path, extra_ssh: str = "") -> float:
        (self.work / "plain").mkdir(exist_ok=True)
        dest = self.work / "plain" / source.name
        dest.unlink(missing_ok=True)
        start = time.perf_counter()
        subprocess.run(["rsync", "-e", self.ssh + extra_ssh, "--", str(source),  # noqa: S607
                        self.target(source.name)], check=True)
        return time.perf_counter() - start

    def plain_interrupted(self, source: Path, options: list[str], bwlimit: int) -> int:
        """Kill rsync's ssh once half the file is at the destination, rerun the same command:
        the bytes the rerun sends."""
        directory = self.work / f"plain-{len(options)}"
        shutil.rmtree(directory, ignore_errors=True)
        directory.mkdir()
        target = f"{self.server.user}@{self.server.host}:{directory / source.name}"
        argv = ["rsync", *options, "-e", self.ssh, "--", str(source), target]
        process = subprocess.Popen([*argv[:1], f"--bwlimit={bwlimit}", *argv[1:]])  # noqa: S603
        kill_at_half(directory, source.stat().st_size, lambda: children(process.pid))
        process.wait()
        rerun = subprocess.run([*argv[:1], "--stats", *argv[1:]], check=True,  # noqa: S603
                               capture_output=True, text=True).stdout
        shutil.rmtree(directory)
        match = re.search(r"Total bytes sent: ([\d,]+)", rerun)
        assert match is not None, rerun  # noqa: S101
        return int(match[1].replace(",", ""))

    def service_rsync_only(self, source: Path) -> float:
        """The service's rsync command alone, through the host layer, without verifying."""
        (self.work / "plain").mkdir(exist_ok=True)
        (self.work / "plain" / source.name).unlink(missing_ok=True)
        ssh = rsync.ssh_command(key=self.server.user_key_path,
                                known_hosts=self.server.known_hosts_path, port=self.server.port,
                                connect_timeout=10)
        argv = rsync.rsync_argv(source, self.target(source.name), ssh=ssh, timeout_seconds=60,
                                bwlimit_kbps=None)
        output = rsync.RsyncOutput()
        start = time.perf_counter()
        LocalExecutor().run(argv, sink=output.feed)
        return time.perf_counter() - start

    # -- the service --------------------------------------------------------------------
    def service(self, source: Path, digest: str, **settings: object) -> tuple[Service, str]:
        self.runs += 1
        values: dict[str, object] = {
            "broker_url": "memory://", "state_dir": self.work / f"state-{self.runs}",
            "staging_dir": source.parent,
            "destination": f"{self.server.user}@{self.server.host}:{self.server.port}:"
                           f"{self.work / 'service'}",
            "ssh_key_path": self.server.user_key_path,
            "ssh_known_hosts_path": self.server.known_hosts_path,
            "outbox_poll_seconds": 0.1, "job_poll_seconds": 0.05, "lease_seconds": 10.0,
            "transfer_backoff_seconds": 0.2, "transfer_progress_seconds": 0.5,
        }
        values.update(settings)
        service = bootstrap(Settings(**values))  # type: ignore[arg-type]
        service.start()
        return service, f"bench-{self.runs}"

    def publish(self, migration: str, source: Path, digest: str) -> None:
        now, size = datetime.now(UTC), source.stat().st_size
        job = PlannedJob(request_id="r1", kind="shared_fs", datacenter="dc", reuse_key="k",
                         source=ArchiveSource(host="local"))
        events = [MigrationResolved(customer_id="c", allocations={}, resolved_document={},
                                    jobs=(job,)),
                  ArchiveCompleted(datacenter="dc", request_id="r1", archive_id="a1",
                                   kind="shared_fs", reuse_key="k", path=str(source),
                                   file_name=source.name, raw_bytes=size, compressed_bytes=size,
                                   sha256=digest, started_at=now, finished_at=now)]
        publisher = Publisher("memory://")
        for event in events:
            envelope = Envelope.wrap(event, migration_id=migration)
            publisher.publish(envelope.to_json(), routing_key=envelope.routing_key)
        publisher.close()

    def wait_done(self, service: Service) -> str:
        while True:
            with service.engine.connect() as connection:
                job = connection.execute(select(transfers)).first()
            if job is not None and job.state in {"done", "failed"}:
                if job.state == "failed":
                    raise RuntimeError(job.error)
                return str(job.id)
            time.sleep(0.02)

    def through_service(self, source: Path, digest: str) -> tuple[float, float]:
        """(publish → verified and committed, the job alone: its claim → committed)."""
        service, migration = self.service(source, digest)
        try:
            start = time.perf_counter()
            self.publish(migration, source, digest)
            job_id = self.wait_done(service)
            end_to_end = time.perf_counter() - start
            a = transfer_attempts
            with service.engine.connect() as connection:
                started = connection.execute(select(a.c.started_at)
                                             .where(a.c.job_id == job_id)).scalar_one()
                finished = connection.execute(select(transfers.c.updated_at)
                                              .where(transfers.c.id == job_id)).scalar_one()
            return end_to_end, finished - started
        finally:
            service.stop()
            service.engine.dispose()
            shutil.rmtree(self.work / "service" / migration, ignore_errors=True)

    def service_interrupted(self, source: Path, digest: str, bwlimit: int) -> int:
        service, migration = self.service(source, digest, transfer_bwlimit_kbps=bwlimit)
        try:
            self.publish(migration, source, digest)
            killed = kill_at_half(self.work / "service" / migration, source.stat().st_size,
                                  our_rsync_ssh)
            job_id = self.wait_done(service)
            a = transfer_attempts
            with service.engine.connect() as connection:
                runs = connection.execute(select(a).where(a.c.job_id == job_id)
                                          .order_by(a.c.attempt)).all()
            assert killed and len(runs) == 2, runs  # noqa: S101
            return int(runs[1].bytes_sent)
        finally:
            service.stop()
            service.engine.dispose()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mib", type=int, default=512, help="file size for throughput")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--interrupt-mib", type=int, default=256)
    args = parser.parse_args()
    logging.basicConfig(level=logging.ERROR)
    with SshServer() as server, tempfile.TemporaryDirectory(prefix="ferry-bench-") as tmp:
        work = Path(tmp)
        bench = Bench(server, work)
        source = work / "archive.tar.zst"
        digest = make_file(source, args.mib * MiB)
        times: dict[str, list[float]] = {"plain": [], "plain_gcm": [], "rsync_only": [],
                                         "job": [], "service": []}
        for _ in range(args.runs):
            # every case starts with no dirty pages left by the one before
            os.sync()
            times["plain"].append(bench.plain(source))
            os.sync()
            times["plain_gcm"].append(bench.plain(source, " -c aes128-gcm@openssh.com"))
            os.sync()
            times["rsync_only"].append(bench.service_rsync_only(source))
            os.sync()
            end_to_end, job = bench.through_service(source, digest)
            times["service"].append(end_to_end)
            times["job"].append(job)
        size_mb = args.mib * MiB / 1e6
        base = statistics.median(times["plain"])
        print(f"\nThroughput, {args.mib} MiB random file to sshd on 127.0.0.1, "
              f"median of {args.runs} (MB = 10^6 bytes)")
        print(f"| {'path':<58} | {'s':>6} | {'MB/s':>6} | {'vs plain':>8} |")
        print(f"| {'-' * 58} | {'-' * 6} | {'-' * 6} | {'-' * 8} |")
        rows = [("plain `rsync -e ssh` (default cipher)", "plain"),
                ("plain `rsync -e 'ssh -c aes128-gcm'`", "plain_gcm"),
                ("the service's rsync command alone (no verify)", "rsync_only"),
                ("transfer job: mkdir+rsync+sha256 at destination+commit", "job"),
                ("same, from publishing archive.completed (embedded broker)", "service")]
        for label, key in rows:
            median = statistics.median(times[key])
            print(f"| {label:<58} | {median:6.2f} | {size_mb / median:6.0f} | "
                  f"{base / median:8.2f} |")

        small = work / "interrupt.tar.zst"
        small_digest = make_file(small, args.interrupt_mib * MiB)
        size = args.interrupt_mib * MiB
        bwlimit = args.interrupt_mib * 1024 // 6  # about 6 s for the whole file
        resent = {
            "plain `rsync -e ssh` (no --partial: restarts)":
                bench.plain_interrupted(small, [], bwlimit),
            "`rsync --inplace` (the seed's)": bench.plain_interrupted(small, ["--inplace"],
                                                                       bwlimit),
            "transfer service (--inplace --partial --append-verify)":
                bench.service_interrupted(small, small_digest, bwlimit),
        }
        print(f"\nBytes sent again by the retry after the connection died with 50 % of the "
              f"{args.interrupt_mib} MiB file at the destination")
        print(f"| {'path':<56} | {'MB re-sent':>10} | {'% of file':>9} |")
        print(f"| {'-' * 56} | {'-' * 10} | {'-' * 9} |")
        for label, sent in resent.items():
            print(f"| {label:<56} | {sent / 1e6:10.1f} | {100 * sent / size:8.1f}% |")


if __name__ == "__main__":
    main()
