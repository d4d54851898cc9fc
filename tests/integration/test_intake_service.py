"""`ferry run intake` as a real process (RabbitMQ + PostgreSQL), and the `ferry submit` /
`ferry status` commands against a served API."""

from __future__ import annotations

import json
import socket
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import pytest
from kombu import Queue
from typer.testing import CliRunner

from ferry.cli import app as ferry
from services.intake.bootstrap import bootstrap
from shared.bus import Publisher, connect
from shared.contracts import (
    ArchiveCompleted,
    ArchiveProgress,
    ArchiveSource,
    Event,
    MigrationCompleted,
    MigrationResolved,
    PlannedJob,
)
from shared.envelope import Envelope
from shared.settings import Settings
from shared.topology import EVENTS_EXCHANGE
from tests.integration.test_intake_api import EXAMPLE, EXAMPLE_BODY, TOKEN
from tests.support.helpers import wait_for
from tests.support.processes import ROOT, ChildProcess

EXAMPLE_FILE = ROOT / "examples" / "migration.json"
SOURCE = ArchiveSource(host="ey04-s50000", path="/data", label="ey04-e00075:/data")


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def life_of(migration_id: str) -> list[Envelope]:
    """What the other services would publish for a one-archive migration that completes."""
    events: list[Event] = [
        MigrationResolved(customer_id="cust-1042", allocations={"vlan": 1234},
                          resolved_document={}, jobs=(PlannedJob(
                              request_id="req-1", kind="shared_fs", datacenter="ey04",
                              reuse_key="k-1", source=SOURCE),)),
        ArchiveProgress(datacenter="ey04", request_id="req-1", stage="archive",
                        bytes_done=10, bytes_total=20),
        ArchiveCompleted(datacenter="ey04", request_id="req-1", archive_id="arc-1",
                         kind="shared_fs", reuse_key="k-1", path="/staging/arc-1.tar.zst",
                         file_name="arc-1.tar.zst", raw_bytes=20, compressed_bytes=8,
                         sha256="0" * 64, started_at=datetime.now(UTC),
                         finished_at=datetime.now(UTC)),
        MigrationCompleted(archives=1, bytes=8),
    ]
    return [Envelope.wrap(event, migration_id=migration_id) for event in events]


def publish(broker_url: str, envelopes: list[Envelope]) -> None:
    publisher = Publisher(broker_url)
    try:
        for envelope in envelopes:
            publisher.publish(envelope.to_json(), routing_key=envelope.routing_key)
    finally:
        publisher.close()


@pytest.fixture
def served(rabbit_url: str, pg_url: str, tmp_path: Path,
           processes: list[ChildProcess]) -> tuple[str, str, ChildProcess]:
    """`ferry run intake` in its own process, its API answering."""
    url = f"http://127.0.0.1:{free_port()}"

    def healthy() -> bool:
        try:
            return httpx.get(f"{url}/healthz", timeout=2).status_code == 200
        except httpx.TransportError:
            return False

    process = ChildProcess.ferry("run", "intake", env={
        "FERRY_BROKER_URL": rabbit_url, "FERRY_INTAKE_DATABASE_URL": pg_url,
        "FERRY_INTAKE_BIND": url.removeprefix("http://"), "FERRY_API_TOKEN": TOKEN,
        "FERRY_OUTBOX_POLL_SECONDS": "0.1", "FERRY_STATE_DIR": str(tmp_path / "state"),
    }, log=tmp_path / "intake.log", ready=healthy)
    processes.append(process)
    return url, rabbit_url, process


def test_ferry_run_intake_serves_the_api_and_announces_submissions(
        served: tuple[str, str, ChildProcess], processes: list[ChildProcess]) -> None:
    url, broker, process = served
    auth = {"Authorization": f"Bearer {TOKEN}"}
    # Given a queue watching ferry.events for submissions
    with connect(broker) as connection:
        channel = connection.channel()
        watch = Queue(f"watch-{uuid.uuid4().hex[:8]}", EVENTS_EXCHANGE,
                      routing_key="migration.submitted", exclusive=True)(channel)
        watch.declare()
        # When the example is POSTed over HTTP, first without, then with the token
        refused = httpx.post(f"{url}/migrations", content=EXAMPLE_BODY,
                             headers={"Content-Type": "application/json"})
        response = httpx.post(f"{url}/migrations", content=EXAMPLE_BODY,
                              headers={"Content-Type": "application/json", **auth})
        # Then the first is refused, the second accepted and announced on the broker
        assert refused.status_code == 401
        assert response.status_code == 202, response.text
        migration_id = response.json()["id"]
        message: Any = wait_for(lambda: watch.get(no_ack=True), what="migration.submitted")
        envelope = json.loads(message.body)
        assert (envelope["type"], envelope["migration_id"]) == ("migration.submitted",
                                                                migration_id)
        assert envelope["payload"]["document"] == EXAMPLE
        assert watch.get(no_ack=True) is None  # once, not once per poll
        channel.close()

    def status() -> dict[str, Any]:
        answer: dict[str, Any] = httpx.get(f"{url}/migrations/{migration_id}",
                                           headers=auth).json()
        return answer

    # And intake's own consumer heard it on intake.status
    wait_for(lambda: [e["type"] for e in status()["events"]] == ["migration.submitted"],
             what="intake.status to record the submission")
    # When the rest of its life arrives from the other services
    publish(broker, life_of(migration_id))
    wait_for(lambda: status()["status"] == "completed", what="the migration to complete")
    [job] = status()["jobs"]
    assert (job["label"], job["state"], job["archive"]["compressed_bytes"]) == (
        SOURCE.label, "archived", 8)
    # Then `ferry status` shows it
    shown = CliRunner().invoke(ferry, ["status", migration_id, "--url", url, "--token", TOKEN])
    assert shown.exit_code == 0, shown.output
    assert "completed" in shown.output and "ey04-e00075:/data" in shown.output
    # And `ferry submit --wait` follows a new submission until it completes
    waiting = ChildProcess.ferry("submit", str(EXAMPLE_FILE), "--wait", "--url", url,
                                 "--token", TOKEN, env={})
    processes.append(waiting)
    newest: Any = wait_for(lambda: [m["id"] for m in httpx.get(
        f"{url}/migrations", headers=auth).json()["migrations"] if m["id"] != migration_id],
        what="the second submission")
    publish(broker, life_of(newest[0]))
    assert waiting.wait(timeout=60) == 0, waiting.log()
    assert f"accepted {newest[0]}" in waiting.log() and "completed" in waiting.log()
    # And SIGTERM stops the service cleanly, its port closed
    assert process.stop() == 0, process.log()
    with pytest.raises(httpx.TransportError):
        httpx.get(f"{url}/healthz", timeout=2)


def test_intake_service_with_generated_token_prints_it_and_demands_it(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # Given intake bootstrapped as `ferry run all` would ask, without FERRY_API_TOKEN
    url = f"http://127.0.0.1:{free_port()}"
    settings = Settings(broker_url="memory://", state_dir=tmp_path, outbox_relay=False,
                        intake_bind=url.removeprefix("http://"))
    service = bootstrap(settings, generate_token=True)
    service.start()
    try:
        # Then it prints the token it made up, and the API wants exactly that one
        printed = capsys.readouterr().out
        token = printed.split("FERRY_API_TOKEN=")[1].split()[0]
        assert len(token) >= 32
        post = lambda headers: httpx.post(  # noqa: E731
            f"{url}/migrations", content=EXAMPLE_BODY,
            headers={"Content-Type": "application/json", **headers})
        assert post({}).status_code == 401
        assert post({"Authorization": f"Bearer {token}"}).status_code == 202
        # And `ferry submit` reports a refused document as a table of its problems
        broken = tmp_path / "broken.json"
        broken.write_text(json.dumps({**EXAMPLE, "colour": "red"}))
        refused = CliRunner().invoke(ferry, ["submit", str(broken), "--url", url,
                                             "--token", token])
        assert refused.exit_code == 1
        assert "422" in refused.output and "/colour" in refused.output
        assert "unknown field 'colour'" in refused.output
        # And a wrong token is named as such
        denied = CliRunner().invoke(ferry, ["submit", str(EXAMPLE_FILE), "--url", url,
                                            "--token", "nope"])
        assert denied.exit_code == 1 and "401" in denied.output
    finally:
        service.stop()
        service.engine.dispose()
    # And with the service stopped, the CLI says where it found no API
    unreachable = CliRunner().invoke(ferry, ["status", "mig-1", "--url", url])
    assert unreachable.exit_code == 1 and "no answer from intake" in unreachable.output


def test_taken_port_fails_the_start_with_the_address(tmp_path: Path) -> None:
    # Given something already listening where intake should
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        bind = f"127.0.0.1:{taken.getsockname()[1]}"
        service = bootstrap(Settings(broker_url="memory://", state_dir=tmp_path,
                                     outbox_relay=False, intake_bind=bind,
                                     api_token="a-token-of-ours"))
        # When the service starts / Then it fails at once, naming the address
        started = time.monotonic()
        with pytest.raises(OSError, match=f"cannot listen on {bind}"):
            service.start()
        assert time.monotonic() - started < 10
        service.stop()
        service.engine.dispose()
