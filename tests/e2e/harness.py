"""Every service as its own `ferry run …` process on RabbitMQ + PostgreSQL, for end-to-end
tests: started, SIGKILLed and restarted by PID, stopped with SIGTERM."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from shared.loopback_sshd import free_port

ROOT = Path(__file__).resolve().parents[2]
SERVICES = ("intake", "resolver", "snapshotter", "transfer")


@dataclass
class Pipeline:
    """The five services as processes: `processes` maps a name (archiver-1…) to its Popen."""

    env: dict[str, str]
    archivers: int = 2
    datacenter: str = "ey04"
    processes: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)
    logs: dict[str, Path] = field(default_factory=dict)

    @property
    def url(self) -> str:
        return f"http://{self.env['FERRY_INTAKE_BIND']}"

    def argv(self, name: str) -> list[str]:
        service = name.split("-")[0]
        extra = ["--datacenter", self.datacenter] if service == "archiver" else []
        return [sys.executable, "-m", "shared.cli_main", "run", service, *extra]

    def start(self, name: str) -> None:
        log = self.logs.setdefault(name, Path(tempfile.mkstemp(prefix=f"ferry-{name}-",
                                                               suffix=".log")[1]))
        handle = log.open("ab")
        self.processes[name] = subprocess.Popen(self.argv(name), cwd=ROOT, env=self.env,
                                                stdout=handle, stderr=subprocess.STDOUT)
        handle.close()

    def start_all(self) -> None:
        for name in [*SERVICES, *(f"archiver-{i + 1}" for i in range(self.archivers))]:
            self.start(name)
        self.wait_for_api()

    def wait_for_api(self, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"{self.url}/healthz", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            if self.processes["intake"].poll() is not None:
                raise AssertionError(f"intake exited: {self.logs['intake'].read_text()[-3000:]}")
            time.sleep(0.2)
        raise AssertionError("intake's API did not come up")

    def kill(self, name: str) -> None:
        process = self.processes[name]
        if process.poll() is None:
            os.kill(process.pid, signal.SIGKILL)
        process.wait(timeout=10)

    def stop_all(self) -> None:
        for process in self.processes.values():
            if process.poll() is None:
                os.kill(process.pid, signal.SIGTERM)
        for name, process in self.processes.items():
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.kill(name)

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
        return "\n".join(f"--- {name}\n{log.read_text()[-2500:]}"
                         for name, log in self.logs.items())


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
           "PYTHONPATH": str(ROOT)}
    for service, url in database_urls.items():
        env[f"FERRY_{service.upper()}_DATABASE_URL"] = url
    return env
