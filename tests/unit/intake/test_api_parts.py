"""The small pieces behind intake's API and CLI: body parsing, the bind address, the view."""

from __future__ import annotations

import gc

import pytest
from rich.console import Console

from services.intake.client import default_url
from services.intake.collector import collector_paused
from services.intake.display import render_status
from services.intake.server import parse_bind
from services.intake.uploads import parse_json
from shared.document import DocumentInvalidError
from shared.errors import ConfigurationError
from shared.settings import Settings


def test_json_is_parsed_strictly_from_utf8() -> None:
    assert parse_json('{"name": "Föö"}'.encode()) == {"name": "Föö"}
    for body, fragment in [(b'{"a": NaN}', "NaN"), (b'{"a": Infinity}', "Infinity"),
                           ('{"a": "é"}'.encode("utf-16"), "not UTF-8"),
                           (b'{"a": 1,}', "line 1 column 9")]:
        with pytest.raises(DocumentInvalidError) as caught:
            parse_json(body)
        [error] = caught.value.errors
        assert error.path == "" and fragment in error.message, error


@pytest.mark.parametrize(("bind", "expected"), [
    ("127.0.0.1:8080", ("127.0.0.1", 8080)),
    ("0.0.0.0:80", ("0.0.0.0", 80)),  # noqa: S104 - parsed, not bound
    ("[::1]:9000", ("::1", 9000)),
    ("localhost:0", ("localhost", 0)),
])
def test_bind_address_is_host_and_port(bind: str, expected: tuple[str, int]) -> None:
    assert parse_bind(bind) == expected


@pytest.mark.parametrize("bind", ["8080", ":8080", "host:", "host:http", "host:70000",
                                  "host:８０"])
def test_bad_bind_address_is_a_configuration_error(bind: str) -> None:
    with pytest.raises(ConfigurationError, match="FERRY_INTAKE_BIND"):
        parse_bind(bind)


def test_cli_reads_a_wildcard_bind_as_this_host() -> None:
    assert default_url(Settings(intake_bind="0.0.0.0:8080")) == "http://127.0.0.1:8080"  # noqa: S104
    assert default_url(Settings(intake_bind="10.0.0.5:9000")) == "http://10.0.0.5:9000"


def test_status_view_shows_each_job_with_its_bytes_and_last_error() -> None:
    # Given a status answer with one job halfway and one failed
    answer = {
        "id": "mig-1", "customer_id": "cust-1042", "status": "archiving", "reason": None,
        "allocations": {"vms": {"vm_1": "tm21-s00101"}, "vlan": 1234},
        "jobs": [
            {"request_id": "r1", "kind": "local_fs", "label": "ey04-s50000:/",
             "state": "archiving", "stage": "archive", "bytes_done": 5 * 10**8,
             "bytes_total": 10**9, "mb_per_s": 150.0, "errors": []},
            {"request_id": "r2", "kind": "database", "label": "foobar_production@db",
             "state": "failed", "stage": None, "bytes_done": 0, "bytes_total": None,
             "mb_per_s": None, "errors": [{"stage": "archive", "reason": "mysqldump exited 2"}]},
        ],
    }
    # When it is rendered
    console = Console(record=True, width=160)
    console.print(render_status(answer))
    text = console.export_text()
    # Then the header, the allocations, each job's bytes and the failure are there
    assert "mig-1" in text and "archiving" in text
    assert "vm_1 → tm21-s00101" in text and "1234" in text
    assert "ey04-s50000:/" in text and "0.5/1.0 GB" in text and "150.0 MB/s" in text
    assert "foobar_production@db: archive error: mysqldump exited 2" in text


def test_status_view_before_planning_says_so() -> None:
    console = Console(record=True, width=120)
    console.print(render_status({"id": "mig-2", "customer_id": "c", "status": "submitted",
                                 "jobs": []}))
    assert "no jobs yet" in console.export_text()


def test_the_collector_is_paused_until_the_last_pause_ends_and_then_on_again() -> None:
    assert gc.isenabled()
    with collector_paused():
        assert not gc.isenabled()
        with collector_paused():
            assert not gc.isenabled()
        assert not gc.isenabled()  # the outer pause still holds
    assert gc.isenabled()
    try:
        with collector_paused():
            raise ValueError("a failed request")
    except ValueError:
        pass
    assert gc.isenabled()
