"""`ferry transfer ...`: look at transfers, and send a migration's archives again.

`verify` puts a migration's finished transfers back in the queue: rsync finds an intact
copy complete and sends nothing, and the sha256 check repairs a damaged one.
"""

from __future__ import annotations

import time
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table
from sqlalchemy import Engine, select, update

from services.transfer import SCHEMA
from services.transfer.ledger import FAILED, TRANSFERRING
from services.transfer.tables import transfer_requests, transfers
from shared.jobs import DONE, rearm_values
from shared.jobs import FAILED as JOB_FAILED
from shared.runtime import open_database
from shared.settings import Settings

console = Console()


def requeue_transfers(engine: Engine, migration_id: str) -> int:
    """Put the migration's done and failed transfers back to pending with a fresh attempt
    budget (their attempt history stays); returns how many."""
    t, r, now = transfers, transfer_requests, time.time()
    with engine.begin() as connection:
        ids = list(connection.execute(select(t.c.id).where(
            t.c.migration_id == migration_id, t.c.state.in_((DONE, JOB_FAILED)))).scalars())
        if not ids:
            return 0
        connection.execute(update(t).where(t.c.id.in_(ids)).values(
            **rearm_values(verify_failures=0, error=None)))
        connection.execute(update(r).where(r.c.job_id.in_(ids), r.c.state == FAILED)
                           .values(state=TRANSFERRING, reason=None, updated_at=now))
    return len(ids)


def register(app: typer.Typer) -> None:
    transfer_app = typer.Typer(no_args_is_help=True, help="Transfers to the new site.")
    app.add_typer(transfer_app, name="transfer")

    @transfer_app.command("list")
    def list_transfers(
        migration: Annotated[str | None, typer.Argument(help="one migration's only")] = None,
    ) -> None:
        """Show transfers: state, progress, attempts, last error."""
        engine = open_database(Settings(), SCHEMA).engine
        query = select(transfers).order_by(transfers.c.created_at)
        if migration:
            query = query.where(transfers.c.migration_id == migration)
        table = Table("migration", "archive", "state", "done/total", "MB/s", "attempts", "error")
        with engine.connect() as connection:
            for job in connection.execute(query):
                table.add_row(job.migration_id, job.archive_id, job.state,
                              f"{job.bytes_done}/{job.bytes_total}", str(job.mb_per_s or ""),
                              str(job.attempts), (job.error or "")[-200:])
        console.print(table)

    @transfer_app.command("verify")
    def verify(migration: Annotated[str, typer.Argument(help="the migration id")]) -> None:
        """Check the migration's archives at the destination again (sha256), repairing any
        damaged copy; also retries its failed transfers."""
        count = requeue_transfers(open_database(Settings(), SCHEMA).engine, migration)
        if count == 0:
            console.print(f"[red]no finished transfers for migration {migration}[/]")
            raise typer.Exit(1)
        console.print(f"{count} transfer(s) of {migration} queued again")
