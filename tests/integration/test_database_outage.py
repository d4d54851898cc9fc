"""A service whose own database is unreachable keeps its messages: an outage spends no
attempt, so a message is never dead-lettered for it, however long it lasts."""

from __future__ import annotations

import uuid

from sqlalchemy import func, select
from sqlalchemy.engine import make_url

from ferry.dlq import list_dead
from shared.db import make_engine
from tests.integration.test_backbone import echo_envelope, fast_settings, publish
from tests.support import echo
from tests.support.helpers import wait_for
from tests.support.proxy import TcpProxy


def test_message_waits_out_a_database_outage_longer_than_its_attempts(
    rabbit_url: str, pg_url: str,
) -> None:
    direct = make_url(pg_url)
    proxy = TcpProxy((direct.host or "127.0.0.1", direct.port or 5432), mode="refuse")
    through_proxy = direct.set(host="127.0.0.1", port=proxy.port)
    engine = make_engine(pg_url)  # the test's own view, not through the proxy
    queue = f"echo-{uuid.uuid4().hex[:8]}"
    settings = fast_settings(rabbit_url, max_attempts=3, retry_delays=(0.05, 0.1))
    service = echo.build(settings, through_proxy.render_as_string(hide_password=False),
                         queue=queue)
    service.start()
    try:
        # Given the echo service, its database reached through a proxy, handling messages
        first = echo_envelope("before")
        publish(rabbit_url, first)
        wait_for(lambda: echo.handled(engine, first), what="a message before the outage")
        # When its database becomes unreachable and a message arrives
        proxy.cut()
        during = echo_envelope("during")
        publish(rabbit_url, during)
        consumer = service.consumer
        assert consumer is not None
        # and it fails for that more often than its attempts allow
        wait_for(lambda: consumer.deferred >= 2 * settings.max_attempts,
                 what="the message retried through the outage")
        proxy.restore()
        # Then, once the database is back, it is handled, once, and nothing is dead
        wait_for(lambda: echo.handled(engine, during), timeout=30,
                 what="the message after the outage")
        with engine.connect() as connection:
            effects = connection.execute(select(func.count()).select_from(echo.effects).where(
                echo.effects.c.value == "during")).scalar_one()
            failures = connection.execute(select(func.count()).select_from(
                echo.failures)).scalar_one()
        assert (effects, failures) == (1, 0)
        assert list_dead(rabbit_url, queue) == []
        # (negative control: counted as attempts, these retries would have dead-lettered it)
        assert consumer.deferred > settings.max_attempts
    finally:
        service.stop()
        proxy.close()
        engine.dispose()
