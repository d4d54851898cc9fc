"""The migration document: the example is accepted, and every broken rule is named by pointer."""

from __future__ import annotations

import copy
import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import TypeAdapter, ValidationError

from shared.document import (
    MOUNTPOINT_PATTERN,
    DocumentError,
    DocumentInvalidError,
    MigrationDocument,
    Mountpoint,
    canonical_json,
    document_json_schema,
    json_pointer,
    validate_document,
)
from shared.errors import PermanentError

EXAMPLE_PATH = Path(__file__).resolve().parents[3] / "examples" / "migration.json"
EXAMPLE: dict[str, Any] = json.loads(EXAMPLE_PATH.read_text())

Mutation = Callable[[dict[str, Any]], object]


def mutated(mutate: Mutation) -> dict[str, Any]:
    document = copy.deepcopy(EXAMPLE)
    mutate(document)
    return document


def errors_of(raw: object) -> list[DocumentError]:
    with pytest.raises(DocumentInvalidError) as caught:
        validate_document(raw)
    assert caught.value.errors, "DocumentInvalidError must carry at least one error"
    return caught.value.errors


def only_error(raw: object) -> DocumentError:
    errors = errors_of(raw)
    assert len(errors) == 1, errors
    return errors[0]


def error_at(raw: object, path: str) -> DocumentError:
    errors = errors_of(raw)
    found = [error for error in errors if error.path == path]
    assert found, f"no error at {path!r} in {errors}"
    return found[0]


def vm_1_data(document: dict[str, Any]) -> dict[str, Any]:
    filesystem: dict[str, Any] = document["vms"][0]["disks"][1]["filesystems"][0]
    return filesystem


# --- the example -------------------------------------------------------------------------


def test_example_document_is_accepted() -> None:
    # Given the example from the field report / When it is validated
    document = validate_document(copy.deepcopy(EXAMPLE))
    # Then every part of it is there
    assert isinstance(document, MigrationDocument)
    assert [vm.duid for vm in document.vms] == [f"vm_{n}" for n in range(1, 7)]
    assert document.migration.shared_filesystems[0].new_environment == "env_1"
    assert document.migration.databases[0].name == "foobar_production"
    assert [m.old_vm for m in document.migration.local_filesystems] == [
        "ey04-s50000",
        "ey04-s50001",
        "ey04-s50002",
        "ey04-s50003",
    ]


def test_canonical_json_does_not_depend_on_key_order() -> None:
    # Given the example and the same document with every object's keys reversed
    def reverse_keys(value: Any) -> Any:
        if isinstance(value, dict):
            return {key: reverse_keys(value[key]) for key in reversed(list(value))}
        if isinstance(value, list):
            return [reverse_keys(item) for item in value]
        return value

    # When both are validated and written canonically
    first = canonical_json(validate_document(copy.deepcopy(EXAMPLE)))
    second = canonical_json(validate_document(reverse_keys(EXAMPLE)))
    # Then the texts are identical and parse back to the same document
    assert first == second
    assert canonical_json(validate_document(json.loads(first))) == first


def test_json_schema_describes_the_document_and_forbids_unknown_fields() -> None:
    # When the schema is asked for
    schema = document_json_schema()
    # Then it is JSON, lists the top-level fields and closes every object
    json.dumps(schema)
    assert set(schema["required"]) == {
        "version",
        "customer",
        "environments",
        "vms",
        "public_ips",
        "database_groups",
        "migration",
    }
    assert schema["additionalProperties"] is False
    assert all(d["additionalProperties"] is False for d in schema["$defs"].values())
    assert schema["$defs"]["Filesystem"]["properties"]["mountpoint"]["pattern"]


# --- structure ---------------------------------------------------------------------------


def test_document_that_is_not_an_object_is_reported_at_the_root() -> None:
    # When an array is submitted / Then the root pointer "" names it
    error = only_error([])
    assert error.path == ""
    assert "expected an object" in error.message


def test_missing_field_is_reported_at_its_pointer() -> None:
    error = only_error(mutated(lambda d: d["vms"][1].pop("memory_mib")))
    assert error.path == "/vms/1/memory_mib"
    assert "required field 'memory_mib' is missing" in error.message


@pytest.mark.parametrize(
    ("mutate", "path"),
    [
        (lambda d: d.update(colour="red"), "/colour"),
        (lambda d: d["vms"][2].update(colour="red"), "/vms/2/colour"),
        (lambda d: vm_1_data(d).update(colour="red"), "/vms/0/disks/1/filesystems/0/colour"),
        (lambda d: d["migration"].update(colour="red"), "/migration/colour"),
    ],
)
def test_unknown_field_is_rejected_with_its_pointer(mutate: Mutation, path: str) -> None:
    # Given a field the format does not know / Then it is an error, not silently ignored
    error = only_error(mutated(mutate))
    assert error.path == path
    assert error.message == "unknown field 'colour'"


def test_pointer_escapes_tilde_and_slash_in_field_names() -> None:
    # Given an unknown field named with both characters RFC 6901 escapes
    error = only_error(mutated(lambda d: d["customer"].update({"a/b~c": 1})))
    # Then "~" becomes "~0" and "/" becomes "~1"
    assert error.path == "/customer/a~1b~0c"


def test_json_pointer_escapes_tilde_before_slash() -> None:
    assert json_pointer() == ""
    assert json_pointer("vms", 2, "memory_mib") == "/vms/2/memory_mib"
    assert json_pointer("~1") == "/~01"
    assert json_pointer("a/b") == "/a~1b"


@pytest.mark.parametrize(
    ("mutate", "path", "fragment"),
    [
        (lambda d: d["vms"][2].update(memory_mib=0), "/vms/2/memory_mib", "greater than 0, got 0"),
        (lambda d: d["vms"][2].update(vcpus=-1), "/vms/2/vcpus", "greater than 0, got -1"),
        (lambda d: d["vms"][2].update(memory_mib="512"), "/vms/2/memory_mib", "integer"),
        (lambda d: d["vms"][2].update(vcpus=True), "/vms/2/vcpus", "integer, got true"),
        (lambda d: d["vms"][2]["disks"][0].update(size_gib=0), "/vms/2/disks/0/size_gib", "0"),
        (
            lambda d: vm_1_data(d).update(size_gib=0),
            "/vms/0/disks/1/filesystems/0/size_gib",
            "greater than 0",
        ),
        (
            lambda d: vm_1_data(d).update(fs_type="ntfs"),
            "/vms/0/disks/1/filesystems/0/fs_type",
            "'ext3', 'ext4', 'xfs' or 'reiserfs', got 'ntfs'",
        ),
        (lambda d: d["vms"][2].update(role="wizard"), "/vms/2/role", "got 'wizard'"),
        (lambda d: d["vms"][2].update(disks=[]), "/vms/2/disks", "at least 1"),
        (lambda d: d.update(version=2), "/version", "must be 1, got 2"),
        (lambda d: d.update(version=True), "/version", "integer 1, got true"),
        (lambda d: d.update(vms={}), "/vms", "expected an array, got an object"),
    ],
)
def test_vm_shape_is_checked(mutate: Mutation, path: str, fragment: str) -> None:
    error = only_error(mutated(mutate))
    assert error.path == path
    assert fragment in error.message


def port_mapping(d: dict[str, Any], n: int = 0) -> dict[str, Any]:
    mapping: dict[str, Any] = d["public_ips"][0]["port_mappings"][n]
    return mapping


@pytest.mark.parametrize(
    ("mutate", "path", "fragment"),
    [
        (lambda d: port_mapping(d).update(external_port=0), "/external_port", "got 0"),
        (lambda d: port_mapping(d).update(external_port=65536), "/external_port", "65536"),
        (lambda d: port_mapping(d).update(internal_port=0), "/internal_port", "got 0"),
        (lambda d: port_mapping(d).update(internal_port=70000), "/internal_port", "70000"),
        (lambda d: port_mapping(d).update(protocol="sctp"), "/protocol", "got 'sctp'"),
        (lambda d: port_mapping(d).update(vms=[]), "/vms", "at least 1 item(s), got 0"),
    ],
)
def test_port_mapping_shape_is_checked(mutate: Mutation, path: str, fragment: str) -> None:
    error = only_error(mutated(mutate))
    assert error.path == "/public_ips/0/port_mappings/0" + path
    assert fragment in error.message


@pytest.mark.parametrize(
    ("field", "value", "fragment"),
    [
        ("engine", "oracle", "'mysql' or 'postgresql', got 'oracle'"),
        ("version", "five", "version 'five' does not match"),
        ("version", "5.0.51; rm", "version '5.0.51; rm' does not match"),
    ],
)
def test_database_group_shape_is_checked(field: str, value: str, fragment: str) -> None:
    error = only_error(mutated(lambda d: d["database_groups"][0].update({field: value})))
    assert error.path == f"/database_groups/0/{field}"
    assert fragment in error.message


def test_database_group_accepts_postgresql_and_a_lettered_version() -> None:
    document = mutated(
        lambda d: d["database_groups"][0].update(engine="postgresql", version="5.0.51a")
    )
    assert validate_document(document).database_groups[0].engine == "postgresql"


@pytest.mark.parametrize(
    ("old_ip", "fragment"),
    [
        ("300.1.1.1", "'300.1.1.1' is not an IPv4 or IPv6 address"),
        ("ey04-ip", "is not an IPv4 or IPv6 address"),
        ("127.0.0.1", "not a usable public IP address"),
        ("0.0.0.0", "not a usable public IP address"),  # noqa: S104 - the value under test
        ("2001:db8::1%eth0", "scope id"),
    ],
)
def test_old_ip_must_be_a_real_address(old_ip: str, fragment: str) -> None:
    document = mutated(lambda d: d["migration"]["ip_equivalences"][0].update(old_ip=old_ip))
    error = only_error(document)
    assert error.path == "/migration/ip_equivalences/0/old_ip"
    assert fragment in error.message


def test_old_ipv6_address_is_accepted_in_one_spelling() -> None:
    document = mutated(
        lambda d: d["migration"]["ip_equivalences"][0].update(old_ip="2001:0DB8:0::10")
    )
    assert validate_document(document).migration.ip_equivalences[0].old_ip == "2001:db8::10"


# --- names -------------------------------------------------------------------------------

HOST_NAME_PLACES: list[tuple[Mutation, str]] = [
    (lambda d: d["customer"].update(id=BAD), "/customer/id"),
    (
        lambda d: d["migration"]["shared_filesystems"][0].update(old_environment=BAD),
        "/migration/shared_filesystems/0/old_environment",
    ),
    (
        lambda d: d["migration"]["local_filesystems"][0].update(old_vm=BAD),
        "/migration/local_filesystems/0/old_vm",
    ),
    (
        lambda d: d["migration"]["databases"][0].update(old_master=BAD),
        "/migration/databases/0/old_master",
    ),
    (
        lambda d: d["migration"]["databases"][0].update(old_replica=BAD),
        "/migration/databases/0/old_replica",
    ),
]
BAD = "ey04-s50000;reboot"


@pytest.mark.parametrize(("mutate", "path"), HOST_NAME_PLACES)
def test_old_host_names_must_be_plain_names(mutate: Mutation, path: str) -> None:
    error = only_error(mutated(mutate))
    assert error.path == path
    assert "'ey04-s50000;reboot' does not match" in error.message


@pytest.mark.parametrize(
    "name", ["EY04-s50000", "-rf", "ey04_s50000", "", "a" * 64, "ey04 s50000", "ey04\n"]
)
def test_host_name_patterns_reject_capitals_leading_dash_underscore_and_length(name: str) -> None:
    error = only_error(
        mutated(lambda d: d["migration"]["local_filesystems"][0].update(old_vm=name))
    )
    assert error.path == "/migration/local_filesystems/0/old_vm"
    assert "does not match ^[a-z0-9][a-z0-9.-]{0,62}$" in error.message


@pytest.mark.parametrize("name", ["Foobar", "foobar production", "_foobar", "foo$bar", "a" * 64])
def test_database_names_must_be_plain_names(name: str) -> None:
    error = only_error(mutated(lambda d: d["migration"]["databases"][0].update(name=name)))
    assert error.path == "/migration/databases/0/name"
    assert "database name" in error.message
    assert "does not match" in error.message


@pytest.mark.parametrize("duid", ["VM_7", "vm 7", "-vm", "a" * 64, "vm/7"])
def test_duids_must_be_plain_identifiers(duid: str) -> None:
    error = error_at(mutated(lambda d: d["public_ips"][0].update(duid=duid)), "/public_ips/0/duid")
    assert f"duid {duid!r} does not match" in error.message


@pytest.mark.parametrize(
    ("name", "fragment"),
    [
        ("x" * 201, "1 to 200 characters"),
        ("", "1 to 200 characters"),
        ("Foobar\x07 Inc.", "control character"),
        ("Foobar\nInc.", "control character"),
        ("Foobar\ud800", "unpaired surrogate"),
    ],
)
def test_customer_name_is_bounded_free_text(name: str, fragment: str) -> None:
    error = only_error(mutated(lambda d: d["customer"].update(name=name)))
    assert error.path == "/customer/name"
    assert fragment in error.message


def test_customer_name_may_be_any_printable_text_up_to_200_characters() -> None:
    for name in ['Föobar & Søns, Inc. ("the best")', "x" * 200]:
        raw = copy.deepcopy(EXAMPLE)
        raw["customer"]["name"] = name
        assert validate_document(raw).customer.name == name


# --- mountpoints -------------------------------------------------------------------------

BAD_MOUNTPOINTS = [
    ("data", "not absolute"),
    ("", "not absolute"),
    ("$(id)", "not absolute"),
    ("/data; touch /tmp/pwned", "';'"),
    ("/$(id)", "'$'"),
    ("/data/`id`", "'`'"),
    ("/da ta", "' '"),
    ("/da'ta", '"\'"'),
    ('/da"ta', "'\"'"),
    ("/a|b", "'|'"),
    ("/a&b", "'&'"),
    ("/da\x00ta", "'\\x00'"),
    ("/da\nta", "'\\n'"),
    ("/data/../etc", "'..' segment"),
    ("/./data", "'.' or '..' segment"),
    ("/data/..", "'..' segment"),
    ("//data", "'//'"),
    ("/data//x", "'//'"),
    ("/data/", "ends with '/'"),
]


@pytest.mark.parametrize(("mountpoint", "fragment"), BAD_MOUNTPOINTS)
def test_unsafe_or_unnormalised_filesystem_mountpoint_is_rejected(
    mountpoint: str, fragment: str
) -> None:
    # Given a VM filesystem whose mountpoint would be dangerous in a command, or ambiguous
    error = only_error(mutated(lambda d: vm_1_data(d).update(mountpoint=mountpoint)))
    # Then it is rejected at its pointer, naming the value and what is wrong with it
    assert error.path == "/vms/0/disks/1/filesystems/0/mountpoint"
    assert f"mountpoint {mountpoint!r}" in error.message
    assert fragment in error.message


@pytest.mark.parametrize(("mountpoint", "fragment"), BAD_MOUNTPOINTS)
def test_unsafe_or_unnormalised_shared_filesystem_mountpoint_is_rejected(
    mountpoint: str, fragment: str
) -> None:
    document = mutated(
        lambda d: d["migration"]["shared_filesystems"][0].update(mountpoint=mountpoint)
    )
    error = only_error(document)
    assert error.path == "/migration/shared_filesystems/0/mountpoint"
    assert fragment in error.message


@pytest.mark.parametrize("mountpoint", ["/srv/assets", "/.hidden", "/a..b", "/...", "/A_b-c.d"])
def test_normalised_mountpoints_of_safe_characters_are_accepted(mountpoint: str) -> None:
    def move_data_to(d: dict[str, Any]) -> None:
        vm_1_data(d).update(mountpoint=mountpoint)
        d["migration"]["shared_filesystems"][0].update(mountpoint=mountpoint)

    assert validate_document(mutated(move_data_to)).vms[0].disks[1].filesystems[0].mountpoint


@settings(max_examples=300)
@given(st.text(alphabet="/.a_-;$ \x00\n", max_size=10))
def test_schema_mountpoint_pattern_agrees_with_the_validator(candidate: str) -> None:
    # Given any short path-like text / Then the schema's regex and the validator agree on it
    try:
        TypeAdapter(Mountpoint).validate_python(candidate)
        accepted = True
    except ValidationError:
        accepted = False
    assert accepted == (re.fullmatch(MOUNTPOINT_PATTERN, candidate) is not None)


# --- references and duids ----------------------------------------------------------------


def test_duid_used_twice_is_reported_with_both_places() -> None:
    # Given a public IP that takes a VM's duid
    document = mutated(lambda d: d["public_ips"][0].update(duid="vm_1"))
    # Then the second use is an error pointing back at the first
    error = error_at(document, "/public_ips/0/duid")
    assert error.message == "duid 'vm_1' is used twice (also at /vms/0/duid)"


def test_duid_used_twice_by_the_same_kind_is_reported() -> None:
    document = mutated(lambda d: d["environments"][1].update(duid="env_1"))
    error = error_at(document, "/environments/1/duid")
    assert "duid 'env_1' is used twice (also at /environments/0/duid)" == error.message


@pytest.mark.parametrize(
    ("mutate", "path", "fragment"),
    [
        (
            lambda d: port_mapping(d)["vms"].__setitem__(0, "env_1"),
            "/public_ips/0/port_mappings/0/vms/0",
            "port mapping target 'env_1' is an environment (at /environments/0/duid), not a VM",
        ),
        (
            lambda d: port_mapping(d)["vms"].__setitem__(0, "vm_99"),
            "/public_ips/0/port_mappings/0/vms/0",
            "port mapping target 'vm_99' is not a duid declared in this document",
        ),
        (
            lambda d: d["environments"][0]["vms"].append("ip_1"),
            "/environments/0/vms/4",
            "environment member 'ip_1' is a public IP",
        ),
        (
            lambda d: d["database_groups"][0].update(master="ip_1"),
            "/database_groups/0/master",
            "database master 'ip_1' is a public IP (at /public_ips/0/duid), not a VM",
        ),
        (
            lambda d: d["database_groups"][0].update(replicas=["env_2"]),
            "/database_groups/0/replicas/0",
            "database replica 'env_2' is an environment",
        ),
        (
            lambda d: d["migration"]["shared_filesystems"][0].update(new_environment="vm_1"),
            "/migration/shared_filesystems/0/new_environment",
            "shared filesystem target 'vm_1' is a VM (at /vms/0/duid), not an environment",
        ),
        (
            lambda d: d["migration"]["ip_equivalences"][0].update(new_public_ip="db_1"),
            "/migration/ip_equivalences/0/new_public_ip",
            "'db_1' is a database group (at /database_groups/0/duid), not a public IP",
        ),
        (
            lambda d: d["migration"]["databases"][0].update(new_database_group="env_2"),
            "/migration/databases/0/new_database_group",
            "database target 'env_2' is an environment (at /environments/1/duid), "
            "not a database group",
        ),
        (
            lambda d: d["migration"]["local_filesystems"][0].update(new_vm="env_1"),
            "/migration/local_filesystems/0/new_vm",
            "local filesystem target 'env_1' is an environment",
        ),
    ],
)
def test_reference_must_name_an_existing_entity_of_the_right_kind(
    mutate: Mutation, path: str, fragment: str
) -> None:
    error = only_error(mutated(mutate))
    assert error.path == path
    assert fragment in error.message


def test_vm_environment_must_be_an_environment() -> None:
    # Given a VM that names a database group as its environment
    document = mutated(lambda d: d["vms"][0].update(environment="db_1"))
    # Then that reference is wrong, and env_1's listing of vm_1 disagrees with it
    error = error_at(document, "/vms/0/environment")
    assert error.message == (
        "environment 'db_1' is a database group (at /database_groups/0/duid), not an environment"
    )
    assert "VM's environment is 'db_1'" in error_at(document, "/environments/0/vms/0").message


def test_vm_and_environment_must_agree_on_membership() -> None:
    # Given vm_4 claiming env_2 while env_1 lists it and env_2 does not
    errors = errors_of(mutated(lambda d: d["vms"][3].update(environment="env_2")))
    # Then both sides of the disagreement are reported
    assert {(e.path, e.message) for e in errors} == {
        (
            "/vms/3/environment",
            "vm 'vm_4' says it is in environment 'env_2', but that environment does not list it",
        ),
        (
            "/environments/0/vms/3",
            "environment 'env_1' lists vm 'vm_4', but that VM's environment is 'env_2'",
        ),
    }


def test_vm_listed_by_a_second_environment_is_reported() -> None:
    error = only_error(mutated(lambda d: d["environments"][1]["vms"].append("vm_1")))
    assert error.path == "/environments/1/vms/2"
    assert "environment 'env_2' lists vm 'vm_1', but that VM's environment is 'env_1'" in (
        error.message
    )


@pytest.mark.parametrize(
    ("mutate", "path"),
    [
        (lambda d: d["environments"][0]["vms"].append("vm_1"), "/environments/0/vms/4"),
        (lambda d: port_mapping(d)["vms"].append("vm_2"), "/public_ips/0/port_mappings/0/vms/4"),
    ],
)
def test_vm_listed_twice_in_one_list_is_reported(mutate: Mutation, path: str) -> None:
    error = only_error(mutated(mutate))
    assert error.path == path
    assert "is listed twice (also at" in error.message


# --- database groups ---------------------------------------------------------------------


def test_database_master_must_have_role_db_master() -> None:
    error = only_error(mutated(lambda d: d["vms"][4].update(role="app")))
    assert error.path == "/database_groups/0/master"
    assert error.message == "database master 'vm_5' has role 'app', not 'db_master'"


def test_database_replica_must_have_role_db_replica() -> None:
    error = only_error(mutated(lambda d: d["vms"][5].update(role="util")))
    assert error.path == "/database_groups/0/replicas/0"
    assert error.message == "database replica 'vm_6' has role 'util', not 'db_replica'"


def test_database_master_cannot_also_be_a_replica() -> None:
    error = only_error(mutated(lambda d: d["database_groups"][0]["replicas"].append("vm_5")))
    assert error.path == "/database_groups/0/replicas/1"
    assert "vm 'vm_5' is both the master and a replica of database group 'db_1'" in error.message


def test_database_group_without_replicas_is_accepted() -> None:
    def drop_replica(d: dict[str, Any]) -> None:
        d["database_groups"][0]["replicas"] = []
        d["vms"][5]["role"] = "util"

    assert validate_document(mutated(drop_replica)).database_groups[0].replicas == ()


# --- what moves where --------------------------------------------------------------------


def test_new_vm_receives_local_filesystems_of_at_most_one_old_vm() -> None:
    error = only_error(
        mutated(lambda d: d["migration"]["local_filesystems"][1].update(new_vm="vm_1"))
    )
    assert error.path == "/migration/local_filesystems/1/new_vm"
    assert error.message == (
        "vm 'vm_1' already receives the local filesystems of 'ey04-s50000' "
        "(at /migration/local_filesystems/0/new_vm)"
    )


def test_old_vm_is_migrated_at_most_once() -> None:
    def migrate_twice(d: dict[str, Any]) -> None:
        d["migration"]["local_filesystems"][1]["old_vm"] = "ey04-s50000"

    error = only_error(mutated(migrate_twice))
    assert error.path == "/migration/local_filesystems/1/old_vm"
    assert "old vm 'ey04-s50000' is migrated twice" in error.message


def test_shared_filesystem_target_without_that_mountpoint_is_rejected() -> None:
    # Given the move names a mountpoint no VM of env_1 has
    document = mutated(
        lambda d: d["migration"]["shared_filesystems"][0].update(mountpoint="/srv/assets")
    )
    # Then the move is rejected, naming the environment and the mountpoint
    error = only_error(document)
    assert error.path == "/migration/shared_filesystems/0"
    assert error.message == "environment 'env_1' has no VM with a filesystem at '/srv/assets'"


def test_shared_filesystem_target_with_two_vms_at_that_mountpoint_is_rejected() -> None:
    def second_data(d: dict[str, Any]) -> None:
        d["vms"][1]["disks"].append(copy.deepcopy(d["vms"][0]["disks"][1]))

    error = only_error(mutated(second_data))
    assert error.path == "/migration/shared_filesystems/0"
    assert "environment 'env_1' has 2 VMs with a filesystem at '/data' (vm_1, vm_2)" in (
        error.message
    )


def test_shared_filesystem_moved_twice_is_reported() -> None:
    def twice(d: dict[str, Any]) -> None:
        shared = d["migration"]["shared_filesystems"]
        shared.append(copy.deepcopy(shared[0]))

    errors = errors_of(mutated(twice))
    assert {e.path for e in errors} == {"/migration/shared_filesystems/1"}
    assert any("is moved twice" in e.message for e in errors)
    assert any("already receives a shared filesystem at '/data'" in e.message for e in errors)


def test_mountpoint_used_twice_on_one_vm_is_reported() -> None:
    def second_root(d: dict[str, Any]) -> None:
        d["vms"][1]["disks"].append(copy.deepcopy(d["vms"][1]["disks"][0]))

    error = only_error(mutated(second_root))
    assert error.path == "/vms/1/disks/1/filesystems/0/mountpoint"
    assert "mountpoint '/' is used twice on vm 'vm_2' (also at" in error.message


def test_port_mapped_twice_on_one_public_ip_is_reported_but_udp_is_another_port() -> None:
    error = only_error(mutated(lambda d: port_mapping(d, 1).update(external_port=443)))
    assert error.path == "/public_ips/0/port_mappings/1/external_port"
    assert "tcp port 443 is mapped twice on public IP 'ip_1'" in error.message
    udp = mutated(lambda d: port_mapping(d, 1).update(external_port=443, protocol="udp"))
    assert validate_document(udp).public_ips[0].port_mappings[1].protocol == "udp"


def test_old_ip_mapped_twice_is_reported_whatever_its_spelling() -> None:
    def twice(d: dict[str, Any]) -> None:
        d["migration"]["ip_equivalences"] = [
            {"old_ip": "2001:db8::10", "new_public_ip": "ip_1"},
            {"old_ip": "2001:0db8:0:0::10", "new_public_ip": "ip_1"},
        ]

    error = only_error(mutated(twice))
    assert error.path == "/migration/ip_equivalences/1/old_ip"
    assert "old IP '2001:db8::10' is mapped twice" in error.message


def test_database_moved_twice_is_reported() -> None:
    def twice(d: dict[str, Any]) -> None:
        databases = d["migration"]["databases"]
        databases.append(copy.deepcopy(databases[0]))

    error = only_error(mutated(twice))
    assert error.path == "/migration/databases/1/name"
    assert "database 'foobar_production' on 'mysql-mega-2-master' is moved twice" in error.message


# --- every error at once -----------------------------------------------------------------


def test_every_structural_error_is_reported_at_once() -> None:
    def break_many(d: dict[str, Any]) -> None:
        d["vms"][2]["memory_mib"] = 0
        d["vms"][3]["colour"] = "red"
        vm_1_data(d)["mountpoint"] = "/data; touch /tmp/pwned"
        del d["customer"]["name"]
        d["migration"]["ip_equivalences"][0]["old_ip"] = "not-an-ip"

    errors = errors_of(mutated(break_many))
    assert [e.path for e in errors] == [
        "/customer/name",
        "/vms/0/disks/1/filesystems/0/mountpoint",
        "/vms/2/memory_mib",
        "/vms/3/colour",
        "/migration/ip_equivalences/0/old_ip",
    ]


def test_every_semantic_error_is_reported_at_once() -> None:
    def break_many(d: dict[str, Any]) -> None:
        d["vms"][4]["role"] = "app"
        port_mapping(d)["vms"][0] = "env_1"
        d["migration"]["local_filesystems"][3]["new_vm"] = "vm_1"
        d["migration"]["shared_filesystems"][0]["mountpoint"] = "/srv"

    errors = errors_of(mutated(break_many))
    assert [e.path for e in errors] == [
        "/public_ips/0/port_mappings/0/vms/0",
        "/database_groups/0/master",
        "/migration/shared_filesystems/0",
        "/migration/local_filesystems/3/new_vm",
    ]


def test_semantic_rules_wait_for_a_valid_structure() -> None:
    # Given a structural error and a dangling reference
    def break_both(d: dict[str, Any]) -> None:
        d["vms"][0]["memory_mib"] = 0
        d["migration"]["local_filesystems"][0]["new_vm"] = "vm_99"

    # Then only the structural error is reported; references are checked once parts parse
    assert [e.path for e in errors_of(mutated(break_both))] == ["/vms/0/memory_mib"]


def test_invalid_document_is_a_permanent_error_that_summarises_its_errors() -> None:
    with pytest.raises(PermanentError) as caught:
        validate_document(mutated(lambda d: d["vms"][2].update(memory_mib=0)))
    assert "1 error(s): /vms/2/memory_mib: " in str(caught.value)


# --- any document at all -----------------------------------------------------------------

JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=12),
    lambda children: (
        st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=6), children, max_size=3)
    ),
    max_leaves=8,
)
# Values from the document itself, so mutations often stay well-formed and reach the rules.
NEAR_MISSES: st.SearchStrategy[Any] = st.sampled_from(
    [
        "vm_1",
        "vm_5",
        "vm_6",
        "env_1",
        "env_2",
        "ip_1",
        "db_1",
        "/",
        "/data",
        "/srv",
        "",
        "db_master",
        "app",
        "tcp",
        "a/b~c",
        0,
        1,
        443,
        65536,
        -1,
        True,
        None,
        [],
        {},
    ]
)


def paths_in(value: Any, here: tuple[str | int, ...] = ()) -> list[tuple[str | int, ...]]:
    found = [here]
    if isinstance(value, dict):
        for key, child in value.items():
            found += paths_in(child, (*here, key))
    elif isinstance(value, list):
        for index, child in enumerate(value):
            found += paths_in(child, (*here, index))
    return found


def resolve(document: Any, pointer: str) -> Any:
    node = document
    for token in pointer.split("/")[1:]:
        token = token.replace("~1", "/").replace("~0", "~")
        node = node[int(token)] if isinstance(node, list) else node[token]
    return node


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_any_mutation_is_either_accepted_or_reported_with_pointers(data: st.DataObject) -> None:
    # Given the example with random parts dropped, replaced or added
    document: Any = copy.deepcopy(EXAMPLE)
    for _ in range(data.draw(st.integers(1, 4), label="mutations")):
        path = data.draw(st.sampled_from(paths_in(document)), label="path")
        action = data.draw(st.sampled_from(["replace", "drop", "add"]), label="action")
        new = data.draw(JSON_VALUES | NEAR_MISSES, label="value")
        if not path:
            document = new if action == "replace" else document
            continue
        parent = resolve(document, json_pointer(*path[:-1]))
        if action == "drop":
            del parent[path[-1]]
        elif action == "add" and isinstance(parent, dict):
            parent[data.draw(st.text(max_size=6), label="key")] = new
        else:
            parent[path[-1]] = new
    # When it is validated
    try:
        result = validate_document(document)
    except DocumentInvalidError as invalid:
        # Then every error is a pointer into the submitted document and a message
        assert invalid.errors
        for error in invalid.errors:
            assert isinstance(error.path, str)
            assert error.path == "" or error.path.startswith("/")
            assert isinstance(error.message, str) and error.message
            parent_pointer = error.path.rsplit("/", 1)[0] if error.path else ""
            resolve(document, parent_pointer)
    else:
        # Or it is a document (a mutation may well keep it valid)
        assert isinstance(result, MigrationDocument)
