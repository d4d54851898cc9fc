"""Prometheus metrics every service exposes (`prometheus-client`), in one registry per process.

Counters and histograms are updated where the thing happens: the runtime when it delivers
a message (its age, from the envelope's `occurred_at`), the bus when it retries or
dead-letters one, the job worker when an attempt is given back or a job fails, and each
service's job-done hook (bytes archived and transferred, their durations). Two gauges are
read from the databases when Prometheus scrapes: jobs by kind and state, from each job
table a running service watches, and the outbox rows not yet published. Those two describe
a service's shared tables, so every process of one service reports the same numbers:
aggregate them with `max`, not `sum`.

Labels stay bounded: service, datacenter, kind, state, event type, queue, dead-letter
reason; never a migration, job or archive id. `ferry run all` (several services in one
process) serves them all from one registry on one port.

Intake serves /metrics on its API; the other services on FERRY_METRICS_BIND:<port> when a
port is set (shared.settings.Settings.metrics_port_of).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Histogram,
    ProcessCollector,
    start_http_server,
)
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from sqlalchemy import Engine, Table, func, select

from shared.errors import ConfigurationError
from shared.inbox_outbox import outbox_table
from shared.settings import Settings

log = logging.getLogger(__name__)

REGISTRY = CollectorRegistry()
ProcessCollector(registry=REGISTRY)

# Seconds to hours: a small database dump takes a second, a large filesystem hours.
WORK_BUCKETS = (0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1200, 1800, 3600, 7200, 14400,
                28800, 86400)
# A message's age when handled: milliseconds when all is well, hours after an outage.
AGE_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 900,
               3600, 14400)

# What a job's metrics are labelled with: bounded, never a migration or job id.
WORK_LABELS = ("service", "datacenter", "kind")

messages_handled = Counter(
    "ferry_messages_handled", "Messages a handler committed (duplicates not counted)",
    ["service", "type"], registry=REGISTRY)
message_age = Histogram(
    "ferry_message_age_seconds", "Age of a message when its handler ran: from the envelope's "
    "occurred_at to the delivery", ["service", "type"], buckets=AGE_BUCKETS, registry=REGISTRY)
handler_errors = Counter(
    "ferry_handler_errors", "Handler calls that raised (the bus retries or dead-letters them)",
    ["service", "type"], registry=REGISTRY)
message_retries = Counter(
    "ferry_message_retries", "Messages sent to a retry queue after a failed handler",
    ["queue"], registry=REGISTRY)
dead_letters = Counter(
    "ferry_dead_letters", "Messages dead-lettered, by reason (malformed, unhandled, "
    "permanent, attempts, ...)", ["queue", "reason"], registry=REGISTRY)
outbox_published = Counter(
    "ferry_outbox_published", "Outbox rows the relay published (broker-confirmed)",
    ["service"], registry=REGISTRY)
job_retries = Counter(
    "ferry_job_retries", "Job attempts that failed and were given back to run again",
    WORK_LABELS, registry=REGISTRY)
job_failures = Counter(
    "ferry_job_failures", "Jobs that failed for good",
    WORK_LABELS, registry=REGISTRY)
archives = Counter(
    "ferry_archives", "Archives made and sealed", WORK_LABELS,
    registry=REGISTRY)
archived_bytes = Counter(
    "ferry_archived_bytes", "Bytes of sealed archives (compressed, as staged)",
    WORK_LABELS, registry=REGISTRY)
archived_raw_bytes = Counter(
    "ferry_archived_raw_bytes", "Bytes read from sources into sealed archives",
    WORK_LABELS, registry=REGISTRY)
archive_duration = Histogram(
    "ferry_archive_duration_seconds", "Time from an archive attempt's start to its seal",
    WORK_LABELS, buckets=WORK_BUCKETS, registry=REGISTRY)
transfers = Counter(
    "ferry_transfers", "Archives transferred and verified at the destination",
    WORK_LABELS, registry=REGISTRY)
transferred_bytes = Counter(
    "ferry_transferred_bytes", "Bytes of archives transferred and verified",
    WORK_LABELS, registry=REGISTRY)
transfer_duration = Histogram(
    "ferry_transfer_duration_seconds", "Time from a transfer's first attempt to its verified "
    "copy (retries and their waits included)", WORK_LABELS,
    buckets=WORK_BUCKETS, registry=REGISTRY)


@dataclass(frozen=True)
class Watched:
    service: str
    engine: Engine
    tables: tuple[Table, ...]


class TablesCollector(Collector):
    """`ferry_jobs` and `ferry_outbox_backlog`, counted in each watched service's database
    when scraped. A database that does not answer is left out of that scrape (logged), so
    one service's outage does not fail another's metrics."""

    def __init__(self) -> None:
        self._watched: dict[str, Watched] = {}
        self._lock = threading.Lock()

    def watch(self, key: str, service: str, engine: Engine, tables: Iterable[Table]) -> None:
        with self._lock:
            self._watched[key] = Watched(service, engine, tuple(tables))

    def forget(self, key: str) -> None:
        with self._lock:
            self._watched.pop(key, None)

    def describe(self) -> list[Metric]:
        return []  # counted at scrape time only: nothing to query at registration

    def collect(self) -> Iterable[Metric]:
        jobs = GaugeMetricFamily("ferry_jobs", "Jobs by kind and state, in the service's "
                                 "job tables (the same from every process of a service)",
                                 labels=["service", "datacenter", "kind", "state"])
        backlog = GaugeMetricFamily("ferry_outbox_backlog", "Outbox rows not yet published",
                                    labels=["service"])
        with self._lock:
            watched = list(self._watched.values())
        # Two archivers (or transfers) of one process, one per datacenter, watch the same
        # tables through engines of their own: count those once per scrape, not once each.
        queried: set[tuple[str, str, tuple[str, ...]]] = set()
        seen: set[tuple[str, ...]] = set()
        counted: set[str] = set()
        for each in watched:
            same = (each.service, each.engine.url.render_as_string(),
                    tuple(table.name for table in each.tables))
            if same in queried:
                continue
            try:
                rows, unsent = _count(each)
            except Exception as error:  # noqa: BLE001 - a scrape must not fail for it
                log.warning("metrics: %s's database did not answer: %s", each.service, error)
                continue
            queried.add(same)
            for labels, count in rows:
                if labels not in seen:
                    seen.add(labels)
                    jobs.add_metric(list(labels), count)
            if each.service not in counted:
                counted.add(each.service)
                backlog.add_metric([each.service], unsent)
        yield jobs
        yield backlog


def _count(each: Watched) -> tuple[list[tuple[tuple[str, ...], float]], float]:
    rows: list[tuple[tuple[str, ...], float]] = []
    with each.engine.connect() as connection:
        for table in each.tables:
            dc = table.c["datacenter"] if "datacenter" in table.c else None
            columns = [table.c.kind, table.c.state, *([dc] if dc is not None else [])]
            query = select(*columns, func.count()).group_by(*columns)
            for row in connection.execute(query):
                datacenter = str(row[2]) if dc is not None else ""
                rows.append(((each.service, datacenter, str(row[0]), str(row[1])),
                             float(row[-1])))
        unsent = connection.execute(select(func.count()).select_from(outbox_table).where(
            outbox_table.c.published_at.is_(None))).scalar_one()
    return rows, float(unsent)


TABLES = TablesCollector()
REGISTRY.register(TABLES)


def observe_delivery(service: str, event_type: str, age_seconds: float) -> None:
    """A handler committed a message that was `age_seconds` old."""
    messages_handled.labels(service, event_type).inc()
    message_age.labels(service, event_type).observe(max(age_seconds, 0.0))


def observe_archive(service: str, datacenter: str, kind: str, *, compressed_bytes: int,
                    raw_bytes: int, seconds: float) -> None:
    """An archive was sealed (its job committed done)."""
    archives.labels(service, datacenter, kind).inc()
    archived_bytes.labels(service, datacenter, kind).inc(max(compressed_bytes, 0))
    archived_raw_bytes.labels(service, datacenter, kind).inc(max(raw_bytes, 0))
    archive_duration.labels(service, datacenter, kind).observe(max(seconds, 0.0))


def observe_transfer(service: str, datacenter: str, kind: str, *, size: int,
                     seconds: float) -> None:
    """An archive was transferred and verified (its job committed done)."""
    transfers.labels(service, datacenter, kind).inc()
    transferred_bytes.labels(service, datacenter, kind).inc(max(size, 0))
    transfer_duration.labels(service, datacenter, kind).observe(max(seconds, 0.0))


def serve(settings: Settings, services: Sequence[str]) -> Callable[[], None] | None:
    """Serve this process's metrics on FERRY_METRICS_BIND and the port
    `settings.metrics_port_of(services)`; returns what stops it, None when no port is set.

    Raises ConfigurationError when the address cannot be bound (naming it)."""
    port = settings.metrics_port_of(services)
    if port is None:
        return None
    try:
        server, thread = start_http_server(port, addr=settings.metrics_bind, registry=REGISTRY)
    except OSError as error:
        raise ConfigurationError(
            f"metrics of {', '.join(services)} cannot listen on {settings.metrics_bind}:{port} "
            f"(FERRY_METRICS_BIND, FERRY_METRICS_PORT): {error.strerror or error}") from error
    log.info("metrics of %s on http://%s:%d/metrics", ", ".join(services),
             settings.metrics_bind, port)

    def stop() -> None:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)

    return stop
