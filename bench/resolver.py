"""Resolver allocation throughput: 1, 2 and 4 resolver processes on one PostgreSQL.

Each case gets a fresh database and a fresh RabbitMQ vhost; the processes start and wait,
then N migrations (the seed's example, one customer each: 6 VM names, 2 environment names,
1 public IP, 1 VLAN, 6 internal IPs = 16 allocations) are published at once, and the clock
runs until the last migration's transaction has committed. One process is the baseline;
the resolver processes' CPU per migration shows whether the cores, not locks, set the pace.

    .venv/bin/python bench/resolver.py [--migrations 300] [--runs 2]
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

from rich.console import Console
from rich.table import Table
from sqlalchemy import create_engine, text

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from services.resolver.bootstrap import NAME  # noqa: E402
from services.resolver.handlers import HANDLERS  # noqa: E402
from shared.bus import Publisher, declare_topology  # noqa: E402
from shared.contracts import MigrationSubmitted  # noqa: E402
from shared.envelope import Envelope  # noqa: E402
from shared.runtime import routing_keys  # noqa: E402
from shared.settings import Settings  # noqa: E402
from shared.topology import QueueSpec  # noqa: E402
from tests.unit.resolver.documents import example_document, inventory_for  # noqa: E402

PG_ADMIN = os.environ.get("FERRY_TEST_PG", "postgresql+psycopg2://postgres@127.0.0.1:5432")
RABBIT = os.environ.get("FERRY_TEST_RABBIT", "guest:guest@127.0.0.1:5672")
PER_MIGRATION = 6 + 2 + 1 + 1 + 6


def rabbitmqctl(*args: str) -> None:
    subprocess.run(["rabbitmqctl", *args], check=True, capture_output=True, timeout=60)


def cpu_seconds(pids: list[int]) -> float:
    """User + system CPU the processes used so far (Linux /proc)."""
    total = 0
    for pid in pids:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        total += int(fields[11]) + int(fields[12])  # utime, stime
    return total / os.sysconf("SC_CLK_TCK")


def run_case(processes: int, migrations: int, workdir: Path) -> tuple[float, float]:
    """Seconds from publishing to the last committed resolution, and the resolver
    processes' CPU seconds in that time."""
    name = f"ferry_bench_{uuid.uuid4().hex[:10]}"
    vhost = f"ferry-bench-{uuid.uuid4().hex[:10]}"
    admin = create_engine(f"{PG_ADMIN}/postgres", isolation_level="AUTOCOMMIT")
    with admin.connect() as connection:
        connection.execute(text(f'CREATE DATABASE "{name}"'))
    rabbitmqctl("add_vhost", vhost)
    rabbitmqctl("set_permissions", "-p", vhost, "guest", ".*", ".*", ".*")
    db_url, broker_url = f"{PG_ADMIN}/{name}", f"amqp://{RABBIT}/{vhost}"
    # each customer owns its own copy of the example's old site (a document moves only its
    # own customer's), all on the one shared database server
    inventory = inventory_for([f"cust-{n:04d}" for n in range(migrations)],
                              workdir / f"{name}-inventory.json")
    env = {**os.environ, "FERRY_BROKER_URL": broker_url, "FERRY_RESOLVER_DATABASE_URL": db_url,
           "FERRY_INVENTORY": str(inventory), "FERRY_STATE_DIR": str(workdir),
           "FERRY_PUBLIC_IP_POOL": "198.18.0.0/20", "FERRY_PREFETCH": "16",
           "PYTHONPATH": str(ROOT)}
    declare_topology(broker_url, QueueSpec(NAME, routing_keys(HANDLERS)),
                     Settings(broker_url=broker_url))
    logs = [workdir / f"{name}-{n}.log" for n in range(processes)]
    started = []
    for log in logs:
        with log.open("wb") as out:
            started.append(subprocess.Popen([sys.executable, "-m", "services.resolver"],
                                            env=env, cwd=ROOT, stdout=out,
                                            stderr=subprocess.STDOUT))
    engine = create_engine(db_url)
    try:
        deadline = time.monotonic() + 120
        while not all("resolver: started" in log.read_text() for log in logs):
            if time.monotonic() > deadline or any(p.poll() is not None for p in started):
                raise RuntimeError(f"resolvers did not start: {logs[0].read_text()[-2000:]}")
            time.sleep(0.1)
        bodies = [Envelope.wrap(MigrationSubmitted(customer_id=f"cust-{n:04d}",
                                                   document=example_document(f"cust-{n:04d}")),
                                migration_id=f"m-{n:04d}") for n in range(migrations)]
        publisher = Publisher(broker_url)
        pids = [p.pid for p in started]
        cpu_before = cpu_seconds(pids)
        begin = time.perf_counter()
        for envelope in bodies:
            publisher.publish(envelope.to_json(), routing_key=envelope.routing_key)
        publisher.close()
        while True:
            with engine.connect() as connection:
                done = connection.execute(text("SELECT count(*) FROM resolutions")).scalar_one()
            if done >= migrations:
                elapsed = time.perf_counter() - begin
                cpu = cpu_seconds(pids) - cpu_before
                break
            if time.perf_counter() - begin > 600:
                raise RuntimeError(f"only {done} of {migrations} resolved in 600 s")
            time.sleep(0.02)
        with engine.connect() as connection:
            twice = connection.execute(text(
                "SELECT count(*) FROM (SELECT address FROM internal_ips WHERE migration_id"
                " IS NOT NULL GROUP BY address HAVING count(*) > 1) d")).scalar_one()
        if twice:
            raise RuntimeError(f"{twice} internal IPs allocated twice")
        return elapsed, cpu
    finally:
        for process in started:
            if process.poll() is None:
                os.kill(process.pid, signal.SIGTERM)
        for process in started:
            try:
                process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.kill(process.pid, signal.SIGKILL)
                process.wait()
        engine.dispose()
        with admin.connect() as connection:
            connection.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()
        rabbitmqctl("delete_vhost", vhost)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--migrations", type=int, default=300)
    parser.add_argument("--runs", type=int, default=2)
    parser.add_argument("--processes", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--keep-logs", action="store_true")
    args = parser.parse_args()
    console = Console(width=120)
    results: dict[int, list[float]] = {n: [] for n in args.processes}
    cpu: dict[int, list[float]] = {n: [] for n in args.processes}
    workdir = Path(tempfile.mkdtemp(prefix="ferry-bench-resolver-"))
    for run in range(args.runs):  # cases alternate, so drift hits each alike
        for processes in args.processes:
            seconds, used = run_case(processes, args.migrations, workdir)
            results[processes].append(seconds)
            cpu[processes].append(used)
            console.print(f"run {run + 1}: {processes} process(es): {seconds:.2f} s, "
                          f"resolver CPU {used:.2f} s")
    if args.keep_logs:
        console.print(f"resolver logs: {workdir}")
    else:
        shutil.rmtree(workdir)
    table = Table(title=f"resolver on PostgreSQL: {args.migrations} migrations x "
                        f"{PER_MIGRATION} allocations, median of {args.runs} "
                        f"({os.cpu_count()} cores)")
    for column in ("processes", "seconds", "migrations/s", "allocations/s", "vs 1 process",
                   "resolver CPU ms/migration"):
        table.add_column(column, justify="right")
    base = statistics.median(results[args.processes[0]])
    for processes, times in results.items():
        seconds = statistics.median(times)
        table.add_row(str(processes), f"{seconds:.2f}", f"{args.migrations / seconds:.0f}",
                      f"{args.migrations * PER_MIGRATION / seconds:.0f}",
                      f"{base / seconds:.2f}x",
                      f"{statistics.median(cpu[processes]) * 1000 / args.migrations:.1f}")
    console.print(table)
    load = os.getloadavg()
    console.print(f"load average at the end: {load[0]:.1f} {load[1]:.1f} {load[2]:.1f} on "
                  f"{os.cpu_count()} cores (other work on the machine skews the scaling)")


if __name__ == "__main__":
    main()
