"""Fixtures for the real services this machine runs: RabbitMQ, PostgreSQL (and MariaDB).

A missing service fails the test that needs it; nothing here skips.
Each test gets its own RabbitMQ vhost and its own PostgreSQL database.
"""

from __future__ import annotations

import os
import subprocess
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from sqlalchemy import create_engine, text

from shared.embedded_broker import embedded_url
from tests.support.processes import ChildProcess, children

# The tests' old hosts are this machine: allow the inventory host `local` (never the
# default; tests/unit/test_addresses.py proves the default refuses it). Child processes
# inherit it.
os.environ.setdefault("FERRY_ALLOW_LOCAL_HOSTS", "true")

RABBIT_HOST = os.environ.get("FERRY_TEST_RABBIT", "guest:guest@127.0.0.1:5672")
PG_ADMIN_URL = os.environ.get("FERRY_TEST_PG", "postgresql+psycopg2://postgres@127.0.0.1:5432")


def rabbitmqctl(*args: str) -> str:
    done = subprocess.run(["rabbitmqctl", *args], capture_output=True, text=True, timeout=60)
    if done.returncode != 0:
        raise RuntimeError(f"rabbitmqctl {' '.join(args)} failed: {done.stderr or done.stdout}")
    return done.stdout


@pytest.fixture
def bare_rabbit_url() -> Iterator[str]:
    """A fresh, empty RabbitMQ vhost on the real broker, deleted afterwards."""
    vhost = f"ferry-test-{uuid.uuid4().hex[:12]}"
    rabbitmqctl("add_vhost", vhost)
    rabbitmqctl("set_permissions", "-p", vhost, "guest", ".*", ".*", ".*")
    yield f"amqp://{RABBIT_HOST}/{vhost}"
    rabbitmqctl("delete_vhost", vhost)


@pytest.fixture
def rabbit_url(bare_rabbit_url: str) -> str:
    """A fresh vhost with the events exchange and a queue bound to every event, as the
    deployment has in intake.status: a test that runs one service alone sees its events
    routed (published `mandatory`, they would otherwise wait in its outbox for a consumer)."""
    from kombu import Queue

    from shared.bus import connect
    from shared.topology import EVENTS_EXCHANGE

    with connect(bare_rabbit_url) as connection:
        channel = connection.channel()
        EVENTS_EXCHANGE(channel).declare()
        Queue("test.sink", exchange=EVENTS_EXCHANGE, routing_key="#", durable=True,
              queue_arguments={"x-max-length": 100_000})(channel).declare()
        channel.close()
    return bare_rabbit_url


@pytest.fixture
def make_pg_database() -> Iterator[Callable[[], str]]:
    """Creates fresh PostgreSQL databases on demand; drops them afterwards."""
    admin = create_engine(f"{PG_ADMIN_URL}/postgres", isolation_level="AUTOCOMMIT")
    created: list[str] = []

    def make() -> str:
        name = f"ferry_test_{uuid.uuid4().hex[:12]}"
        with admin.connect() as connection:
            connection.execute(text(f'CREATE DATABASE "{name}"'))
        created.append(name)
        return f"{PG_ADMIN_URL}/{name}"

    yield make
    with admin.connect() as connection:
        for name in created:
            connection.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    admin.dispose()


@pytest.fixture
def pg_url(make_pg_database: Callable[[], str]) -> str:
    return make_pg_database()


@dataclass(frozen=True)
class Backbone:
    """A broker and a database to run a service on: embedded or real."""

    name: str
    broker_url: str
    db_url: str

    @property
    def real(self) -> bool:
        return self.broker_url.startswith("amqp")


@pytest.fixture(params=["embedded", "durable", "rabbitmq+postgres"])
def backbone(request: pytest.FixtureRequest, tmp_path: Path) -> Backbone:
    """`embedded`: memory://, in one process; `durable`: the default embedded broker (a
    SQLite file, shared.embedded_broker); `rabbitmq+postgres`: the real ones."""
    if request.param == "embedded":
        return Backbone("embedded", "memory://", f"sqlite:///{tmp_path}/echo.sqlite3")
    if request.param == "durable":
        return Backbone("durable", embedded_url(tmp_path / "broker"),
                        f"sqlite:///{tmp_path}/echo.sqlite3")
    broker = request.getfixturevalue("rabbit_url")
    database = request.getfixturevalue("pg_url")
    return Backbone(request.param, broker, database)


@pytest.fixture
def processes() -> Iterator[list[ChildProcess]]:
    """Child processes the test starts (append them); those still running are stopped and
    every one is reaped when the test ends, however it ends."""
    with children() as started:
        yield started
