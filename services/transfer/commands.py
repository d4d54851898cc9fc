"""`ferry transfer ...`: look at transfers, and send a migration's archives again.

`verify` puts a migration's finished transfers back in the queue: rsync finds an intact
copy complete and sends nothing, and the sha256 check repairs a damaged one.

`ferry archives verify [--deep]` (registered under `archives` by ferry.cli) only reads:
each archive's and manifest's sha256 at the destination, and with --deep every member
against the manifest (services.transfer.verification).
"""

from __future__ import annotations

import time
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table
from sqlalchemy import Engine, select, update

from services.transfer import SCHEMA
from services.transfer.jobs import destination_pool
from services.transfer.ledger import FAILED, TRANSFERRING
from services.transfer.tables import transfer_requests, transfers
from services.transfer.verification import ArchiveCheck, verify_archive
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


def _print_check(check: ArchiveCheck) -> None:
    """One archive's findings; member names are the customer's: never read as markup."""
    status = "[green]ok[/]" if check.ok else "[red]MISMATCH[/]"
    console.print(f"archive {check.archive_id}: {status}  {escape(check.path)}")
    for problem in check.problems:
        console.print(f"  [red]{escape(problem)}[/]")
    for note in check.notes:
        console.print(f"  [yellow]{escape(note)}[/]")
    result = check.comparison
    if result is None:
        return
    table = Table("members checked", "in manifest", "missing", "extra", "different")
    table.add_row(str(result.checked), str(check.members), str(len(result.missing)),
                  str(len(result.extra)), str(len(result.different)))
    console.print(table)
    for path in result.missing:
        console.print(f"  [red]missing:[/] {escape(path)}")
    for path in result.extra:
        console.print(f"  [red]extra:[/] {escape(path)}")
    for path, fields in result.different:
        console.print(f"  [red]different {', '.join(fields)}:[/] {escape(path)}")


def register_archives(archives_app: typer.Typer) -> None:
    """`ferry archives verify`: the transfer service knows where archives arrived."""

    @archives_app.command("verify")
    def verify_archives(
        migration: Annotated[str, typer.Argument(help="the migration id")],
        deep: Annotated[bool, typer.Option(
            "--deep", help="also read every archive at the destination and compare each "
                           "member with its manifest")] = False,
    ) -> None:
        """Check the migration's transferred archives where they arrived (sha256 of each
        archive and manifest); exit 1 on any mismatch. Nothing is changed or re-sent."""
        settings = Settings()
        engine = open_database(settings, SCHEMA).engine
        with engine.connect() as connection:
            jobs = list(connection.execute(select(transfers).where(
                transfers.c.migration_id == migration, transfers.c.state == DONE)
                .order_by(transfers.c.archive_id)))
        engine.dispose()
        if not jobs:
            console.print(f"[red]no transferred archives for migration {migration}[/]")
            raise typer.Exit(1)
        hosts = destination_pool(settings)
        try:
            checks = [verify_archive(job, hosts.get(job.destination), settings, deep)
                      for job in jobs]
        finally:
            hosts.close_all()
        for check in checks:
            _print_check(check)
        bad = [check.archive_id for check in checks if not check.ok]
        if bad:
            console.print(f"[red]{len(bad)} of {len(checks)} archive(s) of {migration} do not "
                          f"match: {', '.join(bad)}[/]")
            raise typer.Exit(1)
        console.print(f"{len(checks)} archive(s) of {migration} match"
                      f"{' their manifests' if deep else ''}")
