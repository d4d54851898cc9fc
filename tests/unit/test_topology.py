"""The queues every service declares at start are the ones the consumers bind: a service
whose HANDLERS change without shared/topology.py changing fails here."""

from __future__ import annotations

import pytest

from services.archiver import handlers as archiver
from services.resolver import handlers as resolver
from services.snapshotter import handlers as snapshotter
from services.transfer import handlers as transfer
from shared.runtime import routing_keys
from shared.topology import FIXED_BINDINGS, queue_name, standing_queues


@pytest.mark.parametrize("service, handlers", [
    ("resolver", resolver.HANDLERS), ("snapshotter", snapshotter.HANDLERS),
    ("transfer", transfer.HANDLERS)])
def test_each_fixed_queue_is_bound_as_its_consumer_binds_it(service: str,
                                                            handlers: dict[str, object]) -> None:
    assert set(FIXED_BINDINGS[queue_name(service)]) == set(routing_keys(handlers))


def test_intake_hears_everything() -> None:
    assert FIXED_BINDINGS[queue_name("intake")] == ("#",)


def test_a_datacenters_standing_queue_takes_what_its_archiver_is_sent() -> None:
    [spec] = [s for s in standing_queues(["ey04"]) if s.name == "archiver.ey04"]
    sent_to_ey04 = {key for key in routing_keys(archiver.HANDLERS, "ey04")
                    if key.endswith(".ey04")}
    assert set(spec.routing_keys) == sent_to_ey04
