"""A shared database server's root, archived by the real archiver over the tests' sshd with
real tar and the real MariaDB naming its data directory: nothing of the customers on it ships.

The root is planted with two customers' artifacts at every place of the scrub list; the
archive (made once for the module) is extracted and checked artifact by artifact. The
negative control runs today's command (before the scrub list: runtime filesystems and the
data directory only) on the same root and finds every one of them shipped.
"""

from __future__ import annotations

import tarfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from services.archiver.probe import modern
from services.archiver.sources import ROOT_EXCLUDES, member_pattern, tar_command
from shared.addresses import host_pool
from tests.integration.test_archiver import (
    address,
    answers,
    archive_request,
    archiver_settings,
    extract,
    running,
    send,
    sshd,
)
from tests.support.sshd import SshServer

__all__ = ["sshd"]  # the module-scoped sshd fixture, shared with test_archiver

CUSTOMERS = ("alice", "bob")
# The inventory's per-customer paths on this server (helper B's resolver puts them in
# source.excludes): each customer's own directory.
PER_CUSTOMER = {c: f"/srv/customers/{c}" for c in CUSTOMERS}


def planted(customer: str) -> dict[str, str]:
    """Where one customer's traces lie on a shared database server: {path: what it is}."""
    c = customer
    return {
        f"var/lib/mysql/{c}_production/orders.ibd": "data directory (asked of the server)",
        f"var/lib/mysql/{c}_production/orders.frm": "data directory (asked of the server)",
        f"var/lib/postgresql/14/main/base/{c}/16384": "PostgreSQL data directory",
        f"db/binlogs/{c}-bin.000042": "binary log outside the data directory",
        f"db/binlogs/{c}-bin.index": "binary log index",
        f"db/relay/{c}-relay-bin.000007": "relay log",
        f"var/log/mysql/{c}-queries.log": "database log",
        f"var/log/nginx/{c}.access.log": "web log under /var/log",
        f"srv/www/{c}/logs/access.log": "web log elsewhere",
        f"srv/www/{c}/logs/error_log": "web error log elsewhere (Apache's name)",
        f"srv/ops/{c}/.bash_history": "shell history",
        f"srv/ops/{c}/.mysql_history": "mysql client history",
        f"srv/ops/{c}/.psql_history": "psql history",
        f"srv/ops/{c}/.lesshst": "less history",
        f"srv/ops/{c}/.viminfo": "vim history",
        f"srv/ops/{c}/.ssh/authorized_keys": "a user's authorized_keys",
        f"srv/ops/{c}/.ssh/id_ed25519": "a user's private key",
        f"srv/ops/{c}/.my.cnf": "a client login",
        f"srv/ops/{c}/.pgpass": "a PostgreSQL login",
        f"db/{c}-replica/master.info": "the replica's source credentials",
        f"db/{c}-replica/relay-log.info": "the replica's relay position",
        f"var/mail/{c}": "mail spool",
        f"var/spool/mail/{c}": "mail spool (old path)",
        f"var/spool/cron/crontabs/{c}": "a user's crontab",
        f"home/{c}/notes.txt": "a home directory",
        f"home/{c}/.bash_history": "a home directory's history",
        f"srv/customers/{c}/uploads/invoice.pdf": "the inventory's per-customer path",
    }


SERVER_TRACES = {  # the server's own, but access to it (and so to every customer)
    "etc/ssh/ssh_host_rsa_key": "SSH host key",
    "etc/ssh/ssh_host_ed25519_key.pub": "SSH host key",
    "root/.ssh/authorized_keys": "root's authorized_keys (both customers' keys)",
    "root/.bash_history": "root's history",
    "root/.mysql_history": "root's mysql history",
    "root/.my.cnf": "root's client login",
    "etc/mysql/debian.cnf": "the maintenance login",
    "var/lib/mysql/master.info": "the replica's credentials in the data directory",
}
KEPT = ["etc/mysql/my.cnf", "etc/mysql/conf.d/replica.cnf", "usr/bin/mysqld",
        "usr/sbin/nginx", "var/lib/dpkg/status", "var/lib/dpkg/info/mariadb-server.list",
        "etc/ssh/sshd_config", "etc/crontab", "etc/cron.d/sysstat", "etc/passwd",
        "srv/www/alice/index.html", "root/bin/rotate.sh"]
KEPT_DIRS = ["home", "var/log", "var/spool/cron", "var/mail", "tmp", "proc", "var/lib/mysql"]

ARTIFACTS = {**{p: w for c in CUSTOMERS for p, w in planted(c).items()}, **SERVER_TRACES}


@pytest.fixture(scope="module")
def server_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("server") / "root"
    for path in [*ARTIFACTS, *KEPT]:
        (root / path).parent.mkdir(parents=True, exist_ok=True)
        (root / path).write_text(f"{path}\n")
    for directory in ("proc/1", "tmp"):
        (root / directory).mkdir(parents=True, exist_ok=True)
    return root


@pytest.fixture(scope="module")
def archive(server_root: Path, sshd: SshServer,
            tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """customer alice's db_server_root archive, made by the archiver, and its extraction."""
    work = tmp_path_factory.mktemp("scrub")
    settings = archiver_settings(work, sshd, compression="gzip")
    with running(settings) as service:
        send("memory://", (archive_request(
            "r1", "db_server_root", "root:mysql-mega-2-replica", host=address(sshd),
            path=str(server_root), engine="mysql",
            excludes=tuple(PER_CUSTOMER.values())), "m-alice"))
        completed = answers(service, ["r1"])["r1"]
    assert completed["type"] == "archive.completed", completed
    extract(Path(completed["path"]), work / "extracted")
    with tarfile.open(completed["path"]) as tar:
        names = set(tar.getnames())
    yield {"completed": completed, "extracted": work / "extracted", "names": names}


@pytest.mark.parametrize("artifact", sorted(ARTIFACTS))
def test_server_root_archive_leaves_out_every_customer_trace(
    artifact: str, archive: dict[str, Any],
) -> None:
    # Given a shared database server's root with alice's and bob's traces everywhere
    # When alice's migration archives it
    # Then this trace is not in the archive
    assert not (archive["extracted"] / artifact).exists(), f"{ARTIFACTS[artifact]} shipped"
    assert f"./{artifact}" not in archive["names"]


def test_server_root_archive_keeps_the_servers_packages_and_configuration(
    archive: dict[str, Any], server_root: Path,
) -> None:
    for path in KEPT:
        assert (archive["extracted"] / path).read_text() == (server_root / path).read_text()
    for directory in KEPT_DIRS:  # emptied, not gone: the restored server keeps its layout
        assert (archive["extracted"] / directory).is_dir(), directory
    assert archive["completed"]["warnings"] == []


def test_todays_excludes_would_ship_every_trace(server_root: Path, sshd: SshServer,
                                                tmp_path: Path) -> None:
    # Negative control: the command as it was before the scrub list (runtime filesystems,
    # the inventory's excludes, the server's data directory), on the same root, same host
    settings = archiver_settings(tmp_path, sshd)
    excludes = [member_pattern(p) for p in PER_CUSTOMER.values()]
    excludes += [member_pattern(p, contents_only=True) for p in (*ROOT_EXCLUDES,
                                                                 "/var/lib/mysql")]
    command = tar_command(str(server_root), excludes, settings, modern(), one_file_system=True)
    pool = host_pool(settings)
    try:
        raw = pool.get(address(sshd)).run(command.argv, ok_exits=command.ok_exits).stdout
    finally:
        pool.close_all()
    (tmp_path / "today.tar").write_bytes(raw)
    with tarfile.open(tmp_path / "today.tar") as tar:
        names = set(tar.getnames())
    left_out_then = ("var/lib/mysql/", "srv/customers/")
    shipped = [a for a in ARTIFACTS if not a.startswith(left_out_then)]
    assert len(shipped) > 40
    assert [a for a in shipped if f"./{a}" not in names] == []
