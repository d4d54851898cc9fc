"""The migration document's bounds: every number and list has a maximum, every label and
name refuses invisible characters, and each refusal names its JSON Pointer."""

from __future__ import annotations

import copy
import json
import re
import struct
from collections.abc import Callable
from typing import Any

import pytest

from services.intake.uploads import MAX_BODY_BYTES
from shared.document import (
    ERRORS_KEPT,
    MAX_DISKS,
    MAX_ENTITIES,
    MAX_FILESYSTEMS,
    MAX_MEMORY_MIB,
    MAX_MOVES,
    MAX_PORT_MAPPINGS,
    MAX_REPLICAS,
    MAX_SIZE_GIB,
    MAX_VCPUS,
    DocumentError,
    DocumentInvalidError,
    document_json_schema,
    validate_document,
)
from shared.document_schema import MAX_FILESYSTEMS_IN_ALL, MAX_PORT_TARGETS_IN_ALL
from tests.unit.intake.rule_cases import EXAMPLE_PATH, EXPECTED_PATH, errors_by_case

EXAMPLE: dict[str, Any] = json.loads(EXAMPLE_PATH.read_text())
Mutation = Callable[[dict[str, Any]], object]


def mutated(mutate: Mutation) -> dict[str, Any]:
    document = copy.deepcopy(EXAMPLE)
    mutate(document)
    return document


def errors_of(raw: object) -> DocumentInvalidError:
    with pytest.raises(DocumentInvalidError) as caught:
        validate_document(raw)
    return caught.value


def only_error(raw: object) -> DocumentError:
    invalid = errors_of(raw)
    assert len(invalid.errors) == 1, invalid.errors
    return invalid.errors[0]


def fs(d: dict[str, Any]) -> dict[str, Any]:
    found: dict[str, Any] = d["vms"][0]["disks"][1]["filesystems"][0]
    return found


def mapping(d: dict[str, Any]) -> dict[str, Any]:
    found: dict[str, Any] = d["public_ips"][0]["port_mappings"][0]
    return found


def test_the_example_is_within_every_bound() -> None:
    # the negative control for everything below
    validate_document(copy.deepcopy(EXAMPLE))


# --- numbers ---------------------------------------------------------------------------

NUMBERS: list[tuple[str, Callable[[dict[str, Any], int], object], str, int]] = [
    ("memory_mib", lambda d, n: d["vms"][2].update(memory_mib=n), "/vms/2/memory_mib",
     MAX_MEMORY_MIB),
    ("vcpus", lambda d, n: d["vms"][2].update(vcpus=n), "/vms/2/vcpus", MAX_VCPUS),
    ("disk size", lambda d, n: d["vms"][2]["disks"][0].update(size_gib=n),
     "/vms/2/disks/0/size_gib", MAX_SIZE_GIB),
    ("filesystem size", lambda d, n: fs(d).update(size_gib=n),
     "/vms/0/disks/1/filesystems/0/size_gib", MAX_SIZE_GIB),
    ("external port", lambda d, n: mapping(d).update(external_port=n),
     "/public_ips/0/port_mappings/0/external_port", 65535),
    ("internal port", lambda d, n: mapping(d).update(internal_port=n),
     "/public_ips/0/port_mappings/0/internal_port", 65535),
]


@pytest.mark.parametrize(("set_to", "path", "bound"), [n[1:] for n in NUMBERS],
                         ids=[n[0] for n in NUMBERS])
def test_a_number_over_its_bound_is_refused_at_its_path(
        set_to: Callable[[dict[str, Any], int], object], path: str, bound: int) -> None:
    # Given the bound itself (accepted) and one more (refused)
    validate_document(mutated(lambda d: set_to(d, bound)))
    error = only_error(mutated(lambda d: set_to(d, bound + 1)))
    # Then the refusal names the field and the bound
    assert error.path == path
    assert error.message == f"must be at most {bound}, got {bound + 1}"


def test_a_huge_number_is_refused_without_echoing_its_digits() -> None:
    error = only_error(mutated(lambda d: d["vms"][2].update(memory_mib=10**4000)))
    assert error.path == "/vms/2/memory_mib"
    assert error.message == f"must be at most {MAX_MEMORY_MIB}, got an integer of 4001 digits"


# --- lists -----------------------------------------------------------------------------

def _grow(where: Callable[[dict[str, Any]], list[Any]], to: int) -> Mutation:
    def grow(d: dict[str, Any]) -> None:
        items = where(d)
        items[:] = [copy.deepcopy(items[0]) for _ in range(to)]
    return grow


LISTS: list[tuple[str, Callable[[dict[str, Any]], list[Any]], str, int]] = [
    ("environments", lambda d: d["environments"], "/environments", MAX_ENTITIES),
    ("vms", lambda d: d["vms"], "/vms", MAX_ENTITIES),
    ("public_ips", lambda d: d["public_ips"], "/public_ips", MAX_ENTITIES),
    ("database_groups", lambda d: d["database_groups"], "/database_groups", MAX_ENTITIES),
    ("environment vms", lambda d: d["environments"][0]["vms"], "/environments/0/vms",
     MAX_ENTITIES),
    ("disks", lambda d: d["vms"][0]["disks"], "/vms/0/disks", MAX_DISKS),
    ("filesystems", lambda d: d["vms"][0]["disks"][0]["filesystems"],
     "/vms/0/disks/0/filesystems", MAX_FILESYSTEMS),
    ("port_mappings", lambda d: d["public_ips"][0]["port_mappings"],
     "/public_ips/0/port_mappings", MAX_PORT_MAPPINGS),
    ("port mapping vms", lambda d: mapping(d)["vms"], "/public_ips/0/port_mappings/0/vms",
     MAX_ENTITIES),
    ("replicas", lambda d: d["database_groups"][0]["replicas"], "/database_groups/0/replicas",
     MAX_REPLICAS),
    *((name, (lambda d, n=name: d["migration"][n]), f"/migration/{name}", MAX_MOVES)
      for name in ("shared_filesystems", "ip_equivalences", "databases", "local_filesystems")),
]


@pytest.mark.parametrize(("where", "path", "bound"), [n[1:] for n in LISTS],
                         ids=[n[0] for n in LISTS])
def test_a_list_over_its_bound_is_refused_at_its_path(
        where: Callable[[dict[str, Any]], list[Any]], path: str, bound: int) -> None:
    # Given a list of `bound + 1` copies of a valid item (structure alone is over the line)
    invalid = errors_of(mutated(_grow(where, bound + 1)))
    # Then the structural error is the list's length, at the list
    assert [e.model_dump() for e in invalid.errors] == [
        {"path": path, "message": f"may have at most {bound} item(s), got {bound + 1}"}]


def test_a_list_at_its_bound_passes_the_structure() -> None:
    # negative control: at the bound, what is left are the rules (a duid used twice)
    invalid = errors_of(mutated(_grow(lambda d: d["vms"], MAX_ENTITIES)))
    assert all("used twice" in e.message for e in invalid.errors)


TINY: dict[str, object] = {  # the smallest valid item of each list, by the LISTS id
    "environments": {"duid": "a", "name_hint": "a", "vms": []},
    "vms": {"duid": "a", "role": "app", "environment": "a", "memory_mib": 1, "vcpus": 1,
            "disks": [{"size_gib": 1, "filesystems": []}]},
    "public_ips": {"duid": "a", "port_mappings": []},
    "database_groups": {"duid": "a", "engine": "mysql", "version": "1", "master": "a",
                        "replicas": []},
    "environment vms": "a",
    "disks": {"size_gib": 1, "filesystems": []},
    "filesystems": {"mountpoint": "/", "size_gib": 1, "fs_type": "xfs"},
    "port_mappings": {"protocol": "tcp", "external_port": 1, "vms": ["a"], "internal_port": 1},
    "port mapping vms": "a",
    "replicas": "a",
    "shared_filesystems": {"old_environment": "a", "mountpoint": "/", "new_environment": "a"},
    "ip_equivalences": {"old_ip": "1.1.1.1", "new_public_ip": "a"},
    "databases": {"name": "a", "old_master": "a", "old_replica": "a",
                  "new_database_group": "a"},
    "local_filesystems": {"old_vm": "a", "new_vm": "a"},
}


@pytest.mark.parametrize(("name", "where", "bound"), [(n[0], n[1], n[3]) for n in LISTS],
                         ids=[n[0] for n in LISTS])
def test_a_list_one_past_its_bound_still_fits_in_a_body(
        name: str, where: Callable[[dict[str, Any]], list[Any]], bound: int) -> None:
    # Given the example with that list made of bound + 1 of its smallest items, spaced as
    # json.dumps spaces them (as a generator of schema-breaking input sends it)
    def fill(d: dict[str, Any]) -> None:
        where(d)[:] = [TINY[name]] * (bound + 1)

    body = json.dumps(mutated(fill)).encode()
    # Then intake reads it and can answer with the bound (422), not only the size (413)
    assert len(body) <= MAX_BODY_BYTES, (name, len(body))


def test_the_filesystems_of_the_whole_document_are_bounded() -> None:
    # Given VMs whose filesystems are each within their list's bound, but not in sum
    per_vm = MAX_FILESYSTEMS
    vms = MAX_FILESYSTEMS_IN_ALL // per_vm + 1

    def many(d: dict[str, Any]) -> None:
        vm = d["vms"][1]
        vm["disks"][0]["filesystems"] = [
            {"mountpoint": f"/m{n}", "size_gib": 1, "fs_type": "xfs"} for n in range(per_vm)]
        d["vms"][1:2] = [copy.deepcopy(vm) for _ in range(vms)]

    errors = errors_of(mutated(many)).errors
    # Then the rules refuse it at the disk where the sum goes over (vm_1 holds 2 before)
    first_over = next(k for k in range(1, vms + 1) if 2 + per_vm * k > MAX_FILESYSTEMS_IN_ALL)
    assert errors[0] == DocumentError(
        path=f"/vms/{first_over}/disks/0/filesystems",
        message=f"the document holds more than {MAX_FILESYSTEMS_IN_ALL} filesystems in all")


def test_the_vms_named_by_all_port_mappings_are_bounded() -> None:
    targets = EXAMPLE["public_ips"][0]["port_mappings"][0]["vms"]
    copies = MAX_PORT_TARGETS_IN_ALL // MAX_ENTITIES + 1

    def many(d: dict[str, Any]) -> None:
        one = mapping(d)
        one["vms"] = (targets * MAX_ENTITIES)[:MAX_ENTITIES]
        d["public_ips"][0]["port_mappings"] = [
            {**copy.deepcopy(one), "external_port": 1000 + n} for n in range(copies)]

    errors = errors_of(mutated(many)).errors
    assert errors[0] == DocumentError(
        path=f"/public_ips/0/port_mappings/{copies - 1}/vms",
        message=f"the document holds more than {MAX_PORT_TARGETS_IN_ALL} port-mapping "
                "targets in all")


# --- characters ------------------------------------------------------------------------

HIDDEN = [
    ("\x00", "U+0000 (a C0 control character)"),
    ("\x1b", "U+001B (a C0 control character)"),
    ("\x7f", "U+007F (a C1 control character)"),
    ("\x85", "U+0085 (a C1 control character)"),
    ("\u061c", "U+061C ARABIC LETTER MARK (a bidirectional control)"),
    ("\u200e", "U+200E LEFT-TO-RIGHT MARK (a bidirectional control)"),
    ("\u200f", "U+200F RIGHT-TO-LEFT MARK (a bidirectional control)"),
    *((chr(c), f"U+{c:04X} ") for c in range(0x202A, 0x202F)),
    *((chr(c), f"U+{c:04X} ") for c in range(0x2066, 0x206A)),
    ("\u202e", "U+202E RIGHT-TO-LEFT OVERRIDE (a bidirectional control)"),
    ("\u200b", "U+200B ZERO WIDTH SPACE (a zero-width character)"),
    ("\u200c", "U+200C ZERO WIDTH NON-JOINER (a zero-width character)"),
    ("\u200d", "U+200D ZERO WIDTH JOINER (a zero-width character)"),
    ("\u2060", "U+2060 WORD JOINER (a zero-width character)"),
    ("\ufeff", "U+FEFF ZERO WIDTH NO-BREAK SPACE (a zero-width character)"),
    ("\u2028", "U+2028 LINE SEPARATOR (a line or paragraph separator)"),
    ("\U000e0041", "U+E0041 TAG LATIN CAPITAL LETTER A (an invisible tag character)"),
    ("\ud800", "U+D800 (an unpaired surrogate)"),
]
LABELS: list[tuple[Callable[[dict[str, Any], str], object], str]] = [
    (lambda d, v: d["customer"].update(name=v), "/customer/name"),
    (lambda d, v: d["environments"][0].update(name_hint=v), "/environments/0/name_hint"),
]


@pytest.mark.parametrize(("char", "named"), HIDDEN, ids=[f"U+{ord(c):04X}" for c, _ in HIDDEN])
@pytest.mark.parametrize(("set_to", "path"), LABELS, ids=["customer name", "name hint"])
def test_a_label_with_a_hidden_character_is_refused_naming_it(
        char: str, named: str, set_to: Callable[[dict[str, Any], str], object],
        path: str) -> None:
    error = only_error(mutated(lambda d: set_to(d, f"Foo{char}bar")))
    assert error.path == path
    assert f"contains {named}" in error.message and "at character 4" in error.message


@pytest.mark.parametrize("text", ["Föobar & Søns", "株式会社フーバー", "Ünïcode ☃ 🚀 👍🏽",
                                  "שלום עולם", "مرحبا", "e\u0301 combining", "x" * 200])
def test_visible_text_of_any_script_is_a_label(text: str) -> None:
    # negative control: bidi *text* is fine, only the invisible controls are not
    document = validate_document(mutated(lambda d: d["customer"].update(name=text)))
    assert document.customer.name == text


@pytest.mark.parametrize(("set_to", "path", "prefix"), [
    (lambda d, v: d["vms"][0].update(duid=v), "/vms/0/duid", "duid"),
    (lambda d, v: d["customer"].update(id=v), "/customer/id", "name"),
    (lambda d, v: d["migration"]["databases"][0].update(name=v),
     "/migration/databases/0/name", "database name"),
    (lambda d, v: fs(d).update(mountpoint="/" + v), "/vms/0/disks/1/filesystems/0/mountpoint",
     "mountpoint"),
])
def test_a_name_with_a_hidden_character_is_refused_naming_it(
        set_to: Callable[[dict[str, Any], str], object], path: str, prefix: str) -> None:
    error = only_error(mutated(lambda d: set_to(d, "vm\u202e1")))
    assert error.path == path
    assert error.message.startswith(prefix)
    assert "U+202E RIGHT-TO-LEFT OVERRIDE (a bidirectional control)" in error.message


def _utf16_units(text: str) -> str:
    """`text` as an ECMA-262 regex without the u flag sees it: UTF-16 code units."""
    data = text.encode("utf-16-le", "surrogatepass")
    return "".join(chr(u) for u in struct.unpack(f"<{len(data) // 2}H", data))


@pytest.mark.parametrize("text", ["plain", "株式会社 🚀", "\U000e0080 past the tags",
                                  *(f"a{c}b" for c, _ in HIDDEN)])
def test_the_json_schema_label_pattern_agrees_with_the_validator(text: str) -> None:
    pattern = document_json_schema()["$defs"]["Customer"]["properties"]["name"]["pattern"]
    try:
        validate_document(mutated(lambda d: d["customer"].update(name=text)))
        accepted = True
    except DocumentInvalidError:
        accepted = False
    assert (re.fullmatch(pattern, _utf16_units(text)) is not None) is accepted


# --- the rules made linear, and the error cap -----------------------------------------

def test_the_linear_rules_report_what_the_quadratic_ones_did() -> None:
    # Given two small invalid documents and the errors the code before issue 12 reported
    # for them (rules_before_linear.json, written by rule_cases.py from that code)
    expected = json.loads(EXPECTED_PATH.read_text())
    # Then the same errors, in the same order
    assert errors_by_case() == expected
    assert len(expected["semantic"]) > 10  # the control: the cases do break the rules


def test_many_vms_at_one_mountpoint_are_named_five_and_counted() -> None:
    def crowded(d: dict[str, Any]) -> None:
        for vm in d["vms"][1:4]:
            vm["disks"].append(copy.deepcopy(d["vms"][0]["disks"][1]))
        for n in range(5, 9):
            extra = copy.deepcopy(d["vms"][0])
            extra["duid"] = f"vm_{n + 2}"
            d["vms"].append(extra)
            d["environments"][0]["vms"].append(extra["duid"])
        d["migration"]["local_filesystems"].clear()

    error = only_error(mutated(crowded))
    assert error.path == "/migration/shared_filesystems/0"
    assert "has 8 VMs with a filesystem at '/data' (vm_1, vm_2, vm_3, vm_4, vm_7 and 3 more)" \
        in error.message


def test_a_document_wrong_in_many_places_keeps_the_first_errors_and_counts_all() -> None:
    # semantic: every move of 1,000 to a mountpoint nobody has
    moves = [{"old_environment": f"ey04-e{n:05d}", "mountpoint": "/nowhere",
              "new_environment": "env_1"} for n in range(1000)]
    invalid = errors_of(mutated(lambda d: d["migration"].update(shared_filesystems=moves)))
    assert (len(invalid.errors), invalid.total) == (ERRORS_KEPT, 1000)
    assert invalid.errors[-1].path == f"/migration/shared_filesystems/{ERRORS_KEPT - 1}"
    assert "has 1000 error(s)" in str(invalid)
    # structural: 1,000 public IPs that are not objects
    invalid = errors_of(mutated(lambda d: d.update(public_ips=[0] * 1000)))
    assert (len(invalid.errors), invalid.total) == (ERRORS_KEPT, 1000)
