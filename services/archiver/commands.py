"""`ferry archives ...`: look at archives and the requests they answer."""

from __future__ import annotations

import time
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table
from sqlalchemy import func, select

from services.archiver import SCHEMA
from services.archiver.tables import archive_jobs, archive_requests
from shared.runtime import open_database
from shared.settings import Settings

console = Console()


def _size(value: int | None) -> str:
    return "" if value is None else f"{value / 1e6:,.1f} MB"


def _row(job: Any, requests: int) -> list[str]:
    took = (job.finished_at or time.time()) - job.started_at if job.started_at else None
    progress = (_size(job.raw_bytes) if job.raw_bytes is not None
                else _size(job.bytes_done) + " so far" if job.state == "running" else "")
    return [job.id, job.datacenter, job.kind, job.state, job.source_label, progress,
            _size(job.compressed_bytes), "" if took is None else f"{took:.0f}s",
            str(requests), str(job.attempts),
            "; ".join(job.warnings or []) or (job.error or "")[-200:]]


def register(app: typer.Typer) -> None:
    archives_app = typer.Typer(no_args_is_help=True, help="Archives of the old site's data.")
    app.add_typer(archives_app, name="archives")

    @archives_app.command("list")
    def list_archives(
        datacenter: Annotated[str | None, typer.Option("--datacenter", "-d",
                                                       help="one datacenter's only")] = None,
        state: Annotated[str | None, typer.Option(help="pending, running, done or failed")]
        = None,
    ) -> None:
        """Show archives: source, state, raw and compressed size, requests, warnings/errors."""
        engine = open_database(Settings(), SCHEMA).engine
        counts = (select(archive_requests.c.archive_id, func.count().label("n"))
                  .group_by(archive_requests.c.archive_id).subquery())
        query = (select(archive_jobs, func.coalesce(counts.c.n, 0).label("requests"))
                 .outerjoin(counts, counts.c.archive_id == archive_jobs.c.id)
                 .order_by(archive_jobs.c.created_at))
        if datacenter:
            query = query.where(archive_jobs.c.datacenter == datacenter)
        if state:
            query = query.where(archive_jobs.c.state == state)
        table = Table("archive", "dc", "kind", "state", "source", "raw", "compressed", "took",
                      "requests", "attempts", "warnings / error")
        with engine.connect() as connection:
            for job in connection.execute(query):
                table.add_row(*_row(job, job.requests))
        engine.dispose()
        console.print(table)

    @archives_app.command("show")
    def show_archive(archive_id: Annotated[str, typer.Argument(help="an archive id")]) -> None:
        """Everything recorded about one archive, and the requests it answered."""
        engine = open_database(Settings(), SCHEMA).engine
        with engine.connect() as connection:
            job = connection.execute(
                select(archive_jobs).where(archive_jobs.c.id == archive_id)).first()
            requests = list(connection.execute(select(archive_requests).where(
                archive_requests.c.archive_id == archive_id)))
        engine.dispose()
        if job is None:
            console.print(f"[red]no archive {archive_id}[/]")
            raise typer.Exit(1)
        for name in ("id", "datacenter", "kind", "state", "reuse_key", "source_label",
                     "source_host", "source_path", "file_path", "raw_bytes", "compressed_bytes",
                     "sha256", "started_at", "finished_at", "warnings", "replication_position",
                     "attempts", "error", "result"):
            console.print(f"{name:>21}: {getattr(job, name)}")
        for request in requests:
            console.print(f"request {request.request_id} (migration {request.migration_id}): "
                          f"{request.state}{', reused' if request.reused else ''}")
