"""FERRY_DESTINATION parsing and the names that become paths there."""

from __future__ import annotations

from pathlib import Path

import pytest

from services.transfer.destination import (
    UnsafeNameError,
    open_host,
    parse_destination,
    safe_component,
)
from shared.errors import ConfigurationError
from shared.hosts import LocalExecutor
from shared.settings import Settings


def test_remote_destination_with_user_port_and_path() -> None:
    destination = parse_destination("backup@10.0.0.5:2222:/srv/ferry/", Settings())
    assert (destination.user, destination.host, destination.port) == ("backup", "10.0.0.5", 2222)
    assert destination.root == "/srv/ferry" and not destination.is_local
    assert destination.file_path("m-1", "a.tar.zst") == "/srv/ferry/m-1/a.tar.zst"
    assert destination.rsync_target("/srv/ferry/m-1/a") == "backup@10.0.0.5:/srv/ferry/m-1/a"
    assert destination.address == "backup@10.0.0.5:2222"


def test_ipv6_destination_host_is_bracketed_for_ssh_and_rsync() -> None:
    destination = parse_destination("backup@[fd00::5]:2222:/srv", Settings())
    assert destination.host == "fd00::5"
    assert destination.address == "backup@[fd00::5]:2222"
    assert destination.rsync_target("/srv/m-1/a") == "backup@[fd00::5]:/srv/m-1/a"


def test_remote_destination_defaults_to_ssh_user_and_port_22() -> None:
    destination = parse_destination("tm21-migrate:/data", Settings(ssh_user="ferry"))
    assert (destination.user, destination.port, destination.root) == ("ferry", 22, "/data")


def test_unset_destination_is_a_local_directory_in_the_state_dir(tmp_path: Path) -> None:
    destination = parse_destination(None, Settings(state_dir=tmp_path))
    assert destination.is_local and destination.root == str(tmp_path / "destination")
    assert destination.rsync_target("/x/y") == "/x/y"
    assert isinstance(open_host(destination, Settings()), LocalExecutor)


@pytest.mark.parametrize(("text", "complaint"), [
    ("host:relative/path", "must be absolute"),
    ("bad host!:/x", "not a host address"),
    ("h:99999:/x", "not a host address"),
    ("h:/x\n", "control characters"),
])
def test_malformed_destinations_are_refused_naming_the_problem(text: str, complaint: str) -> None:
    with pytest.raises(ConfigurationError, match=complaint):
        parse_destination(text, Settings())


def test_remote_destination_without_key_is_a_configuration_error() -> None:
    destination = parse_destination("root@h:/x", Settings())
    with pytest.raises(ConfigurationError, match="FERRY_DESTINATION_SSH_KEY_PATH"):
        open_host(destination, Settings())


@pytest.mark.parametrize("name", ["../etc", "a/b", "-rf", ".hidden", "", "a b", "x;rm", ".."])
def test_names_that_are_not_one_plain_component_are_refused(name: str) -> None:
    with pytest.raises(UnsafeNameError, match="archive file name"):
        safe_component(name, "archive file name")


def test_plain_archive_names_pass() -> None:
    for name in ["ey04-s50000_root.tar.zst", "foobar_production@mysql.sql.gz", "8f2c.tar.gz"]:
        assert safe_component(name, "archive file name") == name
