"""The `ferry` command: run services, manage dead letters, upgrade databases, show the
event map, and run the demo."""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from ferry.broker import broker_app
from ferry.builders import SCHEMAS, Options, build
from ferry.dlq import list_dead, replay_dead
from services.archiver import commands as archiver_commands
from services.intake import commands as intake_commands
from services.resolver import commands as resolver_commands
from services.snapshotter import commands as snapshotter_commands
from services.transfer import commands as transfer_commands
from shared import logs
from shared.bus import declare_standing
from shared.runner import run_until_stopped
from shared.settings import SERVICES, Settings
from shared.topology import DATACENTER_SERVICES, FIXED_QUEUES, queue_name

app = typer.Typer(no_args_is_help=True, add_completion=False,
                  help="Ferry: move customers from the old site to the new one.")
dlq_app = typer.Typer(no_args_is_help=True, help="Dead letters: list and replay.")
db_app = typer.Typer(no_args_is_help=True, help="Service databases.")
app.add_typer(dlq_app, name="dlq")
app.add_typer(db_app, name="db")
app.add_typer(broker_app, name="broker")
console = Console()
# Each service adds its own commands (`ferry archives ...`, `ferry inventory ...`).
for commands in (intake_commands, resolver_commands, snapshotter_commands, archiver_commands,
                 transfer_commands):
    commands.register(app)
# `ferry archives verify` belongs to the transfer service, which knows the destinations
transfer_commands.register_archives(next(
    group.typer_instance for group in app.registered_groups
    if group.name == "archives" and group.typer_instance is not None))


def _check_service(service: str, allow_all: bool = False) -> None:
    known = (*SERVICES, "all") if allow_all else SERVICES
    if service not in known:
        raise typer.BadParameter(f"unknown service {service!r}; choose one of {', '.join(known)}")


@app.command()
def run(
    service: Annotated[str, typer.Argument(help="intake, resolver, snapshotter, archiver, "
                                                "transfer, or all (one process)")],
    datacenter: Annotated[list[str] | None, typer.Option(
        "--datacenter", "-d", help="archiver, transfer: the datacenter whose queue to "
                                   "consume and staging to read (transfer and `all`: "
                                   "repeatable, one of each per datacenter)")] = None,
    concurrency: Annotated[int | None, typer.Option(min=1, help="job worker threads")] = None,
    insecure_no_auth: Annotated[bool, typer.Option(
        "--insecure-no-auth", help="intake: serve the API without FERRY_API_TOKEN (loopback "
                                   "addresses only)")] = False,
) -> None:
    """Run one service (or all of them in this process) until interrupted."""
    _check_service(service, allow_all=True)
    settings = Settings()
    if insecure_no_auth:
        settings = settings.model_copy(update={"insecure_no_auth": True})
    datacenters = list(datacenter or ([settings.datacenter] if settings.datacenter else []))
    if service == "archiver" and len(datacenters) != 1:
        raise typer.BadParameter("the archiver serves one datacenter: give --datacenter DC "
                                 "(or FERRY_DATACENTER)")
    if service == "transfer" and not datacenters:
        raise typer.BadParameter("transfer runs next to a datacenter's archivers and reads its "
                                 "staging only: give --datacenter DC (or FERRY_DATACENTER)")
    # before the services are built (their warnings too), after the refusals above: a
    # refused command leaves this process's logging as it was
    logs.configure(settings.log_format)
    names = list(SERVICES) if service == "all" else [service]
    # One process serving everything must not leave intake's API open: intake makes up a
    # token and prints it when FERRY_API_TOKEN is not set.
    services = build(names, settings, Options(datacenters=tuple(datacenters),
                                              concurrency=concurrency,
                                              generate_token=service == "all"))
    run_until_stopped(services, settings)


@dlq_app.command("list")
def dlq_list(
    queue: Annotated[str | None, typer.Argument(help="a work queue (or its .dead queue); "
                                                     "all fixed queues when omitted")] = None,
    datacenter: Annotated[list[str] | None, typer.Option(
        "--datacenter", "-d", help="also list archiver.<DC> and transfer.<DC>")] = None,
) -> None:
    """Show dead letters (id, type, migration, error, attempts). Nothing is consumed."""
    settings = Settings()
    queues = [queue] if queue else [*FIXED_QUEUES, *(queue_name(service, dc)
                                                     for dc in datacenter or []
                                                     for service in DATACENTER_SERVICES)]
    table = Table("queue", "id", "type", "migration", "reason", "attempts", "error")
    count = 0
    for name in queues:
        for letter in list_dead(settings.broker_url, name):
            count += 1
            table.add_row(letter.queue, letter.id, letter.type, letter.migration_id,
                          letter.reason, str(letter.attempts), letter.error[-300:])
    console.print(table)
    console.print(f"{count} dead letter(s)")


@dlq_app.command("replay")
def dlq_replay(
    queue: Annotated[str, typer.Argument(help="the work queue whose dead letters to replay")],
    message_id: Annotated[list[str] | None, typer.Option("--id", help="an envelope id "
                                                          "(repeatable)")] = None,
    replay_all: Annotated[bool, typer.Option("--all", help="replay every dead letter")] = False,
) -> None:
    """Put dead letters back on their work queue (their attempt count starts again)."""
    if bool(message_id) == replay_all:
        raise typer.BadParameter("give either --id ID (one or more) or --all")
    settings = Settings()
    wanted = None if replay_all else set(message_id or [])
    replayed = replay_dead(settings.broker_url, queue, wanted)
    for letter in replayed:
        console.print(f"replayed {letter.id} ({letter.type}) onto {letter.queue}")
    missing = (wanted or set()) - {letter.id for letter in replayed}
    if missing:
        console.print(f"[red]not found in {queue}.dead:[/] {', '.join(sorted(missing))}")
        raise typer.Exit(1)
    console.print(f"{len(replayed)} replayed")


@db_app.command("upgrade")
def db_upgrade(
    service: Annotated[str | None, typer.Argument(help="one service; all when omitted")] = None,
) -> None:
    """Bring each service's database to its newest schema."""
    from shared.db import make_engine, upgrade

    settings = Settings()
    for name in [service] if service else SERVICES:
        _check_service(name)
        engine = make_engine(settings.database_url(name))
        upgrade(engine, SCHEMAS[name])
        engine.dispose()
        console.print(f"{name}: up to date")


@app.command()
def topology(
    markdown: Annotated[bool, typer.Option(help="print docs/events.md instead of tables")]
    = False,
    declare: Annotated[bool, typer.Option(
        "--declare", help="declare every service's queues on FERRY_BROKER_URL (and "
                          "archiver.<DC>, transfer.<DC> for each --datacenter)")] = False,
    datacenter: Annotated[list[str] | None, typer.Option(
        "--datacenter", "-d", help="with --declare: a datacenter whose archiver and transfer "
                                   "queues to declare (repeatable)")] = None,
) -> None:
    """Show the event map, read from the code: who emits each event, who consumes it, and
    the queues each service declares. With --declare, declare them on the broker."""
    from ferry.event_map import render_markdown, render_tables

    settings = Settings()
    if declare:
        count = declare_standing(settings.broker_url, settings, datacenter or ())
        console.print(f"declared {count} work queue(s) with their bindings and dead-letter "
                      f"queues on {settings.broker_url.split('@')[-1]}")
        return
    delays = tuple(settings.retry_delays)
    if markdown:
        sys.stdout.write(render_markdown(settings.delivery_limit, delays))
    else:
        console.print(render_tables(settings.delivery_limit, delays))


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `ferry` console script; returns the exit status."""
    try:
        # Without standalone mode, click returns a command's typer.Exit code instead of exiting.
        code = app(args=argv if argv is not None else sys.argv[1:], standalone_mode=False)
    except typer.Exit as done:
        return int(done.exit_code)
    except typer.Abort:
        return 130
    except Exception as error:  # noqa: BLE001 - one clear line for ops, not a traceback
        from click.exceptions import ClickException

        if isinstance(error, ClickException):
            error.show()
            return int(error.exit_code)
        console.print(f"[red]ferry: {type(error).__name__}: {error}[/]")
        return 1
    return code if isinstance(code, int) else 0


@app.command()
def demo(
    workdir: Annotated[Path | None, typer.Option(help="where the sample site, state, staging "
                                                      "and destination go (default: a new "
                                                      "temp dir)")] = None,
    size: Annotated[str, typer.Option(help="small (~150 MB, 7 archives) or medium "
                                           "(>2 GiB, 23 archives)")] = "small",
    keep_source_database: Annotated[bool, typer.Option(
        help="leave the sample MariaDB database in place (to compare a restore with it)")
    ] = False,
    ssh: Annotated[bool, typer.Option(
        "--ssh", help="reach the old hosts and the destination through an sshd started on "
                      "127.0.0.1 (needs openssh-server)")] = False,
) -> None:
    """Run a whole migration of sample data on the embedded default (one process, the
    embedded broker and SQLite, local executor); exit 0 only when every archive arrived
    verified."""
    import os

    from ferry.demo import run_demo

    if size not in {"small", "medium"}:
        raise typer.BadParameter("--size is small or medium")
    logging.basicConfig(level=logging.WARNING)
    logging.getLogger("kombu.connection").setLevel(logging.ERROR)
    mysql_url = os.environ.get("FERRY_DEMO_MYSQL_URL", "127.0.0.1:3306")
    raise typer.Exit(run_demo(workdir, console, size=size, mysql_url=mysql_url,
                              keep_source_database=keep_source_database, ssh=ssh))
