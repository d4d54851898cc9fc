"""What intake refuses before it stores anything: a document with a key given twice, and
the size of what it answers for a document that is wrong in very many places."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import func, select

from services.intake.api import MAX_PROBLEMS, create_app
from services.intake.tables import migrations
from shared.document import MAX_ENTITIES
from shared.inbox_outbox import outbox_table
from shared.settings import Settings

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = (ROOT / "examples" / "migration.json").read_text()
TOKEN = "limits-token-7c2e"
HEADERS = {"Content-Type": "application/json", "Authorization": f"Bearer {TOKEN}"}


@pytest.fixture
def client(tmp_path: Path) -> Iterator[TestClient]:
    app = create_app(Settings(intake_database_url=f"sqlite:///{tmp_path}/intake.sqlite3",
                              api_token=TOKEN))
    with TestClient(app) as client:
        yield client
    app.state.engine.dispose()


def stored(client: TestClient) -> tuple[int, int]:
    engine = client.app.state.engine  # type: ignore[attr-defined]
    with engine.connect() as connection:
        return (connection.execute(select(func.count()).select_from(migrations)).scalar_one(),
                connection.execute(select(func.count()).select_from(outbox_table)).scalar_one())


def with_second_customer(text: str) -> str:
    """The example with a second, different `customer` object after the first: a parser
    that lets the last one win would read another customer's migration."""
    document = json.loads(text)
    other = json.dumps({**document["customer"], "id": "someone-else"})
    assert text.rstrip().endswith("}")
    return text.rstrip()[:-1] + f', "customer": {other}}}'


def test_a_key_given_twice_is_a_422_naming_the_key_and_nothing_is_stored(
        client: TestClient) -> None:
    # Given the example document, valid as it is (control: it is accepted)
    assert client.post("/migrations", content=EXAMPLE, headers=HEADERS).status_code == 202
    before = stored(client)
    # When the same document carries a second `customer` object
    answer = client.post("/migrations", content=with_second_customer(EXAMPLE), headers=HEADERS)
    # Then it is refused, naming the key and the object that has it, and nothing is stored
    assert answer.status_code == 422, answer.text
    assert answer.json()["errors"] == [
        {"path": "", "message": "the key 'customer' appears more than once in this object"}]
    assert stored(client) == before


def test_a_repeated_key_deep_inside_is_named_by_its_json_pointer(client: TestClient) -> None:
    document = json.loads(EXAMPLE)
    first_vm = json.dumps(document["vms"][0])
    assert first_vm in json.dumps(document)  # the serialisation below finds it
    text = json.dumps(document).replace(first_vm, first_vm[:-1] + ', "memory_mib": 1}', 1)
    answer = client.post("/migrations", content=text, headers=HEADERS)
    assert answer.status_code == 422, answer.text
    assert answer.json()["errors"] == [
        {"path": "/vms/0", "message": "the key 'memory_mib' appears more than once in this "
                                      "object"}]


def test_the_error_list_is_capped_and_says_how_many_there_were(client: TestClient) -> None:
    # Given a document with as many wrong public IPs as it may have
    document = json.loads(EXAMPLE)
    document["public_ips"] = [0] * MAX_ENTITIES
    # When it is posted
    body = json.dumps(document, separators=(",", ":"))
    answer = client.post("/migrations", content=body, headers=HEADERS)
    # Then the answer lists the first MAX_PROBLEMS, counts them all, and stays small
    assert answer.status_code == 422, answer.text[:500]
    reply = answer.json()
    assert len(reply["errors"]) == MAX_PROBLEMS and reply["truncated"] is True
    assert reply["total"] == MAX_ENTITIES
    assert reply["errors"][0] == {"path": "/public_ips/0", "message": "expected an object, got 0"}
    assert len(answer.content) < 64 * 1024
    assert stored(client) == (0, 0)


def test_an_array_over_its_bound_is_one_error_naming_the_bound(client: TestClient) -> None:
    # Given half a million wrong public IPs (each of which pydantic would judge)
    document = json.loads(EXAMPLE)
    document["public_ips"] = [0] * 500_000
    answer = client.post("/migrations", content=json.dumps(document, separators=(",", ":")),
                         headers=HEADERS)
    # Then the one problem is the array's length
    assert answer.status_code == 422, answer.text[:500]
    reply = answer.json()
    assert reply["total"] == 1 and reply["errors"] == [{
        "path": "/public_ips",
        "message": f"may have at most {MAX_ENTITIES} item(s), got 500000"}]
    assert stored(client) == (0, 0)


def test_a_short_error_list_is_whole(client: TestClient) -> None:
    document = json.loads(EXAMPLE)
    document["public_ips"] = [0, 0]
    answer = client.post("/migrations", content=json.dumps(document), headers=HEADERS)
    assert answer.status_code == 422
    reply = answer.json()
    assert reply["truncated"] is False and reply["total"] == len(reply["errors"]) >= 2
