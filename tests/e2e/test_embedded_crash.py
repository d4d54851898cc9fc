"""`ferry run all` on the embedded default, SIGKILLed at chosen moments and restarted with
the same command: every migration completes, nothing twice, nothing dead. The same first
kill on memory:// loses the message, so the test shows that the durable broker is the fix.

The kills land by observed state: a retry waiting in the broker file (the HTTP inventory
answers 503), a message held by its handler (the inventory holds the request), some
archives done and others not, a transfer under way (rsync --bwlimit keeps it going).
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from ferry.demo_site import build_site, drop_database
from ferry.dlq import list_dead
from shared.embedded_broker import embedded_url
from shared.topology import FIXED_QUEUES
from tests.e2e.checks import assert_once, check_destination, jobs_of
from tests.e2e.harness import pipeline_env
from tests.support.helpers import wait_for
from tests.support.processes import ChildProcess

COLLECTIONS = {"datacenters": "datacenters", "xen-hosts": "xen_hosts", "vms": "vms",
               "environments": "environments", "database-servers": "database_servers",
               "public-ips": "public_ips"}


class Inventory(ThreadingHTTPServer):
    """The site's inventory over HTTP (GET /api/<collection>/<name>) in a thread; `mode`:
    ok, down (503: the resolver retries later) or hold (the request waits for `release`)."""

    daemon_threads = True

    def __init__(self, path: Path) -> None:
        super().__init__(("127.0.0.1", 0), _Answer)
        self.data: dict[str, Any] = yaml.safe_load(path.read_text())
        self.mode = "ok"
        self.asked = 0
        self.held = threading.Event()
        self.release = threading.Event()
        self.url = f"http://127.0.0.1:{self.server_address[1]}/api"
        threading.Thread(target=self.serve_forever, daemon=True).start()


class _Answer(BaseHTTPRequestHandler):
    server: Inventory

    def do_GET(self) -> None:  # noqa: N802 - http.server's name
        self.server.asked += 1
        if self.server.mode == "down":
            return self._send(503, {"detail": "maintenance"})
        if self.server.mode == "hold":
            self.server.held.set()
            self.server.release.wait(60)
        _, _, collection, name = self.path.split("/", 3)
        found = self.server.data.get(COLLECTIONS.get(collection, ""), {}).get(name)
        self._send(200 if found is not None else 404, found or {"detail": "unknown"})

    def _send(self, status: int, body: object) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args: object) -> None:
        pass


class Embedded:
    """`ferry run all` as a child process, its API, its broker file."""

    def __init__(self, workdir: Path, inventory: Inventory, broker: str | None) -> None:
        self.env = pipeline_env(workdir, workdir / "inventory.yaml", "", {})
        self.env.pop("FERRY_BROKER_URL")  # the default: the embedded broker in the state dir
        if broker:
            self.env["FERRY_BROKER_URL"] = broker
        self.env.update(FERRY_INVENTORY=inventory.url, FERRY_TRANSFER_BWLIMIT_KBPS="2048")
        self.broker_file = workdir / "state" / "broker.sqlite3"
        self.url = f"http://{self.env['FERRY_INTAKE_BIND']}"
        self.process = ChildProcess.ferry("run", "all", "--datacenter", "ey04", env=self.env,
                                          ready="Ctrl-C stops")
        self.wait_for_api()

    def wait_for_api(self) -> None:
        def healthy() -> bool:
            try:
                return httpx.get(f"{self.url}/healthz", timeout=2).status_code == 200
            except httpx.HTTPError:
                return False

        self.process.wait_ready(healthy)

    def restart(self) -> None:
        self.process.log_path.write_text("")  # the "ready" line awaited is this start's
        self.process.restart()
        self.process.wait_ready("Ctrl-C stops")
        self.wait_for_api()

    def submit(self, document: bytes) -> str:
        response = httpx.post(f"{self.url}/migrations", content=document, timeout=30,
                              headers=self._auth({"Content-Type": "application/json"}))
        assert response.status_code == 202, response.text
        return str(response.json()["id"])

    def status(self, migration_id: str) -> dict[str, Any]:
        try:
            response = httpx.get(f"{self.url}/migrations/{migration_id}", timeout=5,
                                 headers=self._auth({}))
        except httpx.HTTPError:
            return {"status": "?", "jobs": []}
        return dict(response.json()) if response.status_code == 200 else {"status": "?",
                                                                           "jobs": []}

    def _auth(self, headers: dict[str, str]) -> dict[str, str]:
        return {**headers, "Authorization": f"Bearer {self.env['FERRY_API_TOKEN']}"}

    def resolver_messages(self, where: str) -> int:
        """Messages in the broker file's `resolver` queue matching `where`."""
        with sqlite3.connect(f"file:{self.broker_file}?mode=ro", uri=True) as db:
            (count,) = db.execute(f"SELECT count(*) FROM messages WHERE queue = 'resolver' "  # noqa: S608
                                  f"AND {where}", {"now": time.time()}).fetchone()
        return int(count)


def states(status: dict[str, Any]) -> list[str]:
    return [job["state"] for job in status.get("jobs", [])]


@pytest.fixture
def inventory_for() -> Iterator[list[Inventory]]:
    made: list[Inventory] = []
    yield made
    for server in made:
        server.release.set()
        server.shutdown()
        server.server_close()


def test_run_all_killed_at_every_stage_completes_every_migration(
    tmp_path: Path, inventory_for: list[Inventory],
) -> None:
    workdir = tmp_path / "site"
    site, why = build_site(workdir, "small", "127.0.0.1:3306")
    assert why is None and site.database, why
    inventory = Inventory(site.inventory_path)
    inventory_for.append(inventory)
    inventory.mode = "down"
    run = Embedded(workdir, inventory, broker=None)
    kills: list[str] = []
    try:
        migration_id = run.submit(site.document_path.read_bytes())
        # When it is killed while the resolver's retry waits its delay in the broker file
        wait_for(lambda: run.resolver_messages("owner IS NULL AND visible_at > :now"),
                 timeout=30, what="a retry waiting in the broker")
        run.process.kill()
        kills.append("retry waiting")
        assert run.resolver_messages("1") == 1
        # And, restarted, killed while its handler holds the message (the inventory hangs)
        inventory.mode = "hold"
        run.restart()
        wait_for(inventory.held.is_set, timeout=30, what="the resolver to ask the inventory")
        run.process.kill()
        kills.append("message held by its handler")
        assert run.resolver_messages("owner IS NOT NULL") == 1  # leased by the dead process
        inventory.mode = "ok"
        inventory.release.set()
        run.restart()
        # And killed with some archives done and others not, then with a transfer under way
        for stage, seen in (("archiving", lambda s: "archived" in s),
                            ("transferring", lambda s: "transferred" in s or
                             "transferring" in s)):
            wait_for(lambda seen=seen: seen(states(run.status(migration_id))),  # type: ignore[misc]
                     timeout=120, what=f"the migration {stage}")
            assert run.status(migration_id)["status"] != "completed", "killed too late"
            run.process.kill()
            kills.append(stage)
            run.restart()
        # Then it completes
        wait_for(lambda: run.status(migration_id)["status"] in {"completed", "failed"},
                 timeout=180, what="the migration to end")
        status = run.status(migration_id)
        assert status["status"] == "completed", (status, run.process.tail())
        run.process.stop()
        # And every archive arrived once, intact, and nothing is dead
        jobs = jobs_of(f"sqlite:///{workdir}/state/intake.sqlite3", migration_id)
        assert check_destination(workdir / "destination" / migration_id, jobs, site.database,
                                 tmp_path / "scratch") == 7
        assert_once({name: f"sqlite:///{workdir}/state/{name}.sqlite3"
                     for name in ("archiver", "transfer")}, 7)
        broker = embedded_url(workdir / "state")
        for queue in [*FIXED_QUEUES, "archiver.ey04", "transfer.ey04"]:
            assert list_dead(broker, queue) == [], queue
        assert len(kills) == 4, kills
    finally:
        run.process.stop()
        drop_database("127.0.0.1:3306", site.database)


def test_same_kill_on_the_memory_transport_loses_the_retry(
    tmp_path: Path, inventory_for: list[Inventory],
) -> None:
    workdir = tmp_path / "site"
    site, _ = build_site(workdir, "small", None)  # no database: it never gets that far
    inventory = Inventory(site.inventory_path)
    inventory_for.append(inventory)
    inventory.mode = "down"
    run = Embedded(workdir, inventory, broker="memory://")
    try:
        migration_id = run.submit(site.document_path.read_bytes())
        # When it is killed while the resolver's retry waits (a timer in the process)
        wait_for(lambda: "attempt 1 failed, retrying" in run.process.log(), timeout=30,
                 what="the resolver's first retry")
        run.process.kill()
        asked = inventory.asked
        inventory.mode = "ok"
        run.restart()
        # Then nothing ever comes back: within many times the retry delays, the resolver
        # does not ask again and the migration stays submitted
        deadline = time.monotonic() + 12
        while time.monotonic() < deadline:
            assert run.status(migration_id)["status"] == "submitted"
            time.sleep(0.5)
        assert inventory.asked == asked
    finally:
        run.process.stop()
