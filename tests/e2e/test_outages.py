"""A link cut for 20 s mid-migration (the issue's outage), once to RabbitMQ and once to
PostgreSQL, through a TCP proxy the test starts between the services and the server (the
machine's own server is never touched): the migration completes, nothing lost, nothing
done twice, nothing dead-lettered."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.e2e.observed import not_yet
from tests.e2e.runs import Run, run_migration
from tests.e2e.test_scale_out import site  # noqa: F401 - the sample site fixture
from tests.support.proxy import TcpProxy

OUTAGE_SECONDS = 20.0
RABBIT = ("127.0.0.1", 5672)
POSTGRES = ("127.0.0.1", 5432)


@pytest.fixture
def proxy(request: pytest.FixtureRequest) -> Iterator[TcpProxy]:
    link = TcpProxy(request.param)
    yield link
    link.close()


def cut_while_archiving(link: TcpProxy) -> Callable[[Run], None]:
    """Wait for an archive mid-stream (its partial file holding bytes), then cut the link
    for OUTAGE_SECONDS; returns once it is restored."""

    def outage(run: Run) -> None:
        deadline = time.monotonic() + 120
        while not not_yet(lambda: run.databases.streaming_archive(run.staging))():
            assert time.monotonic() < deadline, "no archive was ever seen mid-stream"
            time.sleep(0.02)
        done = not_yet(lambda: len(run.databases.archives("done")))()
        cut = link.cut(seconds=OUTAGE_SECONDS)
        run.note(f"cut {link.upstream[1]} with an archive mid-stream ({done} done): "
                 f"{cut.closed} connections closed")
        assert link.wait_restored(OUTAGE_SECONDS + 10), "the proxy never restored the link"
        run.note(f"restored after {OUTAGE_SECONDS:.0f}s; {cut.held} new connections were "
                 f"held silent meanwhile")

    return outage


@pytest.mark.parametrize("proxy", [RABBIT], indirect=True, ids=["rabbitmq"])
def test_a_broker_cut_of_20s_mid_migration_loses_nothing(
    site: tuple[Path, str], rabbit_url: str,  # noqa: F811
    make_pg_database: Callable[[], str], tmp_path: Path, proxy: TcpProxy,
) -> None:
    # Given every service reaching RabbitMQ through the proxy
    through = rabbit_url.replace(f"{RABBIT[0]}:{RABBIT[1]}", proxy.address)
    assert through != rabbit_url
    # When the link is cut for 20 s while an archive streams, Then (run_migration's checks)
    run = run_migration(site, rabbit_url, make_pg_database, tmp_path,
                        disturb=cut_while_archiving(proxy), service_broker_url=through)
    # And the cut did break the services' connections
    assert proxy.outages and proxy.outages[0].closed >= 5, run.notes


@pytest.mark.parametrize("proxy", [POSTGRES], indirect=True, ids=["postgres"])
def test_a_database_cut_of_20s_mid_migration_loses_nothing(
    site: tuple[Path, str], rabbit_url: str,  # noqa: F811
    make_pg_database: Callable[[], str], tmp_path: Path, proxy: TcpProxy,
) -> None:
    # Given every service reaching PostgreSQL through the proxy
    def through(url: str) -> str:
        changed = url.replace(f"{POSTGRES[0]}:{POSTGRES[1]}", proxy.address)
        assert changed != url, url
        return changed

    # When the link is cut for 20 s while an archive streams, Then (run_migration's checks)
    run = run_migration(site, rabbit_url, make_pg_database, tmp_path,
                        disturb=cut_while_archiving(proxy), service_database_url=through)
    assert proxy.outages and proxy.outages[0].closed >= 5, run.notes
