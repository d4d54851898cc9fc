"""Source commands: what runs on the customer's host, and what is refused before it runs."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from services.archiver.sources import (
    SERVER_ROOT_SCRUB,
    ArchiveOrder,
    SnapshotExport,
    SourceInvalidError,
    dump_command,
    filesystem_command,
    snapshot_command,
    validate_order,
)
from shared.contracts import ArchiveSource
from shared.errors import PermanentError
from shared.hosts import LocalExecutor
from shared.settings import Settings


def order(kind: str, **source: object) -> ArchiveOrder:
    return ArchiveOrder.model_validate({"kind": kind, "source": {"host": "vm1", **source}})


def test_shared_fs_is_a_sorted_numeric_tar_under_nice_and_ionice() -> None:
    command = filesystem_command(order("shared_fs", path="/data"), Settings())

    assert command.argv == ["nice", "-n", "19", "ionice", "-c3", "-t", "tar", "-C", "/data",
                            "--sort=name", "--numeric-owner", "--sparse", "-cpf", "-", "."]
    assert command.ok_exits == (0, 1) and command.extension == "tar"


def test_niceness_can_be_turned_off() -> None:
    command = filesystem_command(order("shared_fs", path="/data"), Settings(source_nice=False))

    assert command.argv[0] == "tar"


def test_server_root_skips_runtime_filesystems_and_the_data_directory_contents() -> None:
    root = order("db_server_root", path="/", engine="mysql", excludes=("/var/cache/apt",))

    argv = filesystem_command(root, Settings(source_nice=False), "/var/lib/mysql/").argv

    assert "--one-file-system" in argv
    excludes = [a for a in argv if a.startswith("--exclude=")]
    assert excludes[:6] == ["--exclude=./var/cache/apt", "--exclude=./proc/*",
                            "--exclude=./sys/*", "--exclude=./dev/*", "--exclude=./run/*",
                            "--exclude=./tmp/*"]
    # then the scrub list (tests/unit/archiver/test_scrub.py), the data directory once
    assert excludes[6:] == [f"--exclude={p}" for p, _ in SERVER_ROOT_SCRUB]
    assert "--exclude=./var/lib/mysql/*" in excludes
    assert argv.index("--anchored") < argv.index(excludes[0])
    assert argv[-3:] == ["-cpf", "-", "."]


def test_mysql_dump_is_one_transaction_with_routines_triggers_events_and_options() -> None:
    settings = Settings(source_nice=False, source_db_user="backup", source_db_port=3307,
                        source_db_defaults_file="/etc/ferry/my.cnf")
    source = ArchiveSource(host="replica", database="foobar_production", engine="mysql")

    command = dump_command(source, settings)

    assert command.argv == ["mysqldump", "--defaults-extra-file=/etc/ferry/my.cnf",
                            "--port=3307", "--user=backup", "--single-transaction", "--routines",
                            "--triggers", "--events", "foobar_production"]
    assert command.extension == "sql"


def test_postgresql_group_is_dumped_with_pg_dump() -> None:
    source = ArchiveSource(host="replica", database="shop", engine="postgresql")

    argv = dump_command(source, Settings()).argv

    assert argv[:6] == ["nice", "-n", "19", "ionice", "-c3", "-t"]
    assert argv[6:] == ["pg_dump", "--no-password", "--format=plain", "shop"]


@pytest.mark.parametrize("name", ["$(touch /tmp/pwned)", "--result-file=/etc/passwd",
                                  "host=evil dbname=x", "a;b", "", "x" * 65, "new\nline"])
def test_database_names_that_could_be_read_as_code_or_options_are_refused(name: str) -> None:
    with pytest.raises(SourceInvalidError, match="not a plain name"):
        validate_order(order("database", database=name, engine="mysql"))


@pytest.mark.parametrize("path", ["data", "", "/data/../etc", "/data\n/etc"])
def test_paths_that_are_not_plain_absolute_paths_are_refused(path: str) -> None:
    with pytest.raises(SourceInvalidError, match="path"):
        validate_order(order("shared_fs", path=path))


def test_a_path_and_exclude_with_shell_code_reach_the_command_as_literal_arguments(
    tmp_path: Path,
) -> None:
    # Given a mountpoint and an exclude that a shell would run (allowed: they are only names)
    ran_path, ran_exclude = tmp_path / "ran-path", tmp_path / "ran-exclude"
    hostile = order("shared_fs", path=f"/data/$(touch {ran_path})",
                    excludes=(f"`touch {ran_exclude}`",))
    validate_order(hostile)
    argv = filesystem_command(hostile, Settings(source_nice=False)).argv
    # When the command runs as every host runs one (bash -c, the argv shlex-joined), with
    # printf in front to print the arguments it got instead of running tar
    printed = LocalExecutor().run(["printf", r"%s\0", *argv]).stdout
    # Then tar would get exactly the argv built, the shell code as text, and nothing ran
    assert printed.decode().split("\0")[:-1] == argv
    assert f"/data/$(touch {ran_path})" in argv
    assert f"--exclude=./`touch {ran_exclude}`" in argv
    assert not ran_path.exists() and not ran_exclude.exists()
    # ... while the same argv joined unquoted would have run both (the input is live)
    subprocess.run(["bash", "-c", " ".join(["true", *argv])], check=True)  # noqa: S603, S607
    assert ran_path.exists() and ran_exclude.exists()


def test_database_without_engine_is_refused() -> None:
    with pytest.raises(SourceInvalidError, match="engine"):
        validate_order(order("database", database="shop"))


def test_local_fs_without_snapshot_driver_is_archived_like_a_directory() -> None:
    snapshot = SnapshotExport(snapshot_id="s1", driver="none", host="local")
    local = ArchiveOrder(kind="local_fs", source=ArchiveSource(host="local", path="/srv"),
                         snapshot=snapshot)

    validate_order(local)
    assert filesystem_command(local, Settings(source_nice=False)).argv[:3] == ["tar", "-C", "/srv"]


def nbd_order(export_name: str = "ferry-0123456789ab-1", port: int | None = 10809,
              excludes: tuple[str, ...] = ()) -> ArchiveOrder:
    snapshot = SnapshotExport(snapshot_id="ferry-0123456789ab-1", driver="dm", host="xen1",
                              export_name=export_name, port=port)
    return ArchiveOrder(kind="local_fs", snapshot=snapshot,
                        source=ArchiveSource(host="xen1", device="/dev/vg/lv", excludes=excludes))


def test_nbd_snapshot_is_archived_from_its_mount_here_without_nice() -> None:
    # Given a dm snapshot exported over nbd, mounted on the archiver
    local = nbd_order(excludes=("var/cache",))
    validate_order(local)
    # Then tar reads the mounted directory, sorted, numeric owners, holes kept, excludes
    # relative to the filesystem's root; not niced (the Xen host's load is nbd-server's)
    command = snapshot_command(local, "/run/ferry/nbd/abc/mnt", Settings())
    assert command.argv == ["tar", "-C", "/run/ferry/nbd/abc/mnt", "--sort=name",
                            "--numeric-owner", "--sparse", "--anchored", "--wildcards",
                            "--wildcards-match-slash", "--exclude=./var/cache", "-cpf", "-",
                            "."]
    assert command.ok_exits == (0, 1) and command.extension == "tar"
    # ... and never through the source-side path
    with pytest.raises(PermanentError, match="exported over nbd"):
        filesystem_command(local, Settings())


@pytest.mark.parametrize(("export_name", "port", "message"), [
    ("", 10809, "export name ''"), ("-x", 10809, "export name '-x'"),
    ("a/../b", 10809, "not a plain name"), ("ferry-1", None, "no nbd port"),
])
def test_nbd_snapshot_without_a_plain_export_or_port_is_refused(
    export_name: str, port: int | None, message: str,
) -> None:
    with pytest.raises(SourceInvalidError, match=message):
        validate_order(nbd_order(export_name, port))
