"""Load on a real intake API for bench/intake.py: uvicorn in its own process on a loopback
port, on its own PostgreSQL database (made here, dropped after), hit by client threads
with httpx. Latency is measured at the client, per request."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import httpx
from sqlalchemy import create_engine, text

ROOT = Path(__file__).resolve().parents[1]
PG_ADMIN_URL = os.environ.get("FERRY_TEST_PG", "postgresql+psycopg2://postgres@127.0.0.1:5432")
SERVER = """
import sys, uvicorn
from services.intake.api import create_app
from shared.settings import Settings
app = create_app(Settings(intake_database_url=sys.argv[1], api_token=sys.argv[2]))
uvicorn.run(app, host="127.0.0.1", port=int(sys.argv[3]), log_level="warning",
            lifespan="off")
"""


@contextmanager
def pg_database() -> Iterator[str]:
    admin = create_engine(f"{PG_ADMIN_URL}/postgres", isolation_level="AUTOCOMMIT")
    name = f"ferry_bench_{uuid.uuid4().hex[:12]}"
    with admin.connect() as connection:
        connection.execute(text(f'CREATE DATABASE "{name}"'))
    try:
        yield f"{PG_ADMIN_URL}/{name}"
    finally:
        with admin.connect() as connection:
            connection.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


@contextmanager
def intake_server(database_url: str, token: str) -> Iterator[str]:
    """The API's base URL while a uvicorn process serves it."""
    port = _free_port()
    process = subprocess.Popen(  # noqa: S603 - our own interpreter and script
        [sys.executable, "-c", SERVER, database_url, token, str(port)], cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)})
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(f"{url}/healthz", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"intake did not start on {url}")
            time.sleep(0.1)
        yield url
    finally:
        process.terminate()
        process.wait(timeout=30)


@dataclass
class Latencies:
    values: list[float] = field(default_factory=list)
    statuses: dict[int, int] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def timed(self, call: Callable[[], httpx.Response]) -> None:
        started = time.perf_counter()
        status = call().status_code
        elapsed = time.perf_counter() - started
        with self.lock:
            self.values.append(elapsed)
            self.statuses[status] = self.statuses.get(status, 0) + 1


def run_load(url: str, headers: dict[str, str], good: bytes, *, clients: int,
             per_client: int, bad: bytes | None = None, bad_count: int = 0,
             ) -> dict[str, Latencies]:
    """`clients` threads each POST `good` `per_client` times; meanwhile, when `bad` is
    given, one more client POSTs it `bad_count` times at once, and /healthz is polled.
    With `bad`, the good clients go on until every bad POST is answered."""
    found = {"good": Latencies(), "bad": Latencies(), "healthz": Latencies()}
    attack_over = threading.Event()
    if bad is None:
        attack_over.set()

    def good_client() -> None:
        with httpx.Client(base_url=url, headers=headers, timeout=60) as client:
            done = 0
            while done < per_client or not attack_over.is_set():
                found["good"].timed(lambda: client.post("/migrations", content=good))
                done += 1

    def attacker() -> None:
        assert bad is not None
        limits = httpx.Limits(max_connections=bad_count)
        with httpx.Client(base_url=url, headers=headers, timeout=120, limits=limits) as client:
            sends = [threading.Thread(target=found["bad"].timed,
                                      args=(lambda: client.post("/migrations", content=bad),))
                     for _ in range(bad_count)]
            for send in sends:
                send.start()
            for send in sends:
                send.join()
        attack_over.set()

    def health() -> None:
        with httpx.Client(base_url=url, timeout=60) as client:
            while not attack_over.is_set():
                found["healthz"].timed(lambda: client.get("/healthz"))
                time.sleep(0.01)

    threads = [threading.Thread(target=good_client) for _ in range(clients)]
    if bad is not None:
        threads += [threading.Thread(target=attacker), threading.Thread(target=health)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return found
