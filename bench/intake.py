"""Intake: how fast a 100-VM migration document is validated and accepted.

In-process: FastAPI's TestClient against create_app on a SQLite file (WAL), the same code
path `POST /migrations` runs under uvicorn minus the socket. The document is generated in
the shape of examples/migration.json: 10 app environments of 8 VMs (one with the shared
/data each) behind their own public IP, 10 MySQL master/replica pairs, and every app VM's
local filesystems moved from an old VM. Cases run alternately in rounds so that machine
noise falls on all of them alike.

Run: .venv/bin/python bench/intake.py [--rounds 10] [--per-round 20]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from fastapi.testclient import TestClient
from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from services.intake.api import create_app  # noqa: E402
from shared.document import validate_document  # noqa: E402
from shared.settings import Settings  # noqa: E402

TOKEN = uuid.uuid4().hex  # the API is benched with its bearer check on, as deployed
HEADERS = {"Content-Type": "application/json", "Authorization": f"Bearer {TOKEN}"}


def disk(mountpoint: str, size: int) -> dict[str, Any]:
    return {"size_gib": size + 5,
            "filesystems": [{"mountpoint": mountpoint, "size_gib": size, "fs_type": "ext3"}]}


def vm(duid: str, role: str, environment: str, *mounts: str) -> dict[str, Any]:
    return {"duid": duid, "role": role, "environment": environment, "memory_mib": 1792,
            "vcpus": 2, "disks": [disk("/", 15), *(disk(m, 50) for m in mounts)]}


def document(app_envs: int = 10, vms_per_env: int = 8, db_pairs: int = 10) -> dict[str, Any]:
    """A valid document with app_envs * vms_per_env + 2 * db_pairs VMs."""
    environments, vms, ips, groups = [], [], [], []
    shared, equivalences, databases, local = [], [], [], []
    for e in range(app_envs):
        env = f"env_app_{e}"
        members = [f"vm_{e}_{n}" for n in range(vms_per_env)]
        environments.append({"duid": env, "name_hint": f"app {e}", "vms": members})
        for n, duid in enumerate(members):
            vms.append(vm(duid, "app", env, *(["/data"] if n == 0 else [])))
            local.append({"old_vm": f"ey04-s{50000 + e * vms_per_env + n}", "new_vm": duid})
        ips.append({"duid": f"ip_{e}", "port_mappings": [
            {"protocol": "tcp", "external_port": port, "vms": members, "internal_port": port}
            for port in (443, 80)]})
        shared.append({"old_environment": f"ey04-e{75 + e:05d}", "mountpoint": "/data",
                       "new_environment": env})
        equivalences.append({"old_ip": f"203.0.113.{10 + e}", "new_public_ip": f"ip_{e}"})
    for d in range(db_pairs):
        env, master, replica = f"env_db_{d}", f"vm_db_{d}_m", f"vm_db_{d}_r"
        environments.append({"duid": env, "name_hint": f"db {d}", "vms": [master, replica]})
        vms += [vm(master, "db_master", env, "/var/lib/mysql"),
                vm(replica, "db_replica", env, "/var/lib/mysql")]
        groups.append({"duid": f"db_{d}", "engine": "mysql", "version": "5.0.51",
                       "master": master, "replicas": [replica]})
        databases.append({"name": f"shop_{d}_production", "old_master": f"mysql-{d}-master",
                          "old_replica": f"mysql-{d}-replica", "new_database_group": f"db_{d}"})
    return {"version": 1, "customer": {"id": "cust-2000", "name": "Bench Corp."},
            "environments": environments, "vms": vms, "public_ips": ips,
            "database_groups": groups,
            "migration": {"shared_filesystems": shared, "ip_equivalences": equivalences,
                          "databases": databases, "local_filesystems": local}}


def measure(cases: dict[str, Callable[[], None]], rounds: int,
            per_round: int) -> dict[str, list[float]]:
    timings: dict[str, list[float]] = {name: [] for name in cases}
    for run in cases.values():  # warm up imports, caches, the SQLite file
        for _ in range(3):
            run()
    for _ in range(rounds):
        for name, run in cases.items():
            for _ in range(per_round):
                started = time.perf_counter()
                run()
                timings[name].append(time.perf_counter() - started)
    return timings


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--per-round", type=int, default=20)
    args = parser.parse_args()

    raw = document()
    assert len(raw["vms"]) == 100
    body = json.dumps(raw, indent=2).encode()
    validate_document(json.loads(body))  # the generated document must be valid
    with tempfile.TemporaryDirectory(prefix="bench-intake-") as state:
        app = create_app(Settings(intake_database_url=f"sqlite:///{state}/intake.sqlite3",
                                  api_token=TOKEN))
        client = TestClient(app)

        def post(headers: dict[str, str]) -> None:
            response = client.post("/migrations", content=body, headers=headers)
            assert response.status_code == 202, response.text

        cases: dict[str, Callable[[], None]] = {
            "baseline: json.loads only": lambda: json.loads(body),
            "validate_document (parse + rules)": lambda: validate_document(json.loads(body)),
            "POST /migrations, accepted + stored": lambda: post(HEADERS),
            "POST /migrations, Idempotency-Key": lambda: post(
                {**HEADERS, "Idempotency-Key": uuid.uuid4().hex}),
            "POST /migrations, replayed key": lambda: post(
                {**HEADERS, "Idempotency-Key": "same-key"}),
        }
        timings = measure(cases, args.rounds, args.per_round)
        client.close()
        app.state.engine.dispose()

    table = Table(title=f"intake: 100-VM document ({len(body) / 1024:.0f} KiB), "
                        f"{args.rounds} rounds x {args.per_round}, SQLite, in-process")
    for column in ("case", "docs/s", "p50 ms", "p99 ms", "vs validate p50"):
        table.add_column(column, justify="left" if column == "case" else "right")
    reference = statistics.median(timings["validate_document (parse + rules)"])
    for name, values in timings.items():
        p50 = statistics.median(values)
        table.add_row(name, f"{len(values) / sum(values):,.0f}", f"{p50 * 1000:.2f}",
                      f"{percentile(values, 0.99) * 1000:.2f}", f"{p50 / reference:.2f}x")
    Console(width=110).print(table)


if __name__ == "__main__":
    main()
