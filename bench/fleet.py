"""The field report's fleet in miniature: 1,474 archive jobs (808 local filesystems with
snapshot driver `none`, 294 shared filesystems, 372 MariaDB databases, a few KiB each) in
200 migrations submitted at once to two datacenters (ey04, ey02), every service its own
`ferry run` process on RabbitMQ + PostgreSQL (a vhost and databases made for the run and
removed after; MariaDB schemas likewise), against a baseline doing the same tar | zstd -3,
mysqldump | zstd -3 and rsync work directly with the same parallelism.

Every database migration also plans its datacenter replica's db_server_root: archived once
per datacenter (reused by the others) and transferred once per migration. Those are counted
separately and left out of the latency figures (a reused archive has no run of its own).

Timestamps per archive request (all wall-clock seconds, same machine):
  submitted          intake `migrations.created_at`
  planned            the `migration.resolved` envelope's occurred_at (intake's event log;
                     the resolver's plan: snapshot.requested / archive.requested follow)
  archive created    archiver `archive_jobs.created_at` (the request reached the archiver)
  archive started    `archive_jobs.started_at`; archived: `archive_jobs.finished_at`
  transfer created   transfer `transfers.created_at`
  transfer started   first `transfer_attempts.started_at`; transferred: last `finished_at`
  completed          intake `migration_jobs.updated_at` (intake recorded it transferred)
Hops: submitted → planned, planned → archive started, archived → transfer started,
transferred → completed.

Orchestration overhead of a job = (completed − submitted) − archive run (finished − started)
− transfer run (last attempt finished − first started) − slot wait. Slot wait is the part of
[archive created, archive started] during which its datacenter's archivers had all their
slots busy (archivers × FERRY_CONCURRENCY running), plus the part of [transfer created,
transfer started] during which its datacenter link ran FERRY_TRANSFER_MAX_PARALLEL
transfers: waiting for a free worker is the fleet's work, not Ferry's. What is left is
time in queues, outboxes, polling, leases and transactions with a worker free. (tar, zstd
and rsync run inside the archive and transfer runs; so do Ferry's own per-run steps, e.g.
the manifest and sha256 — those are in the runs, not the overhead.)

    python bench/fleet.py [--migrations 200] [--scale 1.0] [--workdir /tmp/ferry-bench-fleet]

`--scale 0.1` runs a tenth of the jobs; `--migrations 20 --scale 0.1` a quick check.

Measured 2026-12-01 (2 cores shared with two other helpers' tests: noisy), full fleet, one
archiver (concurrency 2) and one transfer (2 parallel) per datacenter: all 1,474 (+200
db_server_root, 2 archives made) complete, 1,674 files at the destination each once,
sha256 verified; ferry 216-239 s (6.2-6.8 jobs/s) vs baseline 23-26 s: 9.2-9.6x, far from
the 1.5x goal; p50 overhead ~93-113 s a job (23-28 s a hop, goal 20 ms). What limits it:
an archiver slot spends ~595 ms per few-KiB archive (the run ~450 ms of it; tar | zstd
alone ~16 ms), and the fleet's ~100 PostgreSQL commits per job run at a near-constant
~650-750 commits/s in every configuration tried; 4x the archive slots made it slower
(60 migrations: 55.8 s → 70.6 s, the archive run 370 → 1753 ms). Intake records ~33
events/s, so its status lags the work by ~40 s (transferred → completed); the resolver
plans ~4-5 migrations/s (submitted → planned p50 ~19 s for a burst of 200).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import time
import uuid
from collections import Counter, defaultdict
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from shlex import quote
from typing import Any

import httpx
from rich.console import Console
from rich.table import Table
from sqlalchemy import create_engine, select, text

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import fleet_site  # noqa: E402
from services.archiver.tables import archive_jobs, archive_requests  # noqa: E402
from services.intake.tables import migration_events, migration_jobs, migrations  # noqa: E402
from services.transfer.tables import (  # noqa: E402
    transfer_attempts,
    transfer_requests,
    transfers,
)
from shared.digests import file_sha256  # noqa: E402
from tests.e2e.checks import rows  # noqa: E402
from tests.e2e.harness import READY, pipeline_env  # noqa: E402
from tests.support.processes import ChildProcess, stop_all  # noqa: E402

LOCAL, SHARED, DATABASES, MIGRATIONS = 808, 294, 372, 200
MYSQL = ("127.0.0.1", 3306, "root")
PG_ADMIN = "postgresql+psycopg2://postgres@127.0.0.1:5432"
RABBIT = "guest:guest@127.0.0.1:5672"
SERVICES = ("intake", "resolver", "snapshotter", "archiver", "transfer")
console = Console(width=160)


def rabbitmqctl(*args: str) -> None:
    subprocess.run(["rabbitmqctl", *args], check=True, capture_output=True, timeout=60)


def pct(values: list[float], p: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(p / 100 * (len(ordered) - 1)))]


def cpu_seconds(pid: int) -> float:
    """CPU seconds (user + system, its reaped children's too) of a running process."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return sum(int(f) for f in fields[11:15]) / os.sysconf("SC_CLK_TCK")


# ---------------------------------------------------------------- baseline

def baseline(site: fleet_site.FleetSite, out: Path, archive_parallel: int,
             transfer_parallel: int) -> dict[str, float]:
    """The same work done directly: every source tar | zstd -3 (databases mysqldump | zstd
    -3, each replica's root once), `archive_parallel` at a time, then every archive (a server
    root once per migration with databases) rsynced, `transfer_parallel` at a time."""
    shutil.rmtree(out, ignore_errors=True)
    staging, destination = out / "staging", out / "destination"
    staging.mkdir(parents=True)
    commands: list[str] = []
    sends: list[tuple[Path, Path]] = []
    roots = {dc: staging / f"root-{dc}.tar.zst" for dc in fleet_site.DCS}
    for dc in fleet_site.DCS:
        path = site.source / "servers" / f"mysql-{dc}-replica"
        commands.append(f"tar -C {quote(str(path))} -cf - . | zstd -q -3 > {roots[dc]}")
    for c in site.customers:
        target = destination / c.id
        sources = [site.source / "vms" / vm for vm in c.vms]
        sources += [site.source / "envs" / c.id / m.strip("/") for m in c.shared]
        for n, path in enumerate(sources):
            archive = staging / f"{c.id}-{n}.tar.zst"
            commands.append(f"tar -C {quote(str(path))} -cf - . | zstd -q -3 > {archive}")
            sends.append((archive, target))
        for db in c.databases:
            archive = staging / f"{db}.sql.zst"
            commands.append(f"mysqldump --single-transaction -h 127.0.0.1 -u root {db} "
                            f"| zstd -q -3 > {archive}")
            sends.append((archive, target))
        if c.databases:
            sends.append((roots[c.datacenter], target))
    for c in site.customers:
        (destination / c.id).mkdir(parents=True)

    def shell(command: str) -> None:
        subprocess.run(command, shell=True, check=True, executable="/bin/bash")  # noqa: S602

    def rsync(pair: tuple[Path, Path]) -> None:
        subprocess.run(["rsync", "-a", str(pair[0]), str(pair[1]) + "/"], check=True)

    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.monotonic()
    with ThreadPoolExecutor(archive_parallel) as pool:
        list(pool.map(shell, commands))
    archived = time.monotonic()
    with ThreadPoolExecutor(transfer_parallel) as pool:
        list(pool.map(rsync, sends))
    done = time.monotonic()
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)
    return {"wall": done - started, "cpu": cpu, "archive": archived - started,
            "transfer": done - archived, "archives": len(commands), "sends": len(sends)}


# ---------------------------------------------------------------- ferry

def saturated(intervals: list[tuple[float, float]], cap: int) -> list[tuple[float, float]]:
    """The spans during which at least `cap` of `intervals` overlap."""
    points = sorted([(s, 1) for s, _ in intervals] + [(e, -1) for _, e in intervals],
                    key=lambda p: (p[0], p[1]))
    spans, running, since = [], 0, 0.0
    for at, step in points:
        before = running
        running += step
        if before < cap <= running:
            since = at
        elif running < cap <= before:
            spans.append((since, at))
    return spans


def overlap(start: float, end: float, spans: list[tuple[float, float]]) -> float:
    return sum(max(0.0, min(end, e) - max(start, s)) for s, e in spans if s < end and e > start)


def run_ferry(site: fleet_site.FleetSite, workdir: Path, archivers: int, concurrency: int,
              transfer_parallel: int, timeout: float) -> dict[str, Any]:
    vhost = f"ferry-bench-fleet-{uuid.uuid4().hex[:8]}"
    names = {s: f"ferry_bench_fleet_{uuid.uuid4().hex[:8]}" for s in SERVICES}
    admin = create_engine(f"{PG_ADMIN}/postgres", isolation_level="AUTOCOMMIT")
    with admin.connect() as connection:
        for name in names.values():
            connection.execute(text(f'CREATE DATABASE "{name}"'))
    rabbitmqctl("add_vhost", vhost)
    rabbitmqctl("set_permissions", "-p", vhost, "guest", ".*", ".*", ".*")
    urls = {s: f"{PG_ADMIN}/{n}" for s, n in names.items()}
    broker = f"amqp://{RABBIT}/{vhost}"
    env = pipeline_env(workdir, site.inventory_path, broker, urls)
    env.update({"FERRY_ALLOW_LOCAL_HOSTS": "true", "FERRY_COMPRESSION": "zstd",
                "FERRY_ZSTD_LEVEL": "3", "FERRY_CONCURRENCY": str(concurrency),
                "FERRY_TRANSFER_MAX_PARALLEL": str(transfer_parallel),
                "FERRY_LEASE_SECONDS": "60", "FERRY_RECONCILE_SECONDS": "180"})
    processes: dict[str, ChildProcess] = {}
    try:
        for name in ("intake", "resolver", "snapshotter"):
            processes[name] = ChildProcess.ferry("run", name, env=env)
        for dc in fleet_site.DCS:
            for n in range(archivers):
                processes[f"archiver-{dc}-{n}"] = ChildProcess.ferry(
                    "run", "archiver", "--datacenter", dc, env=env)
            processes[f"transfer-{dc}"] = ChildProcess.ferry(
                "run", "transfer", "--datacenter", dc, env=env)
        for process in processes.values():
            process.wait_ready(READY, timeout=120)
        base = f"http://{env['FERRY_INTAKE_BIND']}"
        headers = {"Authorization": f"Bearer {env['FERRY_API_TOKEN']}",
                   "Content-Type": "application/json"}
        with httpx.Client(base_url=base, timeout=30, headers=headers) as client:
            deadline = time.monotonic() + 60
            while True:
                try:
                    if client.get("/healthz").status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                if time.monotonic() > deadline:
                    raise SystemExit("intake never became healthy")
                time.sleep(0.2)
            documents = site.documents()
            started = time.monotonic()
            with ThreadPoolExecutor(8) as pool:
                responses = list(pool.map(lambda body: client.post("/migrations",
                                                                    content=body), documents))
            submitted = time.monotonic() - started
            ids = []
            for response in responses:
                if response.status_code != 202:
                    raise SystemExit(f"submission refused: {response.status_code} "
                                     f"{response.text}")
                ids.append(response.json()["id"])
            states: dict[str, str] = {}
            while time.monotonic() - started < timeout:
                found = rows(urls["intake"], select(migrations.c.id, migrations.c.status))
                states = {row.id: row.status for row in found}
                if all(states.get(i) in {"completed", "failed"} for i in ids):
                    break
                time.sleep(0.25)
            wall = time.monotonic() - started
        failed = [i for i in ids if states.get(i) != "completed"]
        if failed:
            tails = "\n".join(f"--- {n}\n{p.tail(1500)}" for n, p in processes.items())
            raise SystemExit(f"{len(failed)} migrations not completed: "
                             f"{[(i, states.get(i)) for i in failed[:5]]}\n{tails}")
        cpu = {name: cpu_seconds(process.pid) for name, process in processes.items()}
        with admin.connect() as connection:
            commits = {service: int(connection.execute(text(
                "SELECT xact_commit FROM pg_stat_database WHERE datname = :n"),
                {"n": name}).scalar_one()) for service, name in names.items()}
        events = rows(urls["intake"], select(migration_events.c.occurred_at))
        return {"wall": wall, "submit": submitted, "cpu": cpu, "commits": commits,
                "events": len(events),
                "ids": ids, "urls": urls,
                "destination": Path(env["FERRY_DESTINATION"]),
                **analyse(urls, ids, archivers * concurrency, transfer_parallel)}
    finally:
        stop_all(list(processes.values()))
        with admin.connect() as connection:
            for name in names.values():
                connection.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()
        rabbitmqctl("delete_vhost", vhost)


def analyse(urls: dict[str, str], ids: list[str], archive_cap: int,
            transfer_cap: int) -> dict[str, Any]:
    submitted = {r.id: r.created_at for r in rows(urls["intake"], select(
        migrations.c.id, migrations.c.created_at))}
    planned = {r.migration_id: r.occurred_at for r in rows(urls["intake"], select(
        migration_events.c.migration_id, migration_events.c.occurred_at).where(
            migration_events.c.type == "migration.resolved"))}
    completed = {r.request_id: (r.updated_at, r.state, r.kind) for r in rows(
        urls["intake"], select(migration_jobs))}
    requests = {r.request_id: r for r in rows(urls["archiver"], select(archive_requests))}
    jobs = {r.id: r for r in rows(urls["archiver"], select(archive_jobs))}
    treqs = {r.request_id: r for r in rows(urls["transfer"], select(transfer_requests))}
    tjobs = {r.id: r for r in rows(urls["transfer"], select(transfers))}
    attempts: dict[str, list[Any]] = defaultdict(list)
    for r in rows(urls["transfer"], select(transfer_attempts)):
        attempts[r.job_id].append(r)
    archive_runs: dict[str, list[tuple[float, float]]] = defaultdict(list)
    for j in jobs.values():
        if j.started_at and j.finished_at:
            archive_runs[j.datacenter].append((j.started_at, j.finished_at))
    transfer_runs: dict[str, list[tuple[float, float]]] = defaultdict(list)
    for t in tjobs.values():
        for a in attempts[t.id]:
            transfer_runs[t.datacenter].append((a.started_at, a.finished_at or a.started_at))
    a_sat = {dc: saturated(v, archive_cap) for dc, v in archive_runs.items()}
    t_sat = {dc: saturated(v, transfer_cap) for dc, v in transfer_runs.items()}
    hops: dict[str, list[float]] = defaultdict(list)
    overheads, kinds, server_roots = [], Counter(), 0
    retries = sum(1 for t in tjobs.values() if t.attempts > 1)
    for request_id, request in requests.items():
        kinds[request.kind] += 1
        if request.kind == "db_server_root":
            server_roots += 1
            continue
        job = jobs[request.archive_id]
        treq = treqs[request_id]
        tjob = tjobs[treq.job_id]
        tries = sorted(attempts[tjob.id], key=lambda a: a.attempt)
        t_start, t_end = tries[0].started_at, tries[-1].finished_at
        done_at = completed[request_id][0]
        sub = submitted[request.migration_id]
        plan = planned[request.migration_id]
        hops["submitted → planned"].append(plan - sub)
        hops["planned → archive started"].append(job.started_at - plan)
        hops["  planned → archive created"].append(job.created_at - plan)
        hops["  archive created → started"].append(job.started_at - job.created_at)
        hops["archived → transfer started"].append(t_start - job.finished_at)
        hops["  archived → transfer created"].append(tjob.created_at - job.finished_at)
        hops["transferred → completed"].append(done_at - t_end)
        hops["(archive run)"].append(job.finished_at - job.started_at)
        hops["(transfer run)"].append(t_end - t_start)
        wait = (overlap(job.created_at, job.started_at, a_sat.get(job.datacenter, []))
                + overlap(tjob.created_at, t_start, t_sat.get(tjob.datacenter, [])))
        hops["(slot wait)"].append(wait)
        overheads.append(done_at - sub - (job.finished_at - job.started_at)
                         - (t_end - t_start) - wait)
    cycle = {}
    for dc, runs in archive_runs.items():  # a slot's time per archive, start to next start
        cycle[dc] = ((max(e for _, e in runs) - min(s for s, _ in runs)) * archive_cap
                     / len(runs))
    return {"hops": hops, "overhead": overheads, "cycle": cycle,
            "kinds": kinds, "server_roots": server_roots,
            "archives_made": sum(1 for j in jobs.values() if j.state == "done"),
            "transfers": tjobs, "transfer_retries": retries, "jobs": jobs,
            "requests": requests, "treqs": treqs,
            "final_states": Counter(v[1] for v in completed.values())}


def check_destination(result: dict[str, Any]) -> tuple[int, list[str]]:
    """Every transferred archive at the destination exactly once, its sha256 as made; no
    other archive there."""
    problems = []
    expected: dict[Path, str] = {}
    for t in result["transfers"].values():
        if t.state != "done":
            problems.append(f"transfer {t.id} {t.state}: {t.error}")
            continue
        path = result["destination"] / t.migration_id / t.payload["file_name"]
        if path in expected:
            problems.append(f"{path} sent by two transfer jobs")
        expected[path] = t.payload["sha256"]
    present = {p for p in result["destination"].rglob("*")
               if p.is_file() and not p.name.endswith(".manifest.jsonl")
               and not p.name.startswith(".")}
    for extra in sorted(present - set(expected)):
        problems.append(f"unexpected file at the destination: {extra}")
    for path, digest in expected.items():
        if not path.exists():
            problems.append(f"missing at the destination: {path}")
        elif file_sha256(path) != digest:
            problems.append(f"sha256 mismatch: {path}")
    return len(present & set(expected)), problems


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--migrations", type=int, default=MIGRATIONS)
    parser.add_argument("--scale", type=float, default=1.0,
                        help="fraction of the 808/294/372 jobs to run")
    parser.add_argument("--archivers", type=int, default=1, help="archiver processes per DC")
    parser.add_argument("--concurrency", type=int, default=2, help="FERRY_CONCURRENCY")
    parser.add_argument("--transfer-parallel", type=int, default=2,
                        help="FERRY_TRANSFER_MAX_PARALLEL (per datacenter link)")
    parser.add_argument("--timeout", type=float, default=3600)
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/ferry-bench-fleet"))
    args = parser.parse_args()
    totals = [max(1, round(n * args.scale)) for n in (LOCAL, SHARED, DATABASES)]
    migrations_n = min(args.migrations, totals[0])
    shutil.rmtree(args.workdir, ignore_errors=True)
    with console.status("building the fleet's old site…"):
        site = fleet_site.build(args.workdir / "site", migrations_n, *totals, MYSQL)
    try:
        archive_parallel = args.archivers * args.concurrency * len(fleet_site.DCS)
        transfer_parallel = args.transfer_parallel * len(fleet_site.DCS)
        console.print(f"{migrations_n} migrations, {sum(totals)} archive jobs "
                      f"(local {totals[0]}, shared {totals[1]}, databases {totals[2]}); "
                      f"parallelism: {archive_parallel} archives, {transfer_parallel} "
                      "transfers")
        with console.status("baseline…"):
            base = baseline(site, args.workdir / "baseline", archive_parallel,
                            transfer_parallel)
        with console.status("ferry…"):
            ferry = run_ferry(site, args.workdir / "ferry", args.archivers, args.concurrency,
                              args.transfer_parallel, args.timeout)
    finally:
        fleet_site.drop(site, MYSQL)
    arrived, problems = check_destination(ferry)
    fleet_jobs = len(ferry["overhead"])
    summary = Table("measure", "value", title="fleet: ferry vs the same work run directly")
    summary.add_row("archive jobs completed (w/o server roots)", f"{fleet_jobs} / {sum(totals)}")
    summary.add_row("db_server_root requests / archives made for them",
                    f"{ferry['server_roots']} / "
                    f"{sum(1 for j in ferry['jobs'].values() if j.kind == 'db_server_root')}")
    summary.add_row("archives at destination, sha256 verified, each once",
                    f"{arrived} ({len(problems)} problems)")
    summary.add_row("transfer jobs retried", str(ferry["transfer_retries"]))
    summary.add_row("ferry wall s (submit → last completed)", f"{ferry['wall']:.1f}")
    summary.add_row(f"  of which submitting {migrations_n} POSTs s", f"{ferry['submit']:.1f}")
    summary.add_row("ferry jobs/s", f"{fleet_jobs / ferry['wall']:.1f}")
    summary.add_row("baseline wall s (archive + rsync)",
                    f"{base['wall']:.1f} ({base['archive']:.1f} + {base['transfer']:.1f})")
    summary.add_row("baseline jobs/s", f"{fleet_jobs / base['wall']:.1f}")
    summary.add_row("ferry / baseline", f"{ferry['wall'] / base['wall']:.2f}x")
    console.print(summary)
    latency = Table("ms", "p50", "p95", "p99", "max", "mean",
                    title="per job (slot wait: all its DC's workers busy; not overhead)")
    rows_ = [("orchestration overhead", ferry["overhead"]), *ferry["hops"].items()]
    for name, values in rows_:
        latency.add_row(name, *(f"{1000 * pct(values, p):.0f}" for p in (50, 95, 99, 100)),
                        f"{1000 * statistics.fmean(values):.0f}" if values else "-")
    console.print(latency)
    overhead_p50 = pct(ferry["overhead"], 50)
    console.print(f"p50 overhead per hop (4 hops): {1000 * overhead_p50 / 4:.0f} ms "
                  "(goal ≤ 20 ms)")
    cpu = Table("process", "CPU s", "CPU % of wall", title="where the CPU went (2 cores, "
                "shared with other work: noisy)")
    for name, seconds in sorted(ferry["cpu"].items(), key=lambda kv: -kv[1]):
        cpu.add_row(name, f"{seconds:.1f}", f"{100 * seconds / ferry['wall']:.0f}")
    console.print(cpu)
    ferry_cpu = sum(ferry["cpu"].values())
    console.print(f"CPU s per job: ferry's processes {ferry_cpu / fleet_jobs:.3f} "
                  f"(total {ferry_cpu:.0f} s = {ferry_cpu / ferry['wall']:.2f} cores over its "
                  f"wall; PostgreSQL/RabbitMQ not counted), baseline "
                  f"{base['cpu'] / fleet_jobs:.3f} (total {base['cpu']:.0f} s)")
    commits = Table("service database", "commits", "per s", "per job",
                    title="PostgreSQL transactions (pg_stat_database, incl. polling)")
    for service, count in ferry["commits"].items():
        commits.add_row(service, str(count), f"{count / ferry['wall']:.0f}",
                        f"{count / fleet_jobs:.1f}")
    total = sum(ferry["commits"].values())
    commits.add_row("all", str(total), f"{total / ferry['wall']:.0f}", f"{total / fleet_jobs:.1f}")
    console.print(commits)
    for dc, seconds in ferry["cycle"].items():
        console.print(f"{dc}: an archiver slot spent {1000 * seconds:.0f} ms per archive "
                      f"(first start to last finish × slots / archives; the run alone: "
                      f"p50 {1000 * pct(ferry['hops']['(archive run)'], 50):.0f} ms)")
    console.print(f"intake recorded {ferry['events']} events "
                  f"({ferry['events'] / ferry['wall']:.0f}/s over the wall time)")
    for problem in problems[:20]:
        console.print(f"[red]{problem}")
    (args.workdir / "result.json").write_text(json.dumps({
        "wall": ferry["wall"], "baseline": base, "jobs": fleet_jobs,
        "hops": ferry["hops"], "overhead": ferry["overhead"]}))
    if problems or fleet_jobs != sum(totals):
        raise SystemExit(1)


if __name__ == "__main__":
    main()
