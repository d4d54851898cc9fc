"""The whole pipeline vs a plain shell baseline, on the demo's medium data, in one run.

Baseline (what the field report started from): per source, sequentially,
`tar -cf - . | gzip -6 > archive` (mysqldump | gzip -6 for the database), then `rsync` per
archive to the destination. Ferry: every service in one process (embedded default), the
document POSTed to intake, archives compressed on the archiver, transferred with verified
rsync. Overhead = the pipeline's wall time when no archive or transfer was running
(messaging, planning, polling).

    python bench/pipeline.py [--size medium] [--workdir /tmp/ferry-bench-pipeline]
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import time
from datetime import datetime
from pathlib import Path
from shlex import quote
from typing import Any

from rich.console import Console
from rich.table import Table

from ferry.demo import demo_settings, migrate, start_services
from ferry.demo_site import (
    DemoSite,
    build_database,
    build_trees,
    drop_database,
    du,
    write_description,
)

MYSQL = "127.0.0.1:3306"
console = Console(width=150)


def prepare(workdir: Path, size: str) -> DemoSite:
    site = DemoSite(workdir=workdir / "site", size=size)
    marker = site.workdir / f".trees-{size}"
    if not marker.exists():
        shutil.rmtree(site.workdir, ignore_errors=True)
        with console.status(f"building the {size} sample site (once; cached)…"):
            build_trees(site)
        marker.touch()
    why = build_database(site, MYSQL)
    if why:
        raise SystemExit(f"benchmark needs MariaDB: {why}")
    write_description(site)
    return site


def shell(command: str) -> None:
    """A plain shell pipeline, as an ops engineer would type it (paths quoted)."""
    subprocess.run(command, shell=True, check=True, executable="/bin/bash")  # noqa: S602


def baseline(site: DemoSite, out: Path) -> dict[str, float]:
    shutil.rmtree(out, ignore_errors=True)
    staging, destination = out / "staging", out / "destination"
    staging.mkdir(parents=True)
    destination.mkdir(parents=True)
    started = time.monotonic()
    for index, path in enumerate(site.sources.values()):
        target = staging / f"{index}.tar.gz"
        shell(f"tar -C {quote(str(path))} -cf - . | gzip -6 > {quote(str(target))}")
    shell(f"mysqldump --single-transaction -h 127.0.0.1 -u root {quote(site.database or '')} "
          f"| gzip -6 > {quote(str(staging / 'db.sql.gz'))}")
    archived = time.monotonic()
    for archive in sorted(staging.iterdir()):
        subprocess.run(["rsync", "-a", str(archive), str(destination) + "/"], check=True)
    done = time.monotonic()
    return {"wall": done - started, "archive": archived - started, "transfer": done - archived,
            "bytes_out": du(staging)}


def _ts(value: str) -> float:
    return datetime.fromisoformat(value).timestamp()


def busy_seconds(status: dict[str, Any]) -> float:
    """Length of the union of the time spans when some archive or transfer was running."""
    spans = []
    for job in status["jobs"]:
        archive, transfer = job.get("archive") or {}, job.get("transfer") or {}
        if archive.get("started_at") and archive.get("finished_at") and not archive.get("reused"):
            spans.append((_ts(archive["started_at"]), _ts(archive["finished_at"])))
        if transfer.get("duration_s") is not None:
            end = _ts(job["updated_at"])
            spans.append((end - float(transfer["duration_s"]), end))
    total, current_start, current_end = 0.0, None, None
    for start, end in sorted(spans):
        if current_end is None or start > current_end:
            if current_end is not None and current_start is not None:
                total += current_end - current_start
            current_start, current_end = start, end
        else:
            current_end = max(current_end, end)
    if current_end is not None and current_start is not None:
        total += current_end - current_start
    return total


def pipeline(site: DemoSite, out: Path, compression: str) -> dict[str, float]:
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    settings = demo_settings(out, site, MYSQL).model_copy(update={"compression": compression})
    services = start_services(settings)
    try:
        started = time.monotonic()
        outcome = migrate(settings, site.document_path.read_bytes(), console,
                          live=False, timeout=3600)
        wall = time.monotonic() - started
    finally:
        for service in reversed(services):
            service.stop()
    if outcome.status.get("status") != "completed":
        raise SystemExit(f"pipeline did not complete: {outcome.status.get('reason')}")
    busy = busy_seconds(outcome.status)
    return {"wall": wall, "busy": busy, "overhead": max(0.0, wall - busy),
            "bytes_out": du(Path(settings.staging_dir)), "archives": len(outcome.status["jobs"])}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--size", default="medium", choices=["small", "medium"])
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/ferry-bench-pipeline"))
    args = parser.parse_args()
    site = prepare(args.workdir, args.size)
    try:
        raw = sum(du(p) for p in site.sources.values())
        console.print(f"{len(site.sources) + 1} sources, {raw / 1e9:.2f} GB raw (+ database)")
        base = baseline(site, args.workdir / "baseline")
        ferry_zstd = pipeline(site, args.workdir / "ferry-zstd", "zstd")
        ferry_gzip = pipeline(site, args.workdir / "ferry-gzip", "gzip")
    finally:
        drop_database(MYSQL, site.database or "")
    table = Table("case", "wall s", "MB/s raw", "output MB", "vs baseline", "overhead s",
                  "overhead %", title=f"whole pipeline, {args.size} data, {raw / 1e9:.2f} GB")
    table.add_row("baseline: tar | gzip -6, then rsync, sequential", f"{base['wall']:.1f}",
                  f"{raw / base['wall'] / 1e6:.0f}", f"{base['bytes_out'] / 1e6:.0f}", "1.00x",
                  "-", "-")
    for name, run in (("ferry (zstd)", ferry_zstd), ("ferry (gzip, isal)", ferry_gzip)):
        table.add_row(name, f"{run['wall']:.1f}", f"{raw / run['wall'] / 1e6:.0f}",
                      f"{run['bytes_out'] / 1e6:.0f}", f"{base['wall'] / run['wall']:.2f}x faster",
                      f"{run['overhead']:.1f}", f"{100 * run['overhead'] / run['wall']:.1f}")
    console.print(table)
    console.print(f"baseline split: archive {base['archive']:.1f}s, "
                  f"transfer {base['transfer']:.1f}s")


if __name__ == "__main__":
    main()
