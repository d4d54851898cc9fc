"""Least privilege on the broker (real RabbitMQ): after `ferry broker setup` each service's
user may publish only the events it emits and touch only its own queues; a whole migration
runs with every service on its own user; and what the archiver's own user forges is
dead-lettered by transfer, the verified copy at the destination untouched."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest
from kombu import Connection
from sqlalchemy import select

from ferry.broker import Rabbitmqctl, ServiceUser, read_passwords, service_url, setup
from ferry.cli import main
from ferry.dlq import list_dead
from shared.bus import Publisher, PublishRefusedError, UnroutableError, connect
from shared.contracts import ArchiveCompleted, MigrationFailed
from shared.db import make_engine
from shared.digests import file_sha256
from shared.envelope import Envelope
from shared.inbox_outbox import Units, metadata, outbox_table
from shared.relay import OutboxRelay
from shared.runtime import Service
from shared.settings import SERVICES, Settings
from shared.topology import DEAD_EXCHANGE, DEFAULT_EXCHANGE, FIXED_QUEUES, RETRY_EXCHANGE
from tests.conftest import RABBIT_HOST, rabbitmqctl
from tests.e2e.checks import check_destination, jobs_of
from tests.e2e.harness import Pipeline, pipeline_env
from tests.e2e.test_scale_out import site  # noqa: F401 - the fixture
from tests.integration.test_transfer import (
    MiB,
    Migration,
    emitted,
    make_archive,
    services,  # noqa: F401 - the fixture
    start,
    wait_job,
)
from tests.support.helpers import wait_for

RETRY = (0.5, 1.0, 2.0, 4.0)  # the e2e harness's FERRY_RETRY_DELAYS
DC = "ey04"


class Broker:
    """A fresh vhost after `ferry broker setup`: the admin's URL and each service's user."""

    def __init__(self, admin_url: str, users: list[ServiceUser], prefix: str,
                 passwords: dict[str, str]) -> None:
        self.admin_url = admin_url
        self.users = {user.service: user for user in users}
        self.prefix = prefix
        self.passwords = passwords

    def url(self, service: str) -> str:
        return self.users[service].url

    def purge(self) -> None:
        """Empty every queue (what one test published must not reach the next)."""
        with connect(self.admin_url) as connection:
            channel = connection.channel()
            for queue in [*FIXED_QUEUES, f"archiver.{DC}", f"transfer.{DC}"]:
                for name in (queue, f"{queue}.dead"):
                    channel.queue_purge(name)
            channel.close()


@pytest.fixture(scope="module")
def broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Broker]:
    """`ferry broker setup` as an operator runs it, on a vhost it creates."""
    vhost, prefix = f"ferry-test-{uuid.uuid4().hex[:12]}", f"ferry-test-{uuid.uuid4().hex[:6]}-"
    admin = f"amqp://{RABBIT_HOST}/{vhost}"
    passwords = tmp_path_factory.mktemp("broker") / "passwords.env"
    try:
        started = time.monotonic()
        done = subprocess.run(
            [sys.executable, "-m", "ferry", "broker", "setup", "-d", DC, "--password-file",
             str(passwords), "--user-prefix", prefix], capture_output=True, text=True,
            timeout=120, check=False, env={**os.environ, "FERRY_BROKER_URL": admin,
                                           "FERRY_RETRY_DELAYS": ",".join(map(str, RETRY))})
        print(f"ferry broker setup: {time.monotonic() - started:.1f} s")
        assert done.returncode == 0, done.stdout + done.stderr
        secret = read_passwords(passwords)
        assert set(secret) == set(SERVICES) and os.stat(passwords).st_mode & 0o077 == 0
        assert not any(p in done.stdout for p in secret.values())  # the file has them
        yield Broker(admin, [ServiceUser(s, f"{prefix}{s}", secret[s], service_url(
            admin, vhost, f"{prefix}{s}", secret[s])) for s in SERVICES], prefix, secret)
    finally:
        rabbitmqctl("delete_vhost", vhost)
        for service in SERVICES:
            with contextlib.suppress(RuntimeError):  # a user setup never made
                rabbitmqctl("delete_user", f"{prefix}{service}")


def completed(migration_id: str = "m-forged") -> Envelope:
    now = datetime.now(UTC)
    return Envelope.wrap(ArchiveCompleted(
        datacenter=DC, request_id="r1", archive_id="a1", kind="shared_fs", reuse_key="a1",
        path="/etc/passwd", file_name="a1.tar.zst", raw_bytes=1, compressed_bytes=1,
        sha256="0" * 64, started_at=now, finished_at=now), migration_id=migration_id)


def try_publish(url: str, routing_key: str, exchange: object = None,
                body: bytes = b"{}") -> type[Exception] | None:
    """The error class a publish raised (None: the broker took it)."""
    publisher = Publisher(url)
    try:
        if exchange is None:
            publisher.publish(body, routing_key=routing_key)
        else:
            publisher.publish(body, routing_key=routing_key, exchange=exchange)
    except (PublishRefusedError, UnroutableError) as error:
        return type(error)
    finally:
        publisher.close()
    return None


def test_a_migration_runs_with_every_service_on_its_own_user(
        broker: Broker, site: tuple[Path, str],  # noqa: F811 - the imported fixture
        make_pg_database: Callable[[], str], tmp_path: Path) -> None:
    workdir, database = site
    urls = {service: make_pg_database() for service in SERVICES}
    # A shared URL no service may fall back on: it names a user that does not exist
    env = pipeline_env(workdir, workdir / "inventory.yaml",
                       broker.admin_url.replace(RABBIT_HOST, "nobody:wrong@127.0.0.1:5672"),
                       urls)
    env.update({f"FERRY_{s.upper()}_BROKER_URL": broker.url(s) for s in SERVICES})
    pipeline = Pipeline(env, archivers=1, datacenter=DC)
    pipeline.start_all()
    try:
        with pipeline.client() as client:
            response = client.post("/migrations", content=(workdir / "migration.json")
                                   .read_bytes(), headers={"Content-Type": "application/json"})
            assert response.status_code == 202, response.text
            migration_id = response.json()["id"]
            status = wait_for(lambda: (s := pipeline.status(client, migration_id)) and s[
                "status"] in {"completed", "failed"} and s, timeout=240, what="the migration")
            assert isinstance(status, dict) and status["status"] == "completed", (
                status, pipeline.tail())
        jobs = jobs_of(urls["intake"], migration_id)
        assert check_destination(workdir / "destination" / migration_id, jobs, database,
                                 tmp_path / "scratch") == 7
        for queue in [*FIXED_QUEUES, f"archiver.{DC}", f"transfer.{DC}"]:
            assert list_dead(broker.admin_url, queue) == [], queue
        # And no service had a publish refused on the way (the relay logs each one)
        logs = "".join(process.log() for process in pipeline.processes.values())
        assert "refused by the broker" not in logs and "ACCESS_REFUSED" not in logs
    finally:
        pipeline.stop_all()


@pytest.mark.parametrize("service", SERVICES)
def test_only_the_archivers_user_may_publish_archive_completed(broker: Broker,
                                                               service: str) -> None:
    envelope = completed()
    raised = try_publish(broker.url(service), envelope.routing_key, body=envelope.to_json())
    broker.purge()
    assert raised is (None if service == "archiver" else PublishRefusedError), service


def test_the_relay_keeps_a_refused_row_loudly_and_publishes_the_rows_behind_it(
        broker: Broker, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    # Given the resolver's outbox: first an event it may not emit, then one it may
    engine = make_engine(f"sqlite:///{tmp_path}/relay.sqlite3")
    metadata.create_all(engine)
    with Units(engine)() as uow:
        uow.outbox.add(completed().event(), migration_id="m-forged")
        uow.outbox.add(MigrationFailed(stage="resolve", reason="a test"), migration_id="m-1")
        uow.commit()
    relay = OutboxRelay(engine, broker.url("resolver"), poll_seconds=0.05, name="resolver")
    # When the relay runs on the resolver's user
    relay.start()
    try:
        wait_for(lambda: relay.published == 1, what="the allowed row published")
    finally:
        relay.stop()
    # Then the refused row stays in the outbox, said at ERROR, and did not block the other
    with engine.connect() as connection:
        rows = dict(connection.execute(select(outbox_table.c.routing_key,
                                              outbox_table.c.published_at)).all())
    engine.dispose()
    broker.purge()
    assert rows["archive.completed.ey04"] is None and rows["migration.failed"] is not None
    assert any(r.levelname == "ERROR" and "refused by the broker" in r.getMessage()
               for r in caplog.records)


def test_a_service_user_reaches_no_other_service_queue(broker: Broker) -> None:
    resolver = broker.url("resolver")
    forged = completed().to_json()
    transfer = f"transfer.{DC}"
    # Not through the default exchange (straight into transfer's queue by its name) ...
    assert try_publish(resolver, transfer, DEFAULT_EXCHANGE, forged) is PublishRefusedError
    # ... nor another queue's retry or dead-letter keys
    for exchange, key in [(RETRY_EXCHANGE, f"{transfer}.retry.500ms"), (RETRY_EXCHANGE, transfer),
                          (DEAD_EXCHANGE, transfer), (DEAD_EXCHANGE, "archiver.ey04")]:
        assert try_publish(resolver, key, exchange, forged) is PublishRefusedError, key
    # (control: its own keys are allowed; nothing is bound for these two, so they come back)
    assert try_publish(resolver, "resolver.retry.7ms", RETRY_EXCHANGE) is UnroutableError
    assert try_publish(broker.url("archiver"), "archiver.nowhere", DEAD_EXCHANGE) is (
        UnroutableError)
    # Nor may it read another service's queue, or delete one
    with Connection(resolver) as connection:
        for action in (lambda c: c.basic_get(transfer), lambda c: c.queue_delete(transfer),
                       lambda c: c.queue_declare("resolver.mine", durable=True)):
            channel = connection.channel()
            with pytest.raises(connection.channel_errors, match="ACCESS_REFUSED"):
                action(channel)
        connection.channel().basic_get("resolver")  # (control: its own, it may)
    broker.purge()


def test_the_archivers_forgeries_are_dead_lettered_and_the_verified_copy_stays(
        broker: Broker, tmp_path: Path, services: list[Service]) -> None:  # noqa: F811
    # Given transfer of datacenter DC on its own user (its queue transfer.<DC>, which setup
    # declared), and a migration whose archive a1 arrived verified
    staging = tmp_path / "staging" / DC
    staging.mkdir(parents=True)
    settings = Settings(broker_url="amqp://nobody:wrong@127.0.0.1:5672/none",
                        transfer_broker_url=broker.url("transfer"), retry_delays=RETRY,
                        state_dir=tmp_path / "state", staging_dir=staging.parent,
                        outbox_poll_seconds=0.1, job_poll_seconds=0.1)
    service = start(settings, services, datacenter=DC)
    source, digest = make_archive(staging, 1 * MiB)
    migration = Migration(broker.url("resolver"))
    migration.resolve("r1")
    archiver = Migration(broker.url("archiver"), migration.id)
    archiver.archive("r1", "a1", source, digest)
    wait_job(service, "a1", "done")
    arrived = tmp_path / "state" / "destination" / migration.id / source.name
    verified, when = file_sha256(arrived), os.stat(arrived).st_mtime_ns
    # When the archiver's own user forges: a file outside staging, and a staging file with
    # a sha256 not its own in the verified copy's place
    outside = tmp_path / "secret.txt"
    outside.write_bytes(b"not an archive\n")
    other, _ = make_archive(staging, 1 * MiB, "other.tar.zst")
    now = datetime.now(UTC)
    forgeries = [Envelope.wrap(ArchiveCompleted(
        datacenter=DC, request_id=request, archive_id=archive, kind="shared_fs",
        reuse_key=archive, path=str(path), file_name=name, raw_bytes=path.stat().st_size,
        compressed_bytes=path.stat().st_size, sha256=sha, started_at=now, finished_at=now),
        migration_id=migration.id) for request, archive, path, name, sha in [
            ("r9", "a9", outside, "a9.tar.zst", file_sha256(outside)),
            ("r1", "a5", other, arrived.name, digest)]]
    for envelope in forgeries:
        assert try_publish(broker.url("archiver"), envelope.routing_key,
                           body=envelope.to_json()) is None  # the broker lets it through
    # Then transfer dead-letters each, as refused
    ids = {str(e.id) for e in forgeries}

    def ours() -> list[str]:
        return [letter.reason for letter in list_dead(broker.admin_url, f"transfer.{DC}")
                if letter.id in ids]

    wait_for(lambda: len(ours()) == 2, what="both forgeries dead-lettered")
    assert ours() == ["refused", "refused"]
    # And the verified copy is untouched, nothing else was sent
    assert (file_sha256(arrived), os.stat(arrived).st_mtime_ns) == (verified, when)
    assert sorted(p.name for p in arrived.parent.iterdir()) == [arrived.name]
    assert emitted(service, "transfer.failed") == []
    broker.purge()


def _permissions(vhost: str) -> str:
    return rabbitmqctl("list_permissions", "-p", vhost) + rabbitmqctl(
        "list_topic_permissions", "-p", vhost)


def test_setup_again_changes_nothing_and_the_users_keep_working(broker: Broker) -> None:
    vhost = broker.admin_url.rsplit("/", 1)[1]
    before = _permissions(vhost)
    again = setup(broker.admin_url, Settings(retry_delays=RETRY), vhost=None, datacenters=[DC],
                  passwords=dict(broker.passwords), ctl=Rabbitmqctl(), prefix=broker.prefix)
    assert [u.url for u in again] == [broker.url(s) for s in SERVICES]
    assert _permissions(vhost) == before
    envelope = completed()
    assert try_publish(broker.url("archiver"), envelope.routing_key,
                       body=envelope.to_json()) is None
    broker.purge()


@pytest.mark.parametrize("argv, env, says", [
    (["--rabbitmqctl", "no-such-rabbitmqctl", "-d", DC], "amqp://guest:guest@127.0.0.1/x",
     "'no-such-rabbitmqctl' not found"),
    (["-d", DC], "memory://", "must be the RabbitMQ admin's amqp:// URL"),
    ([], "amqp://guest:guest@127.0.0.1/x", "give --datacenter DC"),
])
def test_setup_says_what_is_wrong(argv: list[str], env: str, says: str,
                                  monkeypatch: pytest.MonkeyPatch,
                                  capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("FERRY_BROKER_URL", env)
    assert main(["broker", "setup", *argv]) == 1
    assert says in " ".join(capsys.readouterr().out.split())
