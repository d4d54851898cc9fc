"""How `ferry status` shows a migration: a header, its allocations, a bar per job."""

from __future__ import annotations

from typing import Any

from rich.console import Group, RenderableType
from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn
from rich.table import Table
from rich.text import Text

_STATUS_STYLE = {"completed": "green", "failed": "red", "archiving": "cyan"}
_STATE_STYLE = {"transferred": "green", "failed": "red", "retrying": "yellow",
                "archived": "cyan"}


def render_status(status: dict[str, Any]) -> RenderableType:
    """The whole view of one GET /migrations/{id} answer."""
    parts: list[RenderableType] = [_header(status)]
    allocations = status.get("allocations")
    if allocations:
        parts.append(_allocations(allocations))
    jobs = status.get("jobs") or []
    if jobs:
        parts.append(_jobs(jobs))
        parts.extend(_errors(jobs))
    else:
        parts.append(Text("no jobs yet: the resolver has not planned this migration",
                          style="dim"))
    return Group(*parts)


def _header(status: dict[str, Any]) -> Text:
    state = str(status.get("status", "?"))
    text = Text.assemble(("migration ", "bold"), (str(status.get("id")), "bold"),
                         f"  customer {status.get('customer_id')}  ",
                         (state, _STATUS_STYLE.get(state, "")))
    if status.get("reason"):
        text.append(f"\nreason: {status['reason']}", style="red")
    return text


def _allocations(allocations: dict[str, Any]) -> Table:
    table = Table("allocated", "", title=None, show_header=False, box=None, padding=(0, 1))
    for key, value in allocations.items():
        if isinstance(value, dict):
            shown = ", ".join(f"{k} → {v}" for k, v in value.items())
        elif isinstance(value, list):
            shown = ", ".join(str(item) for item in value)
        else:
            shown = str(value)
        table.add_row(Text(str(key), style="bold"), Text(shown[:400]))
    return table


def _jobs(jobs: list[dict[str, Any]]) -> Progress:
    # A static Progress: its bars show the byte counts the events reported, not local time.
    progress = Progress(
        TextColumn("{task.fields[kind]:<14} {task.description}"),
        BarColumn(bar_width=30),
        DownloadColumn(),
        TextColumn("{task.fields[stage]:<8} [{task.fields[style]}]{task.fields[state]}[/]"
                   " {task.fields[speed]}"),
        auto_refresh=False,
    )
    for job in jobs:
        total = job.get("bytes_total")
        done = job.get("bytes_done") or 0
        if job.get("state") == "transferred" and not total:
            total = done or 1
        state = str(job.get("state", "?"))
        speed = f"{job['mb_per_s']:.1f} MB/s" if job.get("mb_per_s") else ""
        progress.add_task(
            str(job.get("label") or job.get("request_id")), total=total, completed=done,
            kind=str(job.get("kind") or "?"), stage=str(job.get("stage") or ""),
            state=state, style=_STATE_STYLE.get(state, "white"), speed=speed)
    return progress


def _errors(jobs: list[dict[str, Any]]) -> list[RenderableType]:
    shown: list[RenderableType] = []
    for job in jobs:
        for error in (job.get("errors") or [])[-1:]:
            label = job.get("label") or job.get("request_id")
            shown.append(Text(f"{label}: {error.get('stage')} error: {error.get('reason')}",
                              style="red"))
    return shown
