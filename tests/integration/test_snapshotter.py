"""The snapshotter service on both backbones, without a Xen host: driver `none` through the
whole message flow, a bad request, and the per-host admission under row locks."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import insert, select

from services.snapshotter.bootstrap import bootstrap
from services.snapshotter.jobs import SnapshotWork
from services.snapshotter.tables import snapshot_jobs
from shared.addresses import host_pool
from shared.contracts import ArchiveSource, SnapshotRequested
from shared.jobs import Lease, Leases, RetryIn, new_job_values
from shared.runtime import Service
from shared.settings import Settings
from tests.conftest import Backbone
from tests.lab.flow import completed, job, publish, wait_event


def settings_for(backbone: Backbone, tmp_path: Path) -> Settings:
    return Settings(broker_url=backbone.broker_url, state_dir=tmp_path,
                    snapshotter_database_url=backbone.db_url, job_poll_seconds=0.1,
                    outbox_poll_seconds=0.1, lease_seconds=5.0, reconcile_seconds=3600.0,
                    retry_delays=(0.1, 0.2))


@pytest.fixture
def service(backbone: Backbone, tmp_path: Path) -> Iterator[Service]:
    running = bootstrap(settings_for(backbone, tmp_path))
    running.start()
    yield running
    running.stop()
    running.engine.dispose()


def request(**values: object) -> SnapshotRequested:
    request_id = f"r-{uuid.uuid4().hex[:8]}"
    return SnapshotRequested(**{
        "request_id": request_id, "datacenter": "ey04", "xen_host": "local", "device": "",
        "size_bytes": 0, "driver": "none", "reuse_key": request_id,
        "source": ArchiveSource(host="local", path="/srv/data"), **values})  # type: ignore[arg-type]


def test_driver_none_goes_ready_then_released_after_the_archive(
        service: Service) -> None:
    # Given a request with driver none
    event = request()
    publish(service, event)
    # Then snapshot.ready says: archive the source as it is (no export)
    ready = wait_event(service, "snapshot.ready", event.request_id, timeout=30)
    assert ready.port is None and ready.export_name == "" and ready.source.path == "/srv/data"
    # When the archive completes, the snapshot is released
    publish(service, completed(ready))
    released = wait_event(service, "snapshot.released", event.request_id, timeout=30)
    assert released.snapshot_id == ready.snapshot_id
    assert job(service, event.request_id).phase == "released"


def test_a_request_for_a_bad_device_fails_at_once_with_the_reason(
        service: Service) -> None:
    event = request(driver="dm", device="-rf /")
    publish(service, event)
    failed = wait_event(service, "snapshot.failed", event.request_id, timeout=30)
    assert "not a device path" in failed.reason
    assert job(service, event.request_id).phase == "failed"


def test_per_host_limit_admits_one_snapshot_at_a_time(backbone: Backbone,
                                                      tmp_path: Path) -> None:
    # Given two claimed dm jobs on one host and the limit 1 (no worker running)
    service = bootstrap(settings_for(backbone, tmp_path))
    leases = Leases(service.engine, snapshot_jobs, 30)
    with service.engine.begin() as connection:
        for index in range(2):
            event = request(driver="dm", device=f"/dev/vg/vm{index}", xen_host="xen9")
            connection.execute(insert(snapshot_jobs).values(new_job_values(
                f"00000000000{index}", "m", "snapshot", event.model_dump(mode="json"),
                request_id=event.request_id, xen_host="xen9", datacenter="ey04", driver="dm",
                phase="waiting", admitted=False, cow_attempt=0, next_run_at=time.time() + 60)))
    work = SnapshotWork(service.settings, service.units, host_pool(service.settings))
    claimed = []
    for index in range(2):
        with service.engine.begin() as connection:
            connection.execute(snapshot_jobs.update().where(
                snapshot_jobs.c.id == f"00000000000{index}").values(next_run_at=0))
        row = leases.claim(f"w{index}", snapshot_jobs.c.xen_host == "xen9")
        assert row is not None
        claimed.append(Lease(leases, row, f"w{index}", service.units))
    # When both ask for a slot, Then only the first gets it
    assert [work._admit(lease)[0] for lease in claimed] == [True, False]
    with service.engine.connect() as connection:
        admitted = connection.execute(select(snapshot_jobs.c.id).where(
            snapshot_jobs.c.admitted.is_(True))).scalars().all()
    assert admitted == ["000000000000"]
    # ... and the second waits for the slot without spending an attempt
    waiting = work.run(claimed[1])
    assert isinstance(waiting, RetryIn) and not waiting.counts_as_attempt
    service.workers[0].settle(claimed[1], waiting)
    with service.engine.connect() as connection:
        row = connection.execute(select(snapshot_jobs).where(
            snapshot_jobs.c.id == "000000000001")).one()
    assert (row.state, row.attempts, row.phase) == ("pending", 0, "waiting")
    assert "waiting for a slot on xen9: 1 of 1" in row.error
    service.engine.dispose()
