"""Every service as its own `ferry run …` process on RabbitMQ + PostgreSQL, for end-to-end
tests: started, SIGKILLed and restarted by PID, stopped with SIGTERM."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from ferry.loopback_sshd import free_port
from tests.support.processes import ROOT, ChildProcess, stop_all

SERVICES = ("intake", "resolver", "snapshotter", "transfer")
READY = "Ctrl-C stops"  # what `ferry run` prints once its services started
PER_DATACENTER = {"archiver", "transfer"}  # run with --datacenter (and `all`, for its own)


@dataclass
class Pipeline:
    """The five services as processes: `processes` maps a name (archiver-1…) to its child."""

    env: dict[str, str]
    archivers: int = 2
    datacenter: str = "ey04"
    processes: dict[str, ChildProcess] = field(default_factory=dict)

    @property
    def url(self) -> str:
        return f"http://{self.env['FERRY_INTAKE_BIND']}"

    def start(self, name: str) -> None:
        """Start `name` (again, after a kill: same command, same log)."""
        if name in self.processes:
            self.processes[name].restart()
            return
        service = name.split("-")[0]
        extra = ["--datacenter", self.datacenter] if service in PER_DATACENTER else []
        self.processes[name] = ChildProcess.ferry("run", service, *extra, env=self.env)

    def start_all(self) -> None:
        """Start every service and wait until each declared its queues (it says "running …
        Ctrl-C stops" after that): what intake publishes before the resolver's queue exists
        would be routed nowhere."""
        try:
            for name in [*SERVICES, *(f"archiver-{i + 1}" for i in range(self.archivers))]:
                self.start(name)
            self._wait_all_ready()
        except BaseException:
            self.stop_all()  # one that failed to start leaves none of the others running
            raise

    def _wait_all_ready(self) -> None:
        for process in self.processes.values():
            process.wait_ready(READY)
        self.wait_for_api()

    def wait_for_api(self, timeout: float = 60) -> None:
        def healthy() -> bool:
            try:
                return httpx.get(f"{self.url}/healthz", timeout=2).status_code == 200
            except httpx.HTTPError:
                return False

        serving = self.processes.get("intake") or self.processes["all"]  # or `ferry run all`
        serving.wait_ready(healthy, timeout)

    def spawn(self, name: str, extra_env: Mapping[str, str] | None = None) -> None:
        """Start `name` as a new process, with `extra_env` on top of the pipeline's env for
        this process alone (a failpoint armed in it); logging to the file of its earlier run
        if it had one. Raises AssertionError if it is still running."""
        earlier = self.processes.get(name)
        assert earlier is None or not earlier.running, f"{name} is still running"
        service = name.split("-")[0]  # `all`: every service in this one process
        extra = (["--datacenter", self.datacenter] if service in {*PER_DATACENTER, "all"}
                 else [])
        self.processes[name] = ChildProcess.ferry(
            "run", service, *extra, env={**self.env, **(extra_env or {})},
            log=earlier.log_path if earlier is not None else None)

    def start_all_with(self, name: str, extra_env: Mapping[str, str]) -> None:
        """start_all, with `extra_env` for the process `name` only."""
        try:
            for each in [*SERVICES, *(f"archiver-{i + 1}" for i in range(self.archivers))]:
                self.spawn(each, extra_env if each == name else None)
            self._wait_all_ready()
        except BaseException:
            self.stop_all()
            raise

    def kill(self, name: str) -> None:
        self.processes[name].kill()

    def stop_all(self) -> None:
        stop_all(list(self.processes.values()))

    def client(self) -> httpx.Client:
        token = self.env["FERRY_API_TOKEN"]
        return httpx.Client(base_url=self.url, timeout=10,
                            headers={"Authorization": f"Bearer {token}"})

    def status(self, client: httpx.Client, migration_id: str) -> dict[str, Any] | None:
        try:
            response = client.get(f"/migrations/{migration_id}")
        except httpx.HTTPError:
            return None  # intake is being restarted
        return response.json() if response.status_code == 200 else None

    def tail(self) -> str:
        return "\n".join(f"--- {name}\n{process.tail(2500)}"
                         for name, process in self.processes.items())


def pipeline_env(workdir: Path, inventory: Path, broker_url: str,
                 database_urls: dict[str, str]) -> dict[str, str]:
    env = {**os.environ,
           "FERRY_BROKER_URL": broker_url,
           "FERRY_STATE_DIR": str(workdir / "state"),
           "FERRY_STAGING_DIR": str(workdir / "staging"),
           "FERRY_DESTINATION": str(workdir / "destination"),
           "FERRY_INVENTORY": str(inventory),
           "FERRY_INTAKE_BIND": f"127.0.0.1:{free_port()}",
           "FERRY_API_TOKEN": "e2e-token",
           "FERRY_SOURCE_DB_HOST": "127.0.0.1", "FERRY_SOURCE_DB_PORT": "3306",
           "FERRY_SOURCE_DB_USER": "root", "FERRY_SOURCE_NICE": "false",
           "FERRY_LEASE_SECONDS": "6", "FERRY_RETRY_DELAYS": "0.5,1,2,4",
           "FERRY_OUTBOX_POLL_SECONDS": "0.1", "FERRY_JOB_POLL_SECONDS": "0.2",
           "FERRY_TRANSFER_BACKOFF_SECONDS": "0.5", "FERRY_ARCHIVE_PROGRESS_SECONDS": "1",
           "FERRY_TRANSFER_PROGRESS_SECONDS": "1", "FERRY_RECONCILE_SECONDS": "5",
           "FERRY_SHARED_FS_MOUNT_CHECK": "false",  # the demo site's /data: a plain directory
           # no staging gc: the runs check what staging holds after (no partial left)
           "FERRY_STAGING_GC_SECONDS": "0",
           "PYTHONPATH": str(ROOT)}
    for service, url in database_urls.items():
        env[f"FERRY_{service.upper()}_DATABASE_URL"] = url
    return env
