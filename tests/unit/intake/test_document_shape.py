"""The cheap first pass over a document's containers (shared.document_shape): it answers
for what would make pydantic slow, and leaves every other document to pydantic."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from shared.document import MAX_DISKS, DocumentInvalidError, validate_document
from shared.document_shape import MANY, shape_errors

EXAMPLE = json.loads((Path(__file__).resolve().parents[3] / "examples/migration.json")
                     .read_text())


def test_a_valid_document_is_left_to_pydantic() -> None:
    assert shape_errors(EXAMPLE) is None
    validate_document(EXAMPLE)


def test_nested_wrong_items_within_their_bounds_are_counted_all() -> None:
    # Given every VM's disks replaced by as many non-objects as a VM may have
    document = json.loads(json.dumps(EXAMPLE))
    document["vms"] = [{**document["vms"][0], "disks": [0] * MAX_DISKS} for _ in range(40)]
    wrong = len(document["vms"]) * MAX_DISKS
    assert wrong > MANY
    # Then the shape pass answers: the first 100, every one counted
    with pytest.raises(DocumentInvalidError) as raised:
        validate_document(document)
    assert raised.value.total == wrong and len(raised.value.errors) == 100
    assert raised.value.errors[0].path == "/vms/0/disks/0"


def test_a_few_shape_problems_get_pydantics_whole_list() -> None:
    # Given one wrong public IP and a missing customer name: few problems
    document = json.loads(json.dumps(EXAMPLE))
    document["public_ips"][0] = 0
    del document["customer"]["name"]
    # Then pydantic judges it, and both are reported (the shape pass would see only one)
    assert shape_errors(document) is None
    with pytest.raises(DocumentInvalidError) as raised:
        validate_document(document)
    paths = {error.path for error in raised.value.errors}
    assert {"/public_ips/0", "/customer/name"} <= paths
