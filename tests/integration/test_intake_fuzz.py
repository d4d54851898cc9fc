"""Generated input against intake's API: no request, however odd, gets a 500.

schemathesis drives every operation of the app's own OpenAPI schema with data that fits
it and data that breaks it; hypothesis mutates the example document and POSTs it.
"""

from __future__ import annotations

import copy
import json
import tempfile
from collections.abc import Iterator
from typing import Any

import pytest
import schemathesis
from fastapi import FastAPI
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from schemathesis import Case, GenerationMode
from schemathesis.schemas import BaseSchema
from schemathesis.specs.openapi.checks import positive_data_acceptance

from services.intake.api import create_app
from shared.settings import Settings
from tests.integration.test_intake_api import AUTH, EXAMPLE, JSON, TOKEN

OPERATIONS = [
    ("POST", "/migrations"),
    ("GET", "/migrations"),
    ("GET", "/migrations/{migration_id}"),
    ("GET", "/migrations/{migration_id}/document"),
    ("GET", "/migrations/{migration_id}/stats"),
    ("GET", "/stats"),
    ("GET", "/schema/migration-document"),
    ("GET", "/healthz"),
]
# The JSON Schema describes the document's structure only: a schema-valid document can still
# break a cross-reference rule (a dangling duid), so "schema-valid means accepted" does not
# hold here by design. Every other check (no 5xx, documented status codes and bodies,
# negative data rejected, auth enforced) runs.
NOT_APPLICABLE = [positive_data_acceptance]
FUZZ = settings(max_examples=50, deadline=None, database=None,
                suppress_health_check=list(HealthCheck))


@pytest.fixture(scope="module")
def app() -> Iterator[FastAPI]:
    with tempfile.TemporaryDirectory(prefix="intake-fuzz-") as directory:
        app = create_app(Settings(intake_database_url=f"sqlite:///{directory}/fuzz.sqlite3",
                                  api_token=TOKEN))
        yield app
        app.state.engine.dispose()


@pytest.fixture(scope="module")
def api_schema(app: FastAPI) -> BaseSchema:
    schema = schemathesis.openapi.from_asgi("/openapi.json", app)
    # Schema-breaking data may be larger than the body limit (a list one past its maxItems,
    # of large generated items): 413, documented for POST /migrations, refuses it too.
    schema.config.checks.negative_data_rejection.expected_statuses.append("413")
    return schema


def test_every_operation_is_fuzzed(api_schema: BaseSchema) -> None:
    found = {(op.ok().method.upper(), op.ok().path) for op in api_schema.get_all_operations()}
    assert found == set(OPERATIONS)


# Operations without parameters have no schema-breaking input to generate: positive only.
CASES = [(method, path, mode) for method, path in OPERATIONS
         for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE)
         if mode == GenerationMode.POSITIVE or "migrations" in path]


@pytest.mark.parametrize(("method", "path", "mode"), CASES)
def test_generated_requests_never_get_a_server_error(
        api_schema: BaseSchema, method: str, path: str, mode: GenerationMode) -> None:
    operation = api_schema[path][method]

    @FUZZ
    @given(case=operation.as_strategy(generation_mode=mode))
    def check(case: Case) -> None:
        case.call_and_validate(headers=AUTH, excluded_checks=NOT_APPLICABLE)

    check()


# --- the example, mutated -------------------------------------------------------------------

JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats() | st.text(max_size=20)
    | st.sampled_from(["vm_1", "env_1", "ip_1", "db_1", "/data", "/", "../etc", "a;rm -rf /",
                      "$(reboot)", "ey04-s50000", "", "\x00", "\ud800", "203.0.113.10"]),
    lambda children: st.lists(children, max_size=3)
    | st.dictionaries(st.text(max_size=8), children, max_size=3),
    max_leaves=8,
)


def node_paths(node: Any, path: tuple[Any, ...] = ()) -> Iterator[tuple[Any, ...]]:
    yield path
    if isinstance(node, dict):
        for key, child in node.items():
            yield from node_paths(child, (*path, key))
    elif isinstance(node, list):
        for index, child in enumerate(node):
            yield from node_paths(child, (*path, index))


def mutate(document: dict[str, Any], data: st.DataObject) -> None:
    """One change at one place: a new value, a removal, an unknown field, a duplicate."""
    path = data.draw(st.sampled_from(list(node_paths(document))[1:]), label="path")
    parent = document
    for part in path[:-1]:
        parent = parent[part]
    last = path[-1]
    how = data.draw(st.sampled_from(["replace", "remove", "add", "duplicate"]), label="how")
    if how == "replace":
        parent[last] = data.draw(JSON_VALUES, label="value")
    elif how == "remove":
        del parent[last]
    elif how == "add" and isinstance(parent, dict):
        parent[data.draw(st.text(max_size=8), label="key")] = data.draw(JSON_VALUES)
    elif isinstance(parent, list):
        parent.insert(last, copy.deepcopy(parent[last]))
    else:
        parent[last] = copy.deepcopy(parent[last])


@pytest.fixture(scope="module")
def client(app: FastAPI) -> Iterator[TestClient]:
    with TestClient(app) as client:
        yield client


def test_mutated_example_is_accepted_or_refused_never_a_server_error(
        client: TestClient) -> None:
    @settings(max_examples=150, deadline=None, database=None,
              suppress_health_check=list(HealthCheck))
    @given(data=st.data())
    def check(data: st.DataObject) -> None:
        # Given the example changed in one to three places
        document = copy.deepcopy(EXAMPLE)
        for _ in range(data.draw(st.integers(1, 3), label="changes")):
            mutate(document, data)
        body = json.dumps(document, ensure_ascii=data.draw(st.booleans())).encode(
            "utf-8", "surrogatepass")
        # When it is POSTed
        response = client.post("/migrations", content=body, headers={**JSON, **AUTH})
        # Then it is accepted (and stored as sent) or refused with errors that say where
        assert response.status_code in (202, 422), (response.status_code, response.text)
        if response.status_code == 202:
            stored = client.get(f"{response.json()['status_url']}/document", headers=AUTH)
            assert stored.content == body
        else:
            errors = response.json()["errors"]
            assert errors and all(e["message"] for e in errors)
            assert all(e["path"] == "" or e["path"].startswith("/") for e in errors)

    check()
