"""`ferry demo`: a whole migration of sample data on the embedded default.

Every service runs in this process (the embedded broker, one SQLite file per service, hosts
reached by the local executor); the document goes in through intake's real HTTP endpoint;
the archives end up verified under DIR/destination/<migration>/.
"""

from __future__ import annotations

import secrets
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
from rich.console import Console
from rich.live import Live
from rich.table import Table

from ferry.builders import Options, build
from ferry.demo_site import DATACENTER, DemoSite, build_site, drop_database, mysql_address
from ferry.loopback_sshd import SshServer, free_port
from services.intake.stats import render_stats
from shared.digests import file_sha256
from shared.embedded_broker import embedded_url
from shared.runtime import Service
from shared.settings import SERVICES, Settings

FINAL = {"failed", "completed"}


def demo_settings(workdir: Path, site: DemoSite, mysql_url: str | None,
                  sshd: SshServer | None = None) -> Settings:
    db = mysql_address(mysql_url or "")
    over_ssh: dict[str, Any] = {}
    if sshd is not None:
        over_ssh = {"ssh_key_path": sshd.user_key_path,
                    "ssh_known_hosts_path": sshd.known_hosts_path, "ssh_user": sshd.user,
                    "destination": f"{sshd.user}@127.0.0.1:{sshd.port}:"
                                   f"{workdir / 'destination'}"}
    values: dict[str, Any] = dict(
        broker_url=embedded_url(workdir / "state"), state_dir=workdir / "state",
        staging_dir=workdir / "staging",
        destination=str(workdir / "destination"), inventory=str(site.inventory_path),
        intake_bind=f"127.0.0.1:{free_port()}", api_token=secrets.token_urlsafe(24),
        source_db_host=db.host, source_db_port=db.port, source_db_user=db.user, source_nice=False,
        outbox_poll_seconds=0.05, job_poll_seconds=0.2, lease_seconds=30,
        retry_delays=(0.5, 2.0, 5.0), transfer_backoff_seconds=1.0,
        archive_progress_seconds=1.0, transfer_progress_seconds=1.0,
        datacenter=DATACENTER, allow_local_hosts=True,  # the sample site's hosts are here
        shared_fs_mount_check=False,  # the sample site's shared /data is a plain directory
    )
    values.update(over_ssh)
    return Settings(**values)


def _bytes(value: float | None) -> str:
    if value is None:
        return "?"
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(value) < 1024 or unit == "TiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} TiB"


def progress_table(status: dict[str, Any]) -> Table:
    table = Table(title=f"migration {status['id']}: {status['status']}", expand=False)
    for column in ("kind", "source", "state", "done", "of", "MB/s"):
        table.add_column(column)
    for job in status.get("jobs", []):
        rate = job.get("mb_per_s")
        table.add_row(job.get("kind") or "?", job.get("label") or job["request_id"],
                      job["state"], _bytes(job.get("bytes_done")), _bytes(job.get("bytes_total")),
                      f"{rate:.1f}" if rate else "")
    return table


def allocations_table(allocations: dict[str, Any]) -> Table:
    table = Table("entity", "duid", "allocated", title="allocations")
    for duid, vm in sorted(allocations.get("vms", {}).items(), key=lambda kv: kv[1]["name"]):
        table.add_row("vm", duid, f"{vm['name']}  {vm.get('internal_ip', '')}")
    for duid, name in sorted(allocations.get("environments", {}).items()):
        table.add_row("environment", duid, str(name))
    for duid, ip in sorted(allocations.get("public_ips", {}).items()):
        table.add_row("public ip", duid, str(ip))
    vlan = allocations.get("vlan") or {}
    table.add_row("vlan", "", f"{vlan.get('id')}  {vlan.get('subnet')}")
    return table


def verify_destination(destination: Path, status: dict[str, Any], console: Console) -> bool:
    """Every job's archive is at the destination with its recorded sha256."""
    table = Table("file", "size", "sha256", "verified", title=f"archives in {destination}")
    ok = True
    seen: set[str] = set()
    for job in status["jobs"]:
        archive = job.get("archive") or {}
        name = archive.get("file_name") or Path(str(archive.get("path", "?"))).name
        if name in seen:
            continue
        seen.add(name)
        path = destination / name
        digest = file_sha256(path) if path.is_file() else None
        good = digest is not None and digest == archive.get("sha256")
        ok &= good
        table.add_row(name, _bytes(path.stat().st_size) if path.is_file() else "missing",
                      (digest or "")[:16], "[green]yes[/]" if good else "[red]NO[/]")
    console.print(table)
    return ok and bool(seen)


@dataclass
class Outcome:
    """How a migration run ended, as intake reports it."""

    migration_id: str | None
    status: dict[str, Any]
    stats: dict[str, Any]
    refused: str | None = None


def start_services(settings: Settings) -> list[Service]:
    """Every service of the pipeline in this process (one archiver, for DATACENTER)."""
    services = build(SERVICES, settings, Options(datacenters=(DATACENTER,)))
    for service in services:
        service.start()
    return services


def migrate(settings: Settings, document: bytes, console: Console, *,
            timeout: float = 1800.0, live: bool = True) -> Outcome:
    """POST the document to intake's API and follow it until it completes or fails."""
    headers = {"Authorization": f"Bearer {settings.api_token}"}
    with httpx.Client(base_url=f"http://{settings.intake_bind}", headers=headers,
                      timeout=30) as client:
        response = client.post("/migrations", content=document,
                               headers={"Content-Type": "application/json"})
        if response.status_code != 202:
            return Outcome(None, {}, {}, refused=f"{response.status_code} {response.text}")
        migration_id = str(response.json()["id"])
        console.print(f"submitted {migration_id} through http://{settings.intake_bind}"
                      "/migrations")
        status = _follow(client, migration_id, console, timeout, live)
        console.print()
        stats = client.get(f"/migrations/{migration_id}/stats").json()
    return Outcome(migration_id, status, stats)


def run_demo(workdir: Path | None, console: Console, *, size: str = "small",
             mysql_url: str | None = "127.0.0.1:3306", timeout: float = 1800.0,
             keep_source_database: bool = False, ssh: bool = False) -> int:
    """Build the sample site, run the migration, report. Returns the exit status: 0 only
    when every archive was transferred and verified. With `ssh`, every old host and the
    destination are reached through an sshd started on 127.0.0.1 for the run."""
    started = time.monotonic()
    workdir = (workdir or Path(tempfile.mkdtemp(prefix="ferry-demo-"))).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    console.print(f"workdir: {workdir}")
    sshd = SshServer() if ssh else None
    if sshd is not None:
        sshd.start()
        console.print(f"old site and destination reached over ssh: {sshd.user}@127.0.0.1:"
                      f"{sshd.port}")
    address = f"{sshd.user}@127.0.0.1:{sshd.port}" if sshd is not None else "local"
    try:
        with console.status("building the sample old site…"):
            site, why_no_db = build_site(workdir, size, mysql_url, address)
        if why_no_db:
            console.print(f"[yellow]database left out: {why_no_db}[/]")
        settings = demo_settings(workdir, site, mysql_url, sshd)
        return _run_site(workdir, site, settings, console, started, timeout, mysql_url,
                         keep_source_database)
    finally:
        if sshd is not None:
            sshd.stop()


def _run_site(workdir: Path, site: DemoSite, settings: Settings, console: Console,
              started: float, timeout: float, mysql_url: str | None,
              keep_source_database: bool) -> int:
    services = start_services(settings)
    try:
        outcome = migrate(settings, site.document_path.read_bytes(), console,
                          timeout=timeout)
        if outcome.refused or outcome.migration_id is None:
            console.print(f"[red]intake refused the document: {outcome.refused}[/]")
            return 1
        status = outcome.status
        if status.get("allocations"):
            console.print(allocations_table(status["allocations"]))
        console.print(render_stats(outcome.stats, wall_seconds=time.monotonic() - started))
        if status["status"] != "completed":
            console.print(f"[red]migration {status['status']}: {status.get('reason')}[/]")
            return 1
        verified = verify_destination(workdir / "destination" / outcome.migration_id, status,
                                      console)
        console.print(f"total wall time {time.monotonic() - started:.1f}s")
        return 0 if verified else 1
    finally:
        for service in reversed(services):
            service.stop()
        if site.database and mysql_url:
            if keep_source_database:
                console.print(f"source database {site.database} kept")
            else:
                drop_database(mysql_url, site.database)


def _follow(client: httpx.Client, migration_id: str, console: Console,
            timeout: float, show: bool = True) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    status: dict[str, Any] = {"id": migration_id, "status": "submitted", "jobs": []}
    with Live(progress_table(status), console=console, refresh_per_second=4,
              transient=not show) as live:
        while time.monotonic() < deadline:
            status = client.get(f"/migrations/{migration_id}").json()
            live.update(progress_table(status))
            if status["status"] in FINAL:
                return status
            time.sleep(0.1)
    status["status"] = "timed out"
    return status
