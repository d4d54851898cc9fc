"""Intake's HTTP API through TestClient on a real database (SQLite file and PostgreSQL).

Every document rule is proved in tests/unit/intake/test_document.py; here: what the API
answers, what it stores, and that a rejected request stores and emits nothing.
"""

from __future__ import annotations

import copy
import json
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient
from sqlalchemy import Engine, func, select

from services.intake.api import create_app
from services.intake.submissions import IdempotencyConflictError, accept_document
from services.intake.tables import idempotency_keys, migrations
from shared.document import validate_document
from shared.envelope import Envelope
from shared.inbox_outbox import Units, outbox_table
from shared.settings import Settings

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE_BODY = (ROOT / "examples" / "migration.json").read_bytes()
EXAMPLE: dict[str, Any] = json.loads(EXAMPLE_BODY)
TOKEN = "test-token-4f1c"
JSON = {"Content-Type": "application/json"}
AUTH = {"Authorization": f"Bearer {TOKEN}"}
MiB = 1024 * 1024


@dataclass
class Intake:
    client: TestClient
    engine: Engine

    def post(self, body: bytes, **headers: str) -> httpx.Response:
        return self.client.post("/migrations", content=body, headers={**JSON, **AUTH, **headers})

    def count(self, table: Any) -> int:
        with self.engine.connect() as connection:
            return int(connection.execute(select(func.count()).select_from(table)).scalar_one())

    def assert_nothing_stored(self) -> None:
        assert (self.count(migrations), self.count(outbox_table),
                self.count(idempotency_keys)) == (0, 0, 0)


def open_intake(database_url: str, token: str | None = TOKEN) -> Iterator[Intake]:
    app = create_app(Settings(intake_database_url=database_url, api_token=token))
    with TestClient(app) as client:
        yield Intake(client, app.state.engine)
    app.state.engine.dispose()


@pytest.fixture(params=["sqlite", "postgres"])
def intake(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Intake]:
    """The API on a fresh SQLite file, then on a fresh PostgreSQL database."""
    url = (f"sqlite:///{tmp_path}/intake.sqlite3" if request.param == "sqlite"
           else request.getfixturevalue("pg_url"))
    yield from open_intake(url)


@pytest.fixture
def sqlite_intake(tmp_path: Path) -> Iterator[Intake]:
    yield from open_intake(f"sqlite:///{tmp_path}/intake.sqlite3")


def changed(mutate: Callable[[dict[str, Any]], object]) -> bytes:
    document = copy.deepcopy(EXAMPLE)
    mutate(document)
    return json.dumps(document).encode()


# --- acceptance and idempotency (SQLite and PostgreSQL) -----------------------------------


def test_example_is_accepted_stored_as_received_and_announced(intake: Intake) -> None:
    # Given the example as a file holds it (indentation and all)
    # When it is POSTed
    response = intake.post(EXAMPLE_BODY)
    # Then it is accepted with an id and where to follow it
    assert response.status_code == 202
    answer = response.json()
    assert answer["status_url"] == f"/migrations/{answer['id']}"
    assert response.headers["location"] == answer["status_url"]
    # And the body is stored byte for byte, and served back that way
    with intake.engine.connect() as connection:
        stored = connection.execute(select(migrations.c.document, migrations.c.status)
                                    .where(migrations.c.id == answer["id"])).one()
    assert stored.document.encode() == EXAMPLE_BODY and stored.status == "submitted"
    document = intake.client.get(f"{answer['status_url']}/document", headers=AUTH)
    assert document.status_code == 200 and document.content == EXAMPLE_BODY
    # And migration.submitted waits in the outbox, committed with it
    with intake.engine.connect() as connection:
        rows = connection.execute(select(outbox_table.c.routing_key, outbox_table.c.body)).all()
    assert [row.routing_key for row in rows] == ["migration.submitted"]
    envelope = Envelope.from_json(rows[0].body)
    assert envelope.migration_id == answer["id"]
    assert envelope.payload == {"customer_id": "cust-1042", "document": EXAMPLE}


def test_same_idempotency_key_and_body_give_the_same_migration(intake: Intake) -> None:
    # Given a document accepted with an Idempotency-Key
    first = intake.post(EXAMPLE_BODY, **{"Idempotency-Key": "order-7"})
    # When the client retries it with the same key
    second = intake.post(EXAMPLE_BODY, **{"Idempotency-Key": "order-7"})
    # Then it gets the same answer, and nothing is stored or emitted twice
    assert first.status_code == second.status_code == 202
    assert first.json() == second.json()
    assert (intake.count(migrations), intake.count(outbox_table)) == (1, 1)


def test_same_idempotency_key_with_another_body_is_a_conflict(intake: Intake) -> None:
    # Given a document accepted with a key
    first = intake.post(EXAMPLE_BODY, **{"Idempotency-Key": "order-8"})
    # When another (valid) document comes with that key
    other = changed(lambda d: d["customer"].update(name="Someone Else"))
    response = intake.post(other, **{"Idempotency-Key": "order-8"})
    # Then it is refused with 409 naming the key and the first migration; nothing new stored
    assert response.status_code == 409
    assert "order-8" in response.json()["detail"] and first.json()["id"] in response.json()[
        "detail"]
    assert (intake.count(migrations), intake.count(outbox_table)) == (1, 1)


def test_concurrent_submissions_with_one_key_create_one_migration(intake: Intake) -> None:
    # Given eight clients racing to submit one document with one key
    document = validate_document(json.loads(EXAMPLE_BODY))
    ids: list[str] = []
    failures: list[BaseException] = []
    start = threading.Barrier(8)

    def submit() -> None:
        start.wait()
        try:
            ids.append(accept_document(EXAMPLE_BODY, document, uow=Units(intake.engine)(),
                                       idempotency_key="race-1"))
        except BaseException as error:  # noqa: BLE001 - collected and asserted below
            failures.append(error)

    threads = [threading.Thread(target=submit) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    # Then all of them get the same id, and one migration and one event exist
    assert failures == [] and len(ids) == 8 and len(set(ids)) == 1
    assert (intake.count(migrations), intake.count(outbox_table)) == (1, 1)
    with pytest.raises(IdempotencyConflictError, match="race-1"):
        accept_document(EXAMPLE_BODY + b"\n", document, uow=Units(intake.engine)(),
                        idempotency_key="race-1")


# --- rejections: nothing stored, nothing emitted -------------------------------------------


@pytest.mark.parametrize("authorization", [None, "Bearer wrong-token", f"Basic {TOKEN}",
                                           f"Bearer {TOKEN}x", "Bearer"])
def test_request_without_the_right_token_is_401(sqlite_intake: Intake,
                                                authorization: str | None) -> None:
    headers = {**JSON, **({"Authorization": authorization} if authorization else {})}
    # When a valid document comes without the token
    response = sqlite_intake.client.post("/migrations", content=EXAMPLE_BODY, headers=headers)
    # Then it is refused, says how to authenticate, and nothing is stored
    assert response.status_code == 401
    assert response.headers["www-authenticate"] == "Bearer"
    assert "FERRY_API_TOKEN" in response.json()["detail"]
    sqlite_intake.assert_nothing_stored()
    # And the status read model is guarded too, while health and the schema are not
    assert sqlite_intake.client.get("/migrations", headers=headers).status_code == 401
    assert sqlite_intake.client.get("/migrations/mig-1", headers=headers).status_code == 401
    assert sqlite_intake.client.get("/healthz").json() == {"status": "ok"}
    assert sqlite_intake.client.get("/schema/migration-document").status_code == 200


def test_without_a_configured_token_no_authorization_is_asked(tmp_path: Path) -> None:
    for intake in open_intake(f"sqlite:///{tmp_path}/open.sqlite3", token=None):
        response = intake.client.post("/migrations", content=EXAMPLE_BODY, headers=JSON)
        assert response.status_code == 202


def test_body_over_one_mib_is_413(sqlite_intake: Intake) -> None:
    # Given a document padded past 1 MiB (still valid JSON)
    padded = EXAMPLE_BODY + b" " * MiB
    # When it is sent with its Content-Length / Then 413 before anything is parsed
    response = sqlite_intake.post(padded)
    assert response.status_code == 413 and "1 MiB" in response.json()["detail"]
    # When it is sent chunked, without a Content-Length / Then the bytes read are counted
    chunks = iter([padded[i:i + 65536] for i in range(0, len(padded), 65536)])
    chunked = sqlite_intake.client.post("/migrations", content=chunks,
                                        headers={**JSON, **AUTH})
    assert chunked.status_code == 413
    # When the Content-Length is not a number / Then 400
    assert sqlite_intake.post(EXAMPLE_BODY, **{"Content-Length": "12x"}).status_code == 400
    sqlite_intake.assert_nothing_stored()
    # And exactly 1 MiB is still read (and judged on its content)
    assert sqlite_intake.post(EXAMPLE_BODY + b" " * (MiB - len(EXAMPLE_BODY))).status_code == 202


@pytest.mark.parametrize("content_type", [None, "text/plain", "application/xml",
                                          "multipart/form-data; boundary=x",
                                          "application/json; charset=latin-1"])
def test_non_json_content_type_is_415(sqlite_intake: Intake, content_type: str | None) -> None:
    headers = {**AUTH, **({"Content-Type": content_type} if content_type else {})}
    response = sqlite_intake.client.post("/migrations", content=EXAMPLE_BODY, headers=headers)
    assert response.status_code == 415
    assert "application/json" in response.json()["detail"] or "UTF-8" in response.json()[
        "detail"]
    sqlite_intake.assert_nothing_stored()


def test_json_content_type_variants_are_accepted(sqlite_intake: Intake) -> None:
    for content_type in ("application/json; charset=utf-8", "Application/JSON",
                         "application/vnd.ferry.migration+json"):
        response = sqlite_intake.post(EXAMPLE_BODY, **{"Content-Type": content_type})
        assert response.status_code == 202, (content_type, response.text)


def test_invalid_document_gets_every_error_with_its_pointer(intake: Intake) -> None:
    # Given a document broken in three places
    def break_three(d: dict[str, Any]) -> None:
        d["customer"]["colour"] = "red"
        d["vms"][2]["memory_mib"] = 0
        d["public_ips"][0]["port_mappings"][1]["external_port"] = 70000

    # When it is POSTed
    response = intake.post(changed(break_three))
    # Then all three come back at once, each at its JSON Pointer, and nothing is kept
    assert response.status_code == 422
    errors = {e["path"]: e["message"] for e in response.json()["errors"]}
    assert errors == {
        "/customer/colour": "unknown field 'colour'",
        "/vms/2/memory_mib": errors["/vms/2/memory_mib"],
        "/public_ips/0/port_mappings/1/external_port": errors[
            "/public_ips/0/port_mappings/1/external_port"],
    }
    assert "greater than 0" in errors["/vms/2/memory_mib"]
    assert "65535" in errors["/public_ips/0/port_mappings/1/external_port"]
    intake.assert_nothing_stored()


def test_document_breaking_a_cross_reference_rule_is_422(sqlite_intake: Intake) -> None:
    # Given a port mapping that points at an environment instead of a VM
    def point_at_environment(d: dict[str, Any]) -> None:
        d["public_ips"][0]["port_mappings"][0]["vms"][0] = "env_1"

    response = sqlite_intake.post(changed(point_at_environment))
    # Then the semantic rule is reported at the reference
    assert response.status_code == 422
    errors = response.json()["errors"]
    assert [e["path"] for e in errors] == ["/public_ips/0/port_mappings/0/vms/0"]
    assert "env_1" in errors[0]["message"] and "environment" in errors[0]["message"]
    sqlite_intake.assert_nothing_stored()


@pytest.mark.parametrize(("body", "fragment"), [
    (b"{not json", "not valid JSON"),
    (b"", "not valid JSON"),
    (b'{"version": NaN}', "NaN is not a JSON value"),
    (b'{"version": -Infinity}', "-Infinity is not a JSON value"),
    ("{\"customer\": \"caf\u00e9\"}".encode("latin-1"), "not UTF-8"),
    (b"\xef\xbb\xbf{}", "not valid JSON"),
    (b"[" * 100_000 + b"]" * 100_000, "too deeply"),
    (b'{"version": ' + b"9" * 5000 + b"}", "not valid JSON"),
    (b"[]", "expected an object"),
], ids=["syntax", "empty", "nan", "infinity", "latin-1", "bom", "deep", "huge-int", "array"])
def test_body_that_is_not_a_json_object_is_422_at_the_root(sqlite_intake: Intake, body: bytes,
                                                           fragment: str) -> None:
    response = sqlite_intake.post(body)
    assert response.status_code == 422
    errors = response.json()["errors"]
    assert errors[0]["path"] == "" and fragment in errors[0]["message"], errors
    sqlite_intake.assert_nothing_stored()


@pytest.mark.parametrize("key", ["", "x" * 201, "two words", "tab\there"])
def test_malformed_idempotency_key_is_422(sqlite_intake: Intake, key: str) -> None:
    response = sqlite_intake.post(EXAMPLE_BODY, **{"Idempotency-Key": key})
    assert response.status_code == 422
    assert response.json()["errors"][0]["path"] == "/header/Idempotency-Key"
    sqlite_intake.assert_nothing_stored()
