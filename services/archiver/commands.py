"""`ferry archives ...`: look at archives and the requests they answer; drop one, make a
key's next request archive afresh, delete the staging files no one needs any more."""

from __future__ import annotations

import time
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table
from sqlalchemy import Engine, func, select, update

from services.archiver import SCHEMA
from services.archiver.staging import Freed, collect, remove_files
from services.archiver.tables import COMPLETED, archive_jobs, archive_keys, archive_requests
from shared.errors import PermanentError
from shared.jobs import PENDING, RUNNING
from shared.runtime import open_database
from shared.settings import Settings

console = Console()


class DropRefusedError(PermanentError):
    """An archive that is still being made, or still needed for a transfer."""


def drop_archive(engine: Engine, archive_id: str, *, force: bool = False) -> list[Freed]:
    """Delete the archive's staging files and mark it dropped, so no request reuses it (the
    key's next request archives afresh); what it freed. Raises DropRefusedError while it is
    pending or running, or while a request it answered waits for its transfer (unless
    `force`), KeyError for an archive that does not exist."""
    j, r, k = archive_jobs, archive_requests, archive_keys
    with engine.begin() as connection:
        known = connection.execute(select(j.c.datacenter, j.c.reuse_key)
                                   .where(j.c.id == archive_id)).first()
        if known is None:
            raise KeyError(archive_id)
        # the key's row first, then the job's: the order a request being recorded takes them
        connection.execute(select(k.c.archive_id).where(
            k.c.datacenter == known.datacenter, k.c.reuse_key == known.reuse_key)
            .with_for_update()).first()
        job = connection.execute(select(j).where(j.c.id == archive_id).with_for_update()).one()
        if job.state in (PENDING, RUNNING):
            raise DropRefusedError(f"archive {archive_id} ({job.source_label}) is {job.state}: "
                                   f"nothing dropped; drop it once it finished")
        untransferred = list(connection.execute(select(r.c.request_id, r.c.migration_id).where(
            r.c.archive_id == archive_id, r.c.state == COMPLETED, r.c.transferred_at.is_(None))))
        if untransferred and not force:
            names = ", ".join(f"{q.request_id} (migration {q.migration_id})"
                              for q in untransferred)
            raise DropRefusedError(f"archive {archive_id} ({job.source_label}): request(s) "
                                   f"{names} still wait for its transfer: nothing dropped "
                                   f"(--force drops it anyway)")
        freed = remove_files(job) if job.file_path else []
        now = time.time()
        connection.execute(update(j).where(j.c.id == archive_id).values(
            dropped_at=job.dropped_at or now, removed_at=job.removed_at or now, updated_at=now))
        connection.execute(update(k).where(k.c.archive_id == archive_id)
                           .values(archive_id=None, updated_at=now))
    return freed


def refresh_key(engine: Engine, reuse_key: str, datacenter: str | None = None) -> list[Any]:
    """Make the key's next request archive afresh (in every datacenter, or in one): its
    current archive is answered no new request. Returns the keys' rows as they were.
    Raises KeyError when no datacenter has that key."""
    k = archive_keys
    where = k.c.reuse_key == reuse_key
    if datacenter is not None:
        where = where & (k.c.datacenter == datacenter)
    with engine.begin() as connection:
        rows = list(connection.execute(select(k).where(where).with_for_update()))
        if not rows:
            raise KeyError(reuse_key)
        connection.execute(update(k).where(where).values(archive_id=None,
                                                         updated_at=time.time()))
    return rows


def _size(value: int | None) -> str:
    return "" if value is None else f"{value / 1e6:,.1f} MB"


def _row(job: Any, requests: int) -> list[str]:
    took = (job.finished_at or time.time()) - job.started_at if job.started_at else None
    progress = (_size(job.raw_bytes) if job.raw_bytes is not None
                else _size(job.bytes_done) + " so far" if job.state == "running" else "")
    state = (f"{job.state}, dropped" if job.dropped_at is not None
             else f"{job.state}, freed" if job.removed_at is not None else job.state)
    return [job.id, job.datacenter, job.kind, state, job.source_label, progress,
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
                     "sha256", "started_at", "finished_at", "warnings", "excluded",
                     "replication_position", "dropped_at", "removed_at", "attempts", "error",
                     "result"):
            console.print(f"{name:>21}: {getattr(job, name)}")
        for request in requests:
            transferred = ", transferred" if request.transferred_at is not None else ""
            console.print(f"request {request.request_id} (migration {request.migration_id}): "
                          f"{request.state}{', reused' if request.reused else ''}{transferred}")

    @archives_app.command("drop")
    def drop(
        archive_id: Annotated[str, typer.Argument(help="an archive id")],
        force: Annotated[bool, typer.Option(
            "--force", help="drop it even though a request still waits for its transfer")]
        = False,
    ) -> None:
        """Delete an archive's staging file and mark it dropped: nothing reuses it."""
        engine = open_database(Settings(), SCHEMA).engine
        try:
            freed = drop_archive(engine, archive_id, force=force)
        except KeyError:
            console.print(f"[red]no archive {archive_id}[/]")
            raise typer.Exit(1) from None
        except DropRefusedError as error:
            console.print(f"[red]{error}[/]")
            raise typer.Exit(1) from None
        finally:
            engine.dispose()
        _print_freed(freed)
        console.print(f"archive {archive_id} dropped")

    @archives_app.command("refresh")
    def refresh(
        reuse_key: Annotated[str, typer.Argument(help="a reuse key (ferry archives show)")],
        datacenter: Annotated[str | None, typer.Option("--datacenter", "-d",
                                                       help="one datacenter's only")] = None,
    ) -> None:
        """Make the key's next request archive afresh instead of reusing its archive."""
        engine = open_database(Settings(), SCHEMA).engine
        try:
            rows = refresh_key(engine, reuse_key, datacenter)
        except KeyError:
            where = f" in datacenter {datacenter}" if datacenter else ""
            console.print(f"[red]no reuse key {reuse_key!r}{where}[/]")
            raise typer.Exit(1) from None
        finally:
            engine.dispose()
        for row in rows:
            was = f"archive {row.archive_id}" if row.archive_id else "no current archive"
            console.print(f"{row.datacenter}: {reuse_key} ({was}): the next request archives "
                          f"afresh")

    @archives_app.command("gc")
    def gc(
        datacenter: Annotated[str | None, typer.Option("--datacenter", "-d",
                                                       help="one datacenter's only")] = None,
    ) -> None:
        """Delete the staging files of archives transferred, verified and past their reuse
        age (what the archiver does every FERRY_STAGING_GC_SECONDS)."""
        settings = Settings()
        engine = open_database(settings, SCHEMA).engine
        try:
            freed = collect(engine, settings, datacenter=datacenter)
        finally:
            engine.dispose()
        _print_freed(freed)


def _print_freed(freed: list[Freed]) -> None:
    for item in freed:
        console.print(f"freed {item.path} ({item.bytes} bytes, archive {item.archive_id})",
                      soft_wrap=True)
    total = sum(item.bytes for item in freed)
    console.print(f"{len(freed)} file(s), {total} bytes freed")
