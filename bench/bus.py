"""The bus: one hop (publish → the handler's commit) and throughput through the runtime, for
each broker the embedded default could use, side by side in one run.

- memory:// (kombu's in-memory transport: loses everything in flight on a SIGKILL);
- sqlite+ferry:// (shared.embedded_broker, the embedded default);
- sqla+sqlite:// (kombu's SQLAlchemy transport): through the runtime it delivers nothing
  (a publisher's connection does not know the bindings another declared), so only the raw
  kombu hop is measured;
- RabbitMQ on 127.0.0.1 (a vhost made for the run and removed after).

The runtime hop runs the backbone's echo service (tests/support/echo.py, relay off): one
message published with Ferry's Publisher, timed until the unit of work committed. The raw hop
is kombu alone: publish, then basic_get until it comes, ack.

Run: .venv/bin/python bench/bus.py [--hops 200] [--burst 1000]
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

from kombu import Connection, Queue
from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from shared.bus import Publisher, connect  # noqa: E402
from shared.embedded_broker import embedded_url  # noqa: E402
from shared.envelope import Envelope  # noqa: E402
from shared.settings import Settings  # noqa: E402
from shared.topology import EVENTS_EXCHANGE  # noqa: E402
from tests.support import echo  # noqa: E402


def runtime_case(url: str, workdir: Path, hops: int, burst: int) -> tuple[list[float], float]:
    """One-hop latencies (s) and the burst's rate (msg/s) through a running echo service."""
    settings = Settings(broker_url=url, state_dir=workdir, outbox_relay=False, prefetch=200)
    service = echo.build(settings, f"sqlite:///{workdir}/echo-{uuid.uuid4().hex[:6]}.sqlite3",
                         queue=f"echo-{uuid.uuid4().hex[:6]}")
    committed = threading.Semaphore(0)
    service.units.subscribe(committed.release)
    service.start()
    publisher = Publisher(url)
    try:
        latencies = []
        for i in range(hops + 1):  # the first one waits for the consumer to start: not timed
            envelope = Envelope.wrap(echo.Echo(value=f"hop-{i}"), migration_id="m-bench")
            started = time.perf_counter()
            publisher.publish(envelope.to_json(), routing_key=envelope.routing_key)
            if not committed.acquire(timeout=30):
                raise RuntimeError(f"{url}: no commit within 30 s")
            latencies.append(time.perf_counter() - started)
        latencies = latencies[1:]
        started = time.perf_counter()
        for i in range(burst):
            envelope = Envelope.wrap(echo.Echo(value=f"burst-{i}"), migration_id="m-bench")
            publisher.publish(envelope.to_json(), routing_key=envelope.routing_key)
        for _ in range(burst):
            if not committed.acquire(timeout=60):
                raise RuntimeError(f"{url}: the burst stalled")
        rate = burst / (time.perf_counter() - started)
    finally:
        publisher.close()
        service.stop()
        service.engine.dispose()
    return latencies, rate


def raw_case(url: str, hops: int) -> list[float]:
    """kombu alone on one connection: publish, basic_get until it is there, ack."""
    with (connect(url) if not url.startswith("sqla") else Connection(url)) as connection:
        channel = connection.channel()
        queue = Queue(f"raw-{uuid.uuid4().hex[:6]}", EVENTS_EXCHANGE, routing_key="raw.hop")
        bound = queue(channel)
        bound.declare()
        producer = connection.Producer(channel)
        latencies = []
        for i in range(hops):
            started = time.perf_counter()
            producer.publish(f'{{"n": {i}}}'.encode(), exchange=EVENTS_EXCHANGE,
                             routing_key="raw.hop", content_type="application/json",
                             delivery_mode=2)
            while (message := bound.get(no_ack=False)) is None:
                pass
            message.ack()
            latencies.append(time.perf_counter() - started)
        bound.delete()
    return latencies


def rabbitmqctl(*args: str) -> None:
    subprocess.run(["rabbitmqctl", *args], check=True, capture_output=True, timeout=60)


def ms(values: list[float], q: float) -> str:
    if not values:
        return "-"
    ordered = sorted(values)
    return f"{ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000:.1f}"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--hops", type=int, default=200)
    parser.add_argument("--burst", type=int, default=1000)
    args = parser.parse_args()
    console = Console()
    workdir = Path(tempfile.mkdtemp(prefix="ferry-bench-bus-"))
    vhost = f"ferry-bench-{uuid.uuid4().hex[:8]}"
    rabbitmqctl("add_vhost", vhost)
    rabbitmqctl("set_permissions", "-p", vhost, "guest", ".*", ".*", ".*")
    cases = {
        "memory://": ("memory://", True),
        "sqlite+ferry:// (embedded default)": (embedded_url(workdir / "embedded"), True),
        "sqla+sqlite:// (kombu)": (f"sqla+sqlite:///{workdir}/kombu.sqlite3", False),
        "RabbitMQ 127.0.0.1": (f"amqp://guest:guest@127.0.0.1:5672/{vhost}", True),
    }
    table = Table("broker", "runtime hop p50 ms", "p95 ms", f"burst of {args.burst} msg/s",
                  "raw kombu hop p50 ms", "p95 ms", "survives SIGKILL",
                  title=f"bus: {args.hops} hops each, same run")
    durable = {"memory://": "no", "sqla+sqlite:// (kombu)": "no (in-flight lost)"}
    try:
        for name, (url, through_runtime) in cases.items():
            raw = raw_case(url, args.hops)
            hops, rate = (runtime_case(url, workdir, args.hops, args.burst)
                          if through_runtime else ([], 0.0))
            table.add_row(name, ms(hops, 0.5), ms(hops, 0.95),
                          f"{rate:.0f}" if rate else "delivers nothing", ms(raw, 0.5),
                          ms(raw, 0.95), durable.get(name, "yes"))
            console.print(f"{name}: done (median raw {statistics.median(raw) * 1000:.1f} ms)")
    finally:
        rabbitmqctl("delete_vhost", vhost)
    console.print(table)


if __name__ == "__main__":
    main()
