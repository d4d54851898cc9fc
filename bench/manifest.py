"""What the manifest costs: the archiver's throughput with and without it, same run.

Ferry's real job path (request recorded, job claimed under a lease, tar streamed through the
local executor, zstd here, sealed) on bench/archive.py's 1 GiB root-like tree (cached under
/tmp). "without" swaps the manifest writer for one that only writes an empty file, so the
two rows differ in nothing but listing and hashing the stream. Runs alternate so drift hits
both alike. Also: the manifest writer alone, fed the same tar stream from memory as fast as
it takes it (its ceiling, on one core). MB/s = 10^6 bytes of tar stream per second.

    .venv/bin/python bench/manifest.py [--repeat 3] [--size-mib 1024]
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import services.archiver.jobs as archiver_jobs  # noqa: E402
from bench.archive import cached_tree, ferry_case  # noqa: E402
from services.archiver.manifest import ManifestFile, ManifestWriter  # noqa: E402
from tests.support.sshd import SshServer  # noqa: E402


class NoManifest:
    """The writer's interface, doing nothing but leaving an empty file to be sealed."""

    def __init__(self, path: Path, archive_name: str, kind: str) -> None:
        self.path = path
        path.write_bytes(b"")

    def feed(self, chunk: bytes) -> None:
        """Nothing: the point of this row."""

    def close(self, archive_sha256: str) -> ManifestFile:
        return ManifestFile(self.path, "", 0)

    def abort(self) -> None:
        self.path.unlink(missing_ok=True)


def _cpu() -> float:
    """CPU seconds of this process and its finished children (tar, the manifest's reader)."""
    own, children = (resource.getrusage(resource.RUSAGE_SELF),
                     resource.getrusage(resource.RUSAGE_CHILDREN))
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def writer_alone(raw: bytes, work: Path) -> tuple[float, float, int]:
    """(seconds, cpu seconds, members) for the manifest writer fed `raw` in 1 MiB chunks."""
    path = work / "alone.manifest"
    cpu, started = _cpu(), time.perf_counter()
    writer = ManifestWriter(path, "alone.tar.zst", "tar")
    view = memoryview(raw)
    for start in range(0, len(raw), 1 << 20):
        writer.feed(bytes(view[start:start + (1 << 20)]))
    listed = writer.close("0" * 64)
    seconds, cpu_seconds = time.perf_counter() - started, _cpu() - cpu
    path.unlink()
    return seconds, cpu_seconds, listed.members


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--size-mib", type=int, default=1024)
    args = parser.parse_args()
    tree = cached_tree(args.size_mib)
    work = Path(tempfile.mkdtemp(prefix="ferry-bench-manifest-"))
    real: Any = archiver_jobs.ManifestWriter
    rows: dict[str, list[tuple[float, float]]] = {"with manifest": [], "without manifest": []}
    raw_bytes = 0
    try:
        with SshServer() as server:  # ferry_case wants one; the source here is local
            run = ferry_case(server, tree, work, "zstd", nice=False, local=True)
            run()  # warm the page cache and the code paths
            for _ in range(args.repeat):
                for name, writer in (("with manifest", real), ("without manifest", NoManifest)):
                    archiver_jobs.ManifestWriter = writer  # type: ignore[misc]
                    cpu, started = _cpu(), time.perf_counter()
                    raw_bytes, _ = run()
                    rows[name].append((time.perf_counter() - started, _cpu() - cpu))
                    print(f"  {name}: {rows[name][-1][0]:.2f}s", flush=True)
                    for leftover in (work / "staging").rglob("*.manifest.jsonl"):
                        leftover.unlink()
        archiver_jobs.ManifestWriter = real  # type: ignore[misc]
        raw = subprocess.run(["tar", "-C", str(tree), "--sort=name", "--numeric-owner",
                              "--sparse", "-cpf", "-", "."], check=True,
                             capture_output=True).stdout
        alone = [writer_alone(raw, work) for _ in range(args.repeat)]
    finally:
        archiver_jobs.ManifestWriter = real  # type: ignore[misc]
        shutil.rmtree(work, ignore_errors=True)
    print(f"\n{args.size_mib} MiB root-like tree, tar stream {raw_bytes / 1e6:.0f} MB, source "
          f"over the local executor, zstd -3, {os.cpu_count()} cores; median of "
          f"{args.repeat}\n")
    print(f"{'case':<40} {'MB/s':>6} {'best':>6} {'s':>6} {'cpu s':>6}")
    for name, runs in rows.items():
        seconds = statistics.median(s for s, _ in runs)
        print(f"{'ferry zstd, ' + name:<40} {raw_bytes / 1e6 / seconds:>6.0f} "
              f"{raw_bytes / 1e6 / min(s for s, _ in runs):>6.0f} {seconds:>6.2f} "
              f"{statistics.median(c for _, c in runs):>6.1f}")
    seconds = statistics.median(s for s, _, _ in alone)
    print(f"{'manifest writer alone (from memory)':<40} {len(raw) / 1e6 / seconds:>6.0f} "
          f"{len(raw) / 1e6 / min(s for s, _, _ in alone):>6.0f} {seconds:>6.2f} "
          f"{statistics.median(c for _, c, _ in alone):>6.1f}")
    with_s = statistics.median(s for s, _ in rows["with manifest"])
    without_s = statistics.median(s for s, _ in rows["without manifest"])
    with_cpu = statistics.median(c for _, c in rows["with manifest"])
    without_cpu = statistics.median(c for _, c in rows["without manifest"])
    print(f"\noverhead: {100 * (with_s / without_s - 1):+.1f}% wall time (median), "
          f"{with_cpu - without_cpu:+.1f} cpu s; {alone[0][2]} members listed.\n"
          "MB/s: median run; best: fastest run. cpu s: this process, tar and the manifest's "
          "reader (both children).")


if __name__ == "__main__":
    main()
