"""`ferry demo`: every service in this process on the embedded default, on the example.

It runs as far as the pipeline is built: services that have no handlers yet simply hold
their queues. Later steps (sample site, archives, transfers, statistics) extend it.
"""

from __future__ import annotations

import importlib
import tempfile
import time
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table
from sqlalchemy import select

from shared.settings import SERVICES, Settings

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
FINAL = {"failed", "completed"}


def run_demo(workdir: Path | None, console: Console, wait_seconds: float = 10.0) -> int:
    """Run the example migration; returns the exit status (0 when nothing failed)."""
    from shared.document import validate_document

    workdir = workdir or Path(tempfile.mkdtemp(prefix="ferry-demo-"))
    workdir.mkdir(parents=True, exist_ok=True)
    console.print(f"workdir: {workdir}")
    settings = Settings(broker_url="memory://", state_dir=workdir / "state",
                        outbox_poll_seconds=0.1)
    services: list[Any] = []
    for name in SERVICES:
        bootstrap = importlib.import_module(f"services.{name}.bootstrap").bootstrap
        services.append(bootstrap(settings, datacenter="ey04"))
    for service in services:
        service.start()
    try:
        body = (EXAMPLES / "migration.json").read_bytes()
        import json

        document = validate_document(json.loads(body))
        intake = services[0]
        submissions = importlib.import_module("services.intake.submissions")
        migration_id = submissions.accept_document(body, document, uow=intake.uow())
        console.print(f"submitted {migration_id} for customer {document.customer.id}")
        tables = importlib.import_module("services.intake.tables")
        deadline = time.monotonic() + wait_seconds
        events: list[Any] = []
        while time.monotonic() < deadline:
            with intake.engine.connect() as connection:
                events = connection.execute(
                    select(tables.migration_events.c.type, tables.migration_events.c.occurred_at)
                    .where(tables.migration_events.c.migration_id == migration_id)
                    .order_by(tables.migration_events.c.occurred_at)).all()
                status = connection.execute(
                    select(tables.migrations.c.status)
                    .where(tables.migrations.c.id == migration_id)).scalar_one()
            if status in FINAL or (events and time.monotonic() > deadline - wait_seconds + 2):
                break
            time.sleep(0.2)
        table = Table("event", "at", title=f"migration {migration_id}: {status}")
        for event in events:
            table.add_row(event.type, time.strftime("%H:%M:%S", time.gmtime(event.occurred_at)))
        console.print(table)
        if not events:
            console.print("[red]intake recorded no event: the backbone did not deliver[/]")
            return 1
        return 1 if status == "failed" else 0
    finally:
        for service in services:
            service.stop()
