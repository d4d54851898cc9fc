"""The transfer job under the service's own worker (built by bootstrap) on SQLite: what an
attempt returns is applied by the one retry policy, with the destination host faked."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select

from services.transfer.bootstrap import bootstrap
from services.transfer.tables import transfer_attempts, transfers
from shared.errors import HostUnreachableError
from shared.hosts import HostPool
from shared.runtime import Service
from shared.settings import Settings
from tests.unit.transfer.test_ledger import completed, events, resolved


class UnreachableHost:
    """A destination whose every command finds the connection gone."""

    name = "destination"

    def run(self, argv: list[str], **_: Any) -> Any:
        raise HostUnreachableError(f"{self.name}: connection lost while running: {argv[0]}")

    run_pipeline = run

    def close(self) -> None:
        pass


@pytest.fixture
def service(tmp_path: Path) -> Iterator[Service]:
    """The transfer service, not started, allowed two attempts a transfer, no waits between."""
    settings = Settings(broker_url="memory://", state_dir=tmp_path / "state",
                        staging_dir=tmp_path, transfer_attempts=2, transfer_backoff_seconds=1e-6)
    service = bootstrap(settings, hosts=HostPool(lambda _: UnreachableHost()))
    yield service
    service.engine.dispose()


def given_one_archive(service: Service, tmp_path: Path) -> None:
    staging = tmp_path / "a1.tar.zst"
    staging.write_bytes(b"x" * 1000)
    digest = hashlib.sha256(b"x" * 1000).hexdigest()
    for envelope in (resolved("r1"), completed("r1", "a1", size=1000, path=str(staging),
                                               sha256=digest)):
        service.deliver(envelope.event(), envelope)


def job(service: Service) -> Any:
    with service.engine.connect() as connection:
        return connection.execute(select(transfers)).one()


def outcomes(service: Service) -> list[str]:
    a = transfer_attempts
    with service.engine.connect() as connection:
        return list(connection.execute(select(a.c.outcome).order_by(a.c.attempt)).scalars())


def test_transient_failures_are_retried_then_the_last_fails_the_migration_once(
    service: Service, tmp_path: Path,
) -> None:
    given_one_archive(service, tmp_path)
    [worker] = service.workers
    # When the first attempt finds the destination unreachable, then it is tried again
    assert worker.run_one("w1")
    assert (job(service).state, job(service).attempts) == ("pending", 1)
    assert outcomes(service) == ["retry"]
    # When the second and last allowed attempt does too, then the transfer fails, saying so
    assert worker.run_one("w1")
    failed = job(service)
    assert failed.state == "failed" and failed.attempts == 2
    assert failed.error.startswith("gave up after 2 attempts; the last: destination: "
                                   "connection lost")
    assert outcomes(service) == ["retry", "failed"]
    # And its request and migration fail once
    [transfer_failed] = events(service.units, "transfer.failed")
    assert transfer_failed["payload"]["attempts"] == 2
    assert transfer_failed["payload"]["reason"] == failed.error
    assert [e["payload"]["stage"] for e in events(service.units, "migration.failed")] == [
        "transfer"]
    assert not worker.run_one("w1")  # nothing left to claim


def test_what_a_stop_cuts_short_is_given_back_without_spending_an_attempt(
    service: Service, tmp_path: Path,
) -> None:
    given_one_archive(service, tmp_path)
    [worker] = service.workers
    # When the service is stopping (its destination connections closed) during an attempt
    worker.stop()
    assert worker.run_one("w1")
    # Then the job is pending again with its attempts untouched, the attempt interrupted
    assert (job(service).state, job(service).attempts) == ("pending", 0)
    assert outcomes(service) == ["interrupted"]
    assert events(service.units, "transfer.failed") == []
