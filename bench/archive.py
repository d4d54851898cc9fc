"""Archive throughput: Ferry's archiver (both formats) against plain OpenSSH pipelines.

All over ssh on 127.0.0.1 (a real sshd from tests/support/sshd.py), on 1 GiB of a generated
root-filesystem-like tree (many small text files, larger binaries of mixed compressibility,
a few logs), cached under /tmp so reruns do not rebuild it. Baselines, in the same run:

  raw      ssh host 'tar -cf - dir' | cat > /dev/null      (the limit: no compression)
  gzip -6  ssh host 'tar -cf - dir' | gzip -6 > file        (the seed's pipeline)
  pigz -6  ssh host 'tar -cf - dir' | pigz -6 > file

Ferry rows run the real job path (request recorded, job claimed under a lease, streamed with
paramiko, compressed on this host, sealed). Goal: >= 0.8x raw in both formats; zstd output
no larger than gzip -6's. MB/s = 10^6 bytes of tar stream per second.

    .venv/bin/python bench/archive.py [--repeat 3] [--size-mib 1024]
"""

from __future__ import annotations

import argparse
import os
import random
import resource
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from sqlalchemy import select  # noqa: E402

from services.archiver import SCHEMA as ARCHIVER_SCHEMA  # noqa: E402
from services.archiver.handlers import record_archive_request  # noqa: E402
from services.archiver.jobs import Archiver  # noqa: E402
from services.archiver.tables import archive_jobs  # noqa: E402
from shared.addresses import host_pool  # noqa: E402
from shared.contracts import ArchiveRequested, ArchiveSource  # noqa: E402
from shared.envelope import Envelope  # noqa: E402
from shared.jobs import JobWorker, Leases  # noqa: E402
from shared.retry import RetryPolicy  # noqa: E402
from shared.runtime import deliver, open_database  # noqa: E402
from shared.settings import Settings  # noqa: E402
from tests.support.sshd import SshServer  # noqa: E402

CACHE = Path("/tmp/ferry-bench-rootfs")
WORDS = ("the of and to in is for on that with as by this be are from or at an it not "
         "config server option value default path user group file directory module kernel "
         "package install version library function return error warning include define "
         "static const struct void int char unsigned buffer length size offset address "
         "network socket port host service daemon log level debug info true false none").split()


# -- the tree ------------------------------------------------------------------------------


def _corpus(rng: random.Random, size: int) -> bytes:
    lines, total = [], 0
    while total < size:
        line = " ".join(rng.choices(WORDS, k=rng.randint(4, 14)))
        line += f" {rng.randint(0, 99999)}" if rng.random() < 0.3 else ""
        lines.append(line)
        total += len(line) + 1
    return ("\n".join(lines) + "\n").encode()


def build_tree(root: Path, size_bytes: int) -> None:
    """~45% text (configs, docs, sources), ~45% binaries (part random, part structured, part
    zeros), ~10% logs."""
    rng = random.Random(20261126)
    corpus = _corpus(rng, 24 << 20)

    def text(n: int) -> bytes:
        start = rng.randrange(0, len(corpus) - n - 1)
        return corpus[start:start + n]

    def binary(n: int) -> bytes:
        parts, total = [], 0
        while total < n:
            kind, length = rng.random(), rng.randint(4 << 10, 256 << 10)
            if kind < 0.40:
                parts.append(rng.randbytes(length))  # code, compressed data: incompressible
            elif kind < 0.85:  # tables, symbols: text with binary noise
                chunk = bytearray(text(length))
                for _ in range(length // 64):
                    chunk[rng.randrange(length)] = rng.randrange(256)
                parts.append(bytes(chunk))
            else:
                parts.append(bytes(length))
            total += length
        return b"".join(parts)[:n]

    budget = {"text": size_bytes * 45 // 100, "bin": size_bytes * 45 // 100,
              "log": size_bytes - 2 * (size_bytes * 45 // 100)}
    made = 0
    for area, make, sizes in [("text", text, (200, 40 << 10)), ("bin", binary, (16 << 10, 4 << 20)),
                              ("log", text, (4 << 20, 32 << 20))]:
        written, index = 0, 0
        while written < budget[area]:
            top = {"text": "usr/share", "bin": "usr/lib", "log": "var/log"}[area]
            directory = root / top / f"pkg{index // 40:04d}"
            if index % 40 == 0:
                directory.mkdir(parents=True, exist_ok=True)
            low, high = sizes
            size = min(int(rng.lognormvariate(0, 1.2) * (low + high) / 8) + low, high)
            (directory / f"{area}-{index:06d}").write_bytes(make(size))
            written += size
            index += 1
        made += index
    print(f"built {made} files, {size_bytes / 2**20:.0f} MiB in {root}", flush=True)


def cached_tree(size_mib: int) -> Path:
    tree = CACHE / f"{size_mib}mib"
    marker = tree / ".complete"
    if not marker.exists():
        shutil.rmtree(tree, ignore_errors=True)
        build_tree(tree / "root", size_mib << 20)
        marker.write_text("ok\n")
    return tree / "root"


# -- the cases -----------------------------------------------------------------------------


@dataclass
class Case:
    name: str
    run: Callable[[], tuple[int, int]]  # -> (raw bytes, output bytes)
    repeat: bool = True
    seconds: list[float] = field(default_factory=list)
    cpu: list[float] = field(default_factory=list)  # this process + its waited-for children
    raw: int = 0
    out: int = 0


def openssh(server: SshServer, tree: Path) -> str:
    remote = shlex.join(["tar", "-C", str(tree), "-cf", "-", "."])
    return shlex.join(["ssh", "-F", "/dev/null", "-i", str(server.user_key_path),
                       "-o", f"UserKnownHostsFile={server.known_hosts_path}",
                       "-o", "StrictHostKeyChecking=yes", "-o", "BatchMode=yes",
                       "-c", "aes128-gcm@openssh.com", "-p", str(server.port),
                       f"{server.user}@{server.host}", remote])


def shell_case(ssh: str, tail: str, out: Path | None,
               raw_size: int) -> Callable[[], tuple[int, int]]:
    def run() -> tuple[int, int]:
        subprocess.run(["bash", "-o", "pipefail", "-c", f"{ssh} | {tail}"], check=True)
        size = out.stat().st_size if out else raw_size
        if out:
            out.unlink()
        return raw_size, size

    return run


def ferry_case(server: SshServer, tree: Path, work: Path, compression: str,
               nice: bool = True, local: bool = False) -> Callable[[], tuple[int, int]]:
    def run() -> tuple[int, int]:
        settings = Settings(allow_local_hosts=True, state_dir=work / "state",
                            staging_dir=work / "staging", compression=compression,
                            source_nice=nice,
                            ssh_key_path=server.user_key_path,
                            ssh_known_hosts_path=server.known_hosts_path, lease_seconds=60,
                            shared_fs_mount_check=False)  # the tree is a plain directory
        units = open_database(settings, ARCHIVER_SCHEMA)
        engine = units.engine
        pool = host_pool(settings)
        address = "local" if local else f"{server.user}@{server.host}:{server.port}"
        archiver = Archiver(settings, engine, "bench", pool)
        worker = JobWorker(Leases(engine, archive_jobs, settings.lease_seconds), archiver.run,
                           units=units, policy=RetryPolicy.from_settings(settings),
                           fail=archiver.fail, name="bench")
        event = ArchiveRequested(datacenter="bench", request_id=uuid.uuid4().hex,
                                 kind="shared_fs", reuse_key=uuid.uuid4().hex,
                                 source=ArchiveSource(host=address, path=str(tree)))
        deliver(record_archive_request, event, Envelope.wrap(event, migration_id="bench"), units)
        assert worker.run_one("bench-worker")
        with engine.connect() as connection:
            job = connection.execute(select(archive_jobs).where(
                archive_jobs.c.reuse_key == event.reuse_key)).one()
        pool.close_all()
        engine.dispose()
        if job.state != "done":
            raise RuntimeError(f"ferry archive failed: {job.error}")
        Path(job.file_path).unlink()
        return int(job.raw_bytes), int(job.compressed_bytes)

    return run


def ferry_transport_case(server: SshServer, tree: Path) -> Callable[[], tuple[int, int]]:
    """Ferry's host layer alone (paramiko, aes128-gcm) into a sink that drops the bytes."""

    def run() -> tuple[int, int]:
        settings = Settings(ssh_key_path=server.user_key_path,
                            ssh_known_hosts_path=server.known_hosts_path)
        pool = host_pool(settings)
        seen = [0]

        def sink(chunk: bytes) -> None:
            seen[0] += len(chunk)

        pool.get(f"{server.user}@{server.host}:{server.port}").run(
            ["tar", "-C", str(tree), "-cf", "-", "."], sink=sink)
        pool.close_all()
        return seen[0], seen[0]

    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeat", type=int, default=3, help="runs of each fast case")
    parser.add_argument("--size-mib", type=int, default=1024)
    args = parser.parse_args()
    tree = cached_tree(args.size_mib)
    work = Path(tempfile.mkdtemp(prefix="ferry-bench-"))
    try:
        with SshServer() as server:
            ssh = openssh(server, tree)
            warm = subprocess.run(["bash", "-o", "pipefail", "-c", f"{ssh} | wc -c"],
                                  check=True, capture_output=True, text=True)  # and page cache
            raw_size = int(warm.stdout.strip())
            out = work / "out"
            cases = [
                Case("raw: ssh tar | cat > /dev/null", shell_case(ssh, "cat > /dev/null", None,
                                                                  raw_size)),
                Case("ferry zstd (default)", ferry_case(server, tree, work, "zstd")),
                Case("ferry gzip (isal)", ferry_case(server, tree, work, "gzip")),
                Case("ferry zstd, source not niced", ferry_case(server, tree, work, "zstd",
                                                                nice=False)),
                Case("ferry gzip, source not niced", ferry_case(server, tree, work, "gzip",
                                                                nice=False)),
                Case("ferry zstd, source local (no ssh)", ferry_case(server, tree, work, "zstd",
                                                                     local=True)),
                Case("ferry gzip, source local (no ssh)", ferry_case(server, tree, work, "gzip",
                                                                     local=True)),
                Case("local tar | cat (no ssh, no compression)",
                     shell_case(f"tar -C {shlex.quote(str(tree))} -cf - .", "cat > /dev/null",
                                None, raw_size)),
                Case("ferry transport only (paramiko, no compression)",
                     ferry_transport_case(server, tree)),
                Case("ssh tar | zstd -3 -T0 (CLI)", shell_case(ssh, f"zstd -3 -T0 -q > {out}",
                                                               out, raw_size)),
                Case("ssh tar | pigz -6", shell_case(ssh, f"pigz -6 > {out}", out, raw_size),
                     repeat=False),
                Case("ssh tar | gzip -6", shell_case(ssh, f"gzip -6 > {out}", out, raw_size),
                     repeat=False),
            ]
            for round_ in range(args.repeat):  # alternate cases so drift hits all alike
                for case in cases:
                    if round_ and not case.repeat:
                        continue
                    cpu, started = _cpu(), time.perf_counter()
                    case.raw, case.out = case.run()
                    case.seconds.append(time.perf_counter() - started)
                    case.cpu.append(_cpu() - cpu)
                    print(f"  {case.name}: {case.seconds[-1]:.2f}s", flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    report(cases, args.size_mib)


def _cpu() -> float:
    """CPU seconds on the archiver side: this process (Ferry) and finished children (ssh
    client, compressor CLIs). The source side (sshd, tar) is not counted."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(
        resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def report(cases: list[Case], size_mib: int) -> None:
    raw_rate = cases[0].raw / 1e6 / statistics.median(cases[0].seconds)
    gzip6 = next(c for c in cases if c.name.endswith("gzip -6"))
    print(f"\n{size_mib} MiB root-like tree, tar stream {cases[0].raw / 1e6:.0f} MB, over ssh "
          f"on 127.0.0.1, {os.cpu_count()} cores shared by both ends; median of runs\n")
    print(f"{'case':<48} {'runs':>4} {'MB/s':>6} {'x raw':>6} {'out MB':>7} {'ratio':>6} "
          f"{'cpu s':>6} {'MB/cpu-s':>8}")
    for case in cases:
        rate = case.raw / 1e6 / statistics.median(case.seconds)
        print(f"{case.name:<48} {len(case.seconds):>4} {rate:>6.0f} {rate / raw_rate:>6.2f} "
              f"{case.out / 1e6:>7.0f} {case.raw / case.out:>6.2f} "
              f"{statistics.median(case.cpu):>6.1f} "
              f"{case.raw / 1e6 / max(statistics.median(case.cpu), 1e-3):>8.0f}")
    print("cpu s: archiver-side CPU seconds (Ferry's process, or the ssh client and compressor "
          "of a shell pipeline); sshd and tar on the source side are not counted.\n"
          "MB/cpu-s: raw MB per archiver-side CPU second, what one dedicated core would do.")
    zstd = next(c for c in cases if c.name.startswith("ferry zstd (default)"))
    print(f"\nzstd output / gzip -6 output: {zstd.out / gzip6.out:.3f} (goal <= 1)")


if __name__ == "__main__":
    main()
