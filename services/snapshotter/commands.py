"""`ferry snapshots list` and `ferry snapshots release ID`: the snapshotter's tables, for ops.

Release only marks the job; the running snapshotter's workers tear it down and emit
snapshot.released (as after an archive), so the host is touched by one owner only.
"""

from __future__ import annotations

from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table
from sqlalchemy import Engine, or_, select

from services.snapshotter import SCHEMA
from services.snapshotter.handlers import mark_for_release
from services.snapshotter.tables import ACTIVE, snapshot_jobs
from shared.jobs import DONE, FAILED
from shared.settings import Settings

console = Console()


def _engine(settings: Settings) -> Engine:
    from shared.runtime import open_database

    return open_database(settings, SCHEMA).engine


def _mib(value: int | None) -> str:
    return "" if value is None else f"{value / (1 << 20):.1f}"


def list_snapshots(settings: Settings, show_all: bool = False) -> Table:
    """A table of snapshot jobs: every one with --all, else those not released or failed."""
    t = snapshot_jobs
    query = select(t).order_by(t.c.created_at)
    if not show_all:
        query = query.where(t.c.state.not_in((DONE, FAILED)))
    table = Table("job", "request", "host", "driver", "phase", "snapshot", "port",
                  "COW used/size MiB", "note")
    engine = _engine(settings)
    try:
        with engine.connect() as connection:
            for job in connection.execute(query):
                table.add_row(job.id, job.request_id, job.xen_host, job.driver, job.phase,
                              job.snapshot_id or "", str(job.export_port or ""),
                              f"{_mib(job.bytes_done)}/{_mib(job.cow_bytes)}",
                              (job.error or job.release_reason or "")[-120:])
    finally:
        engine.dispose()
    return table


def release_snapshot(settings: Settings, ident: str) -> str:
    """Mark an active snapshot (by job, request or snapshot id) for release; what happened.

    Raises LookupError when no job matches, ValueError when it is not active.
    """
    t = snapshot_jobs
    engine = _engine(settings)
    try:
        with engine.begin() as connection:
            job = connection.execute(select(t).where(or_(
                t.c.id == ident, t.c.request_id == ident, t.c.snapshot_id == ident))).first()
            if job is None:
                raise LookupError(f"no snapshot job {ident!r} (job, request or snapshot id)")
            if job.state != ACTIVE or not mark_for_release(
                    connection, job.id, job.snapshot_id, "released by an operator"):
                raise ValueError(f"snapshot job {job.id} is {job.phase}, not active: "
                                 "nothing to release")
    finally:
        engine.dispose()
    return f"{job.snapshot_id} on {job.xen_host} marked for release; the snapshotter tears it down"


def register(app: typer.Typer) -> None:
    snapshots = typer.Typer(no_args_is_help=True, help="Snapshots on the Xen hosts.")
    app.add_typer(snapshots, name="snapshots")

    @snapshots.command("list")
    def list_command(
        show_all: Annotated[bool, typer.Option("--all", help="released and failed too")] = False,
    ) -> None:
        """Snapshot jobs: phase, host, export port, COW fill."""
        console.print(list_snapshots(Settings(), show_all))

    @snapshots.command("release")
    def release_command(
        ident: Annotated[str, typer.Argument(help="job id, request id or snapshot id")],
    ) -> None:
        """Release an active snapshot now (stop its export, remove it, restore the origin)."""
        try:
            console.print(release_snapshot(Settings(), ident))
        except (LookupError, ValueError) as error:
            console.print(f"[red]{error}[/]")
            raise typer.Exit(1) from error
