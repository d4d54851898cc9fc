"""Intake: how fast a migration document is validated and accepted, ordinary and worst case.

1. In-process (FastAPI's TestClient against create_app on a SQLite file, WAL: the code path
   of `POST /migrations` minus the socket): the 100-VM document in the shape of
   examples/migration.json, then the field report's worst cases at 1 MiB (one environment
   holding 4,500 VMs, thousands of shared-filesystem moves into it; valid, and wrong in
   every move), and 500,000 wrong public IPs. Floors in the same run: `json.loads` alone
   and pydantic's structural validation alone. Then validation time against size.
2. A real intake (uvicorn in its own process, PostgreSQL): p99 of good POSTs from 4
   clients, alone and while another client sends 40 invalid 1 MiB documents at once.
3. RabbitMQ: dead letters replayed once each while every replayed copy dies again.
Cases run alternately in rounds so that machine noise falls on all of them alike.

Run: .venv/bin/python bench/intake.py [--rounds 10] [--per-round 20] [--skip-load]
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

from fastapi.testclient import TestClient
from pydantic import ValidationError
from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from intake_documents import (  # noqa: E402 - beside this file
    compact,
    fitting,
    ordinary,
    worst_invalid,
    worst_valid,
    wrong_shape,
)

from services.intake.api import create_app  # noqa: E402
from shared.document import DocumentInvalidError, MigrationDocument  # noqa: E402
from shared.document import validate_document as validate  # noqa: E402
from shared.settings import Settings  # noqa: E402

TOKEN = uuid.uuid4().hex  # the API is benched with its bearer check on, as deployed
HEADERS = {"Content-Type": "application/json", "Authorization": f"Bearer {TOKEN}"}
CONSOLE = Console(width=120)


def measure(cases: dict[str, Callable[[], object]], rounds: int,
            per_round: int) -> dict[str, list[float]]:
    timings: dict[str, list[float]] = {name: [] for name in cases}
    for run in cases.values():  # warm up imports, caches, the SQLite file
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


def ms(seconds: float) -> str:
    return f"{seconds * 1000:,.1f}"


def validate_document(raw: object) -> object:
    try:
        return validate(raw)
    except DocumentInvalidError as invalid:
        return invalid


def pydantic_only(raw: object) -> object:
    try:
        return MigrationDocument.model_validate(raw)
    except ValidationError as invalid:
        return invalid


def ordinary_cases(client: TestClient, body: bytes) -> dict[str, Callable[[], object]]:
    def post(headers: dict[str, str]) -> None:
        response = client.post("/migrations", content=body, headers=headers)
        assert response.status_code == 202, response.text

    return {
        "baseline: json.loads only": lambda: json.loads(body),
        "validate_document (parse + rules)": lambda: validate_document(json.loads(body)),
        "POST /migrations, accepted + stored": lambda: post(HEADERS),
        "POST /migrations, Idempotency-Key": lambda: post(
            {**HEADERS, "Idempotency-Key": uuid.uuid4().hex}),
        "POST /migrations, replayed key": lambda: post(
            {**HEADERS, "Idempotency-Key": "same-key"}),
    }


def print_ordinary(timings: dict[str, list[float]], title: str) -> None:
    table = Table(title=title)
    for column in ("case", "docs/s", "p50 ms", "p99 ms", "vs validate p50"):
        table.add_column(column, justify="left" if column == "case" else "right")
    reference = statistics.median(timings["validate_document (parse + rules)"])
    for name, values in timings.items():
        p50 = statistics.median(values)
        table.add_row(name, f"{len(values) / sum(values):,.0f}", f"{p50 * 1000:.2f}",
                      f"{percentile(values, 0.99) * 1000:.2f}", f"{p50 / reference:.2f}x")
    CONSOLE.print(table)


def worst_cases(client: TestClient, rounds: int) -> None:
    moves_valid, valid = fitting(worst_valid, vms=4500, moves=6500)
    moves_invalid, invalid = fitting(worst_invalid, vms=4500, moves=6500)
    shape = compact(wrong_shape())
    documents = {
        f"valid: 4,500 VMs, {moves_valid:,} moves": (valid, 202),
        f"invalid: 4,500 VMs, {moves_invalid:,} wrong moves": (invalid, 422),
        "invalid: 500,000 public IPs that are 0": (shape, 422),
    }
    table = Table(title=f"intake: worst-case documents, {rounds} rounds, in-process, SQLite "
                        "(goal: POST answered in <= 200 ms)")
    for column in ("document", "bytes", "errors", "json.loads", "pydantic only",
                   "validate_document", "POST p50", "POST max", "goal"):
        table.add_column(column, justify="left" if column == "document" else "right")
    for name, (body, status) in documents.items():
        raw = json.loads(body)

        def post(body: bytes = body, status: int = status) -> None:
            response = client.post("/migrations", content=body, headers=HEADERS)
            assert response.status_code == status, response.text[:300]

        found = validate_document(raw)
        errors = found.total if isinstance(found, DocumentInvalidError) else 0
        timings = measure({"json": lambda body=body: json.loads(body),
                           "pydantic": lambda raw=raw: pydantic_only(raw),
                           "validate": lambda raw=raw: validate_document(raw),
                           "post": post}, rounds, 1)
        p50 = {k: statistics.median(v) for k, v in timings.items()}
        worst = max(timings["post"])
        table.add_row(name, f"{len(body):,}", f"{errors:,}", ms(p50["json"]),
                      ms(p50["pydantic"]), ms(p50["validate"]), ms(p50["post"]), ms(worst),
                      "met" if worst <= 0.2 else "MISSED")
    CONSOLE.print(table)


def linearity(rounds: int) -> None:
    table = Table(title="intake: validate_document against size (median ms; linear means "
                        "ms per 100 KiB stays flat)")
    for column in ("document", "share of 1 MiB", "VMs", "moves", "KiB", "json.loads",
                   "validate_document", "ms per 100 KiB"):
        table.add_column(column, justify="left" if column == "document" else "right")
    for name, build in (("valid", worst_valid), ("invalid", worst_invalid)):
        moves, _ = fitting(build, vms=4500, moves=6500)
        for share in (0.25, 0.5, 1.0):
            vms, count = int(4500 * share), int(moves * share)
            body = compact(build(vms, count))
            timings = measure({"json": lambda body=body: json.loads(body),
                               "validate": lambda body=body: validate_document(
                                   json.loads(body))}, rounds, 1)
            took = statistics.median(timings["validate"])
            table.add_row(name, f"{share:g}", f"{vms:,}", f"{count:,}",
                          f"{len(body) / 1024:,.0f}", ms(statistics.median(timings["json"])),
                          ms(took), f"{took * 1000 / (len(body) / 102400):.1f}")
    CONSOLE.print(table)


def served(per_client: int) -> None:
    from intake_load import intake_server, pg_database, run_load

    good = json.dumps(ordinary(), indent=2).encode()
    _, bad = fitting(worst_invalid, vms=4500, moves=6500)
    table = Table(title="intake under load: uvicorn in its own process, PostgreSQL, httpx "
                        "clients on loopback (goal: good POSTs p99 <= 50 ms)")
    for column in ("case", "requests", "answers", "p50 ms", "p99 ms", "max ms"):
        table.add_column(column, justify="left" if column == "case" else "right")

    def row(name: str, found: object) -> None:
        values, statuses = found.values, found.statuses  # type: ignore[attr-defined]
        table.add_row(name, f"{len(values):,}",
                      ", ".join(f"{n} x {s}" for s, n in sorted(statuses.items())),
                      ms(statistics.median(values)), ms(percentile(values, 0.99)),
                      ms(max(values)))

    with pg_database() as database, intake_server(database, TOKEN) as url:
        run_load(url, HEADERS, good, clients=1, per_client=20)  # warm up
        row("baseline: 1 client, good POSTs",
            run_load(url, HEADERS, good, clients=1, per_client=per_client)["good"])
        row("4 clients, good POSTs",
            run_load(url, HEADERS, good, clients=4, per_client=per_client)["good"])
        found = run_load(url, HEADERS, good, clients=4, per_client=per_client, bad=bad,
                         bad_count=40)
        row("4 clients + 40 invalid 1 MiB at once: good POSTs", found["good"])
        row("  the same: GET /healthz", found["healthz"])
        row("  the same: the 40 invalid POSTs", found["bad"])
    CONSOLE.print(table)


def dead_letters(count: int) -> None:
    from intake_dlq import rabbit_vhost, replay_bench

    with rabbit_vhost() as url:
        found = replay_bench(url, count)
    table = Table(title=f"ferry dlq replay --all: {count} dead letters on RabbitMQ, every "
                        "replayed copy rejected again by a consumer")
    for column in ("dead at start", "replayed", "distinct ids", "copies consumed",
                   "most copies of one id", "dead after (each id)", "replay s"):
        table.add_column(column, justify="right")
    table.add_row(f"{found.dead}", f"{found.replayed}", f"{found.distinct}",
                  f"{sum(found.consumed.values())}",
                  f"{max(found.consumed.values(), default=0)}",
                  f"{sum(found.dead_after.values())} "
                  f"({max(found.dead_after.values(), default=0)})", f"{found.seconds:.2f}")
    CONSOLE.print(table)
    verdict = found.replayed == found.distinct == count and set(found.consumed.values()) == {1}
    CONSOLE.print("replayed exactly once each" if verdict else "NOT once each")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--per-round", type=int, default=20)
    parser.add_argument("--per-client", type=int, default=100)
    parser.add_argument("--dead-letters", type=int, default=300)
    parser.add_argument("--skip-load", action="store_true", help="in-process cases only")
    args = parser.parse_args()

    raw = ordinary()
    assert len(raw["vms"]) == 100
    body = json.dumps(raw, indent=2).encode()
    validate(json.loads(body))  # the generated document must be valid
    with tempfile.TemporaryDirectory(prefix="bench-intake-") as state:
        app = create_app(Settings(intake_database_url=f"sqlite:///{state}/intake.sqlite3",
                                  api_token=TOKEN))
        client = TestClient(app)
        timings = measure(ordinary_cases(client, body), args.rounds, args.per_round)
        print_ordinary(timings, f"intake: 100-VM document ({len(body) / 1024:.0f} KiB), "
                                f"{args.rounds} rounds x {args.per_round}, SQLite, in-process")
        worst_cases(client, args.rounds)
        client.close()
        app.state.engine.dispose()
    linearity(args.rounds)
    if not args.skip_load:
        served(args.per_client)
        dead_letters(args.dead_letters)


if __name__ == "__main__":
    main()
