"""`ferry submit` and `ferry status`: the API from a terminal."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated, Any, NoReturn

import typer
from rich.console import Console
from rich.live import Live
from rich.table import Table

from services.intake.client import (
    IntakeClient,
    IntakeRequestError,
    IntakeUnreachableError,
    default_url,
)
from services.intake.display import render_status
from services.intake.handlers import FINAL
from services.intake.stats import render_stats
from shared.settings import Settings

console = Console()

UrlOption = Annotated[str | None, typer.Option(
    "--url", envvar="FERRY_INTAKE_URL",
    help="intake's API (default: http://FERRY_INTAKE_BIND)")]
TokenOption = Annotated[str | None, typer.Option(
    "--token", envvar="FERRY_API_TOKEN", help="bearer token (FERRY_API_TOKEN)")]


def submit(
    file: Annotated[Path, typer.Argument(exists=True, dir_okay=False, readable=True,
                                         help="a migration document (JSON)")],
    url: UrlOption = None,
    token: TokenOption = None,
    wait: Annotated[bool, typer.Option("--wait", help="follow the migration until it "
                                                      "completes or fails")] = False,
    idempotency_key: Annotated[str | None, typer.Option(
        "--idempotency-key", help="resubmitting with the same key gives the same migration"
    )] = None,
) -> None:
    """Submit a migration document exactly as the file holds it."""
    with _client(url, token) as client:
        accepted = _ask(lambda: client.submit(file.read_bytes(), idempotency_key))
        console.print(f"[green]accepted[/] {accepted['id']}  (status: {accepted['status_url']})")
        if wait:
            _follow(client, str(accepted["id"]))


def status(
    migration_id: Annotated[str, typer.Argument(help="the id `ferry submit` printed")],
    url: UrlOption = None,
    token: TokenOption = None,
    watch: Annotated[bool, typer.Option("--watch", help="keep showing progress until the "
                                                        "migration completes or fails")] = False,
    interval: Annotated[float, typer.Option(min=0.1, help="seconds between polls")] = 1.0,
) -> None:
    """Show a migration: status, allocations, and a progress bar per archive and transfer."""
    with _client(url, token) as client:
        if watch:
            _follow(client, migration_id, interval)
            return
        answer = _ask(lambda: client.status(migration_id))
        console.print(render_status(answer))
        if answer.get("status") == "failed":
            raise typer.Exit(1)


def stats(
    migration_id: Annotated[str | None, typer.Argument(help="one migration; all when "
                                                            "omitted")] = None,
    url: UrlOption = None,
    token: TokenOption = None,
) -> None:
    """The archive statistics table: counts by kind, largest archives, share under a size,
    transfer time and MB/s."""
    with _client(url, token) as client:
        answer = _ask(lambda: client.stats(migration_id))
    console.print(render_stats(answer))


def register(app: typer.Typer) -> None:
    app.command("submit")(submit)
    app.command("status")(status)
    app.command("stats")(stats)


def _client(url: str | None, token: str | None) -> IntakeClient:
    return IntakeClient(url or default_url(Settings()), token)


def _follow(client: IntakeClient, migration_id: str, interval: float = 1.0) -> None:
    """Redraw the status until the migration is final; exit 1 when it failed."""
    answer = _ask(lambda: client.status(migration_id))
    with Live(render_status(answer), console=console, auto_refresh=False) as live:
        while answer.get("status") not in FINAL:
            time.sleep(interval)
            try:
                answer = client.status(migration_id)
            except IntakeUnreachableError as error:  # keep watching through a restart
                console.print(f"[yellow]{error}; still watching[/]")
                continue
            except IntakeRequestError as error:
                _refused(error)
            live.update(render_status(answer), refresh=True)
    if answer.get("status") == "failed":
        raise typer.Exit(1)


def _ask(call: Any) -> dict[str, Any]:
    try:
        answer: dict[str, Any] = call()
    except IntakeUnreachableError as error:
        console.print(f"[red]{error}[/]")
        raise typer.Exit(1) from error
    except IntakeRequestError as error:
        _refused(error)
    return answer


def _refused(error: IntakeRequestError) -> NoReturn:
    console.print(f"[red]refused: {error}[/]")
    if error.problems:
        table = Table("path", "problem")
        for problem in error.problems:
            table.add_row(problem.get("path") or "(root)", problem.get("message", ""))
        console.print(table)
    raise typer.Exit(1)
