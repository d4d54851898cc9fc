"""The database server root's scrub list as GNU tar reads it: anchored places stay anchored,
`*/` patterns match at any depth, and what is left out is what the command records.

Real tar on a real tree (this machine's GNU tar), no service: the integration test
(tests/integration/test_archiver_scrub.py) runs the archiver itself.
"""

from __future__ import annotations

import io
import re
import tarfile
from pathlib import Path

import pytest

from services.archiver.probe import modern
from services.archiver.sources import (
    ROOT_EXCLUDES,
    SERVER_ROOT_SCRUB,
    ArchiveOrder,
    excluded_by,
    filesystem_command,
    server_root_excludes,
)
from shared.contracts import ArchiveSource
from shared.hosts import LocalExecutor
from shared.settings import Settings

README = Path(__file__).resolve().parents[3] / "README.md"

# path -> shipped? Places that look like scrubbed ones but are not (the anchoring matters)
TREE = {
    "var/log/syslog": False,
    "var/log/mysql/error.log": False,
    "srv/app/var/log/keep.txt": True,  # ./var/log/* is the root's /var/log only
    "srv/app/home/keep.txt": True,
    "root/.bash_history": False,
    ".bash_history": False,  # `*/` takes the root's "." too
    "srv/a/b/c/.mysql_history": False,
    "srv/a/.bash_history/x": False,  # a directory named so: all below it
    "srv/a/.bash_history.d/x": True,
    "etc/bash_history.conf": True,
    "etc/ssh/sshd_config": True,
    "etc/ssh/ssh_host_rsa_key": False,
    "srv/etc/ssh/ssh_host_rsa_key": True,  # anchored: not another tree's etc/ssh
    "db/mysql-bin.000001": False,
    "usr/share/man/man1/mysql-bin.1.gz": True,  # six digits only
    "var/lib/mysql/ibdata1": False,
    "var/lib/mysqlx/keep": True,
    "var/lib/dpkg/status": True,
    "etc/mysql/my.cnf": True,
    "etc/mysql/debian.cnf": False,
    "home/alice/notes": False,
    "srv/customers/bob/x": False,  # the inventory's per-customer path
    "srv/customers/bobby/x": True,
    "usr/bin/mysqld": True,
}


@pytest.fixture
def root(tmp_path: Path) -> Path:
    base = tmp_path / "root"
    for path in TREE:
        (base / path).parent.mkdir(parents=True, exist_ok=True)
        (base / path).write_text(path)
    return base


def order(root: Path) -> ArchiveOrder:
    return ArchiveOrder.model_validate({"kind": "db_server_root", "source": {
        "host": "local", "path": str(root), "engine": "mysql",
        "excludes": ["/srv/customers/bob"]}})


def archived(root: Path) -> set[str]:
    command = filesystem_command(order(root), Settings(source_nice=False), "/var/lib/mysql",
                                 modern())
    raw = LocalExecutor().run(command.argv, ok_exits=command.ok_exits).stdout
    with tarfile.open(fileobj=io.BytesIO(raw)) as tar:
        return set(tar.getnames())


def test_gnu_tar_leaves_out_exactly_the_scrubbed_places(root: Path) -> None:
    names = archived(root)
    assert {p: f"./{p}" in names for p in TREE} == TREE


def test_the_python_reading_of_the_patterns_agrees_with_tar(root: Path) -> None:
    # excluded_by is what checks (tests/e2e) use to know what a root archive should hold
    names = archived(root)
    patterns = server_root_excludes(order(root).source, "/var/lib/mysql")
    every = {f"./{p}" for p in TREE} | {"./" + "/".join(p.split("/")[:i])
                                        for p in TREE for i in range(1, p.count("/") + 1)}
    assert {n for n in every if excluded_by(n, patterns) is None} == names - {"."}


def test_the_command_records_what_it_left_out() -> None:
    source = ArchiveSource(host="db", path="/", engine="mysql", excludes=("/srv/customers/b",))
    command = filesystem_command(ArchiveOrder(kind="db_server_root", source=source),
                                 Settings(), "/db/mysql/data/", modern())
    assert command.excluded == (
        "./srv/customers/b", *(f"./{p}/*" for p in ROOT_EXCLUDES),
        *(p for p, _ in SERVER_ROOT_SCRUB), "./db/mysql/data/*")
    assert [a for a in command.argv if a.startswith("--exclude=")] == [
        f"--exclude={p}" for p in command.excluded]
    # the data directory the server names is not listed twice when it is a default one
    again = filesystem_command(ArchiveOrder(kind="db_server_root", source=source),
                               Settings(), "/var/lib/mysql/", modern())
    assert again.excluded.count("./var/lib/mysql/*") == 1


def test_readme_documents_every_pattern() -> None:
    text = README.read_text()
    section = text.split("## What a database server's root leaves out", 1)[1]
    section = re.split(r"\n## ", section, maxsplit=1)[0]
    # written as on the server: "/var/log/*" for tar's "./var/log/*"
    missing = [p for p, _ in SERVER_ROOT_SCRUB if f"`{p.removeprefix('.')}`" not in section]
    assert missing == []
