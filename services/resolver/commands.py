"""`ferry inventory check`: is the inventory usable, and what would a migration archive?"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from services.resolver.inventory import FileInventory, open_inventory, reference_problems
from services.resolver.planning import plan_archives
from shared.document import validate_document
from shared.errors import FerryError
from shared.settings import Settings

inventory_app = typer.Typer(no_args_is_help=True, help="The old site's inventory.")
console = Console()


@inventory_app.command("check")
def check(
    source: Annotated[str | None, typer.Argument(
        help="a YAML/JSON file or an http(s) URL (default: FERRY_INVENTORY)")] = None,
    document: Annotated[Path | None, typer.Option(
        "--document", help="a migration document: plan its archives (nothing is allocated "
                           "or sent)")] = None,
) -> None:
    """Validate an inventory; with --document, show the jobs the resolver would plan."""
    settings = Settings()
    if source:
        settings = settings.model_copy(update={"inventory": source})
    try:
        inventory = open_inventory(settings)
        problems = (reference_problems(inventory.document())
                    if isinstance(inventory, FileInventory) else [])
        for problem in problems:
            console.print(f"[red]{problem}[/]")
        if document is not None:
            parsed = validate_document(json.loads(document.read_text()))
            plan = plan_archives(parsed, inventory, "dry-run")
            table = Table("kind", "dc", "reuse key", "source host",
                          title=f"{len(plan.jobs)} archive jobs for {document}")
            for job in plan.jobs:
                table.add_row(job.kind, job.datacenter, job.reuse_key, job.source.host)
            console.print(table)
        inventory.close()
    except (FerryError, OSError, ValueError) as error:
        console.print(f"[red]{error}[/]")
        raise typer.Exit(1) from None
    if problems:
        raise typer.Exit(1)
    console.print(f"[green]inventory {settings.inventory} is usable[/]")


def register(app: typer.Typer) -> None:
    app.add_typer(inventory_app, name="inventory")
