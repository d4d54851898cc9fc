"""Wiring for the transfer service: its database, destination, handlers, queue and worker."""

from __future__ import annotations

from services.transfer import SCHEMA
from services.transfer.destination import parse_destination, ssh_identity
from services.transfer.handlers import HANDLERS, ON_FAILURE, Receiving
from services.transfer.jobs import (
    TransferContext,
    TransferLeases,
    destination_pool,
    fail_transfer,
    run_transfer,
)
from shared import metrics
from shared.hosts import HostPool
from shared.jobs import Done, JobWorker, Lease
from shared.retry import RetryPolicy
from shared.runtime import Service, open_database, routing_keys
from shared.settings import Settings
from shared.topology import QueueSpec, datacenter_queue, queue_name

NAME = "transfer"


def count_transfer(lease: Lease, done: Done) -> None:
    """A verified transfer's metrics (the job worker calls it after the commit)."""
    payload = lease.job.payload
    result = done.result if isinstance(done.result, dict) else {}
    metrics.observe_transfer(NAME, str(payload.get("datacenter") or ""), str(lease.job.kind),
                             size=int(result.get("bytes", payload.get("bytes", 0))),
                             seconds=float(result.get("duration_s", 0.0)))


def bootstrap(settings: Settings, *, datacenter: str | None = None,
              concurrency: int | None = None, hosts: HostPool | None = None) -> Service:
    """The transfer service of `datacenter` (or FERRY_DATACENTER), not started: it consumes
    `transfer.<dc>`, sends only that datacenter's archives, from `<staging>/<dc>`, and runs
    next to its archivers. Without a datacenter it serves every one from the whole staging
    directory on queue `transfer` (everything on one host: tests and bench/transfer.py, in
    process or as `python -m services.transfer` without --datacenter; `ferry run` always
    names one, and `ferry broker setup` grants no service user that queue). `hosts` reach
    the destinations (by default over SSH, or this machine for a local one). Raises
    ConfigurationError for a destination it could not reach (malformed, or remote without
    an SSH key and known_hosts)."""
    dc = datacenter or settings.datacenter
    destination = parse_destination(settings.destination, settings)
    if not destination.is_local:
        ssh_identity(settings)  # fail at start, not at the first archive
    units = open_database(settings, SCHEMA)
    root = settings.staging_dir.absolute()
    context = TransferContext(settings, hosts or destination_pool(settings),
                              staging=root / dc if dc else root)
    worker = JobWorker(
        TransferLeases(units.engine, settings.lease_seconds, settings.transfer_max_parallel,
                       dc),
        lambda lease: run_transfer(lease, context), units=units,
        # transfers have their own tiers: a cut link may take minutes to come back
        policy=RetryPolicy.exponential(settings.transfer_backoff_seconds,
                                       settings.transfer_backoff_max_seconds,
                                       settings.transfer_attempts),
        name=f"transfer-{dc}" if dc else "transfer-jobs", fail=fail_transfer,
        concurrency=concurrency or settings.concurrency,
        poll_seconds=settings.job_poll_seconds, on_stop=context.stop, on_done=count_transfer)
    spec = datacenter_queue(NAME, dc) if dc else QueueSpec(queue_name(NAME),
                                                            routing_keys(HANDLERS))
    return Service(NAME, settings, units, spec,
                   HANDLERS, deps=Receiving(destination, root, dc),
                   on_failure=ON_FAILURE, workers=[worker])
