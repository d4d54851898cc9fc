"""Reuse that never ships stale data, and staging that cannot fill up, on the real backbone
(RabbitMQ, PostgreSQL), real sshd, tar, MariaDB and rsync: a second migration of changed
sources gets the changed data; a database server's root is reused within its age only;
transferred files are collected, exactly those; a too small staging makes an archive wait,
and a staging that fills anyway fails the attempt without leaving a partial file."""

from __future__ import annotations

import contextlib
import io
import os
import subprocess
import tarfile
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pymysql
import pytest
import zstandard
from sqlalchemy import Engine, select, update

from ferry.cli import main
from services.archiver.bootstrap import bootstrap as archiver_bootstrap
from services.archiver.compress import manifest_path
from services.archiver.tables import archive_jobs, archive_requests
from services.transfer.bootstrap import bootstrap as transfer_bootstrap
from shared.contracts import ArchiveSource, SnapshotReady, TransferCompleted
from shared.runtime import Service
from shared.settings import Settings
from tests.integration.test_archiver import (
    DC,
    address,
    archive_request,
    archiver_settings,
    send,
)
from tests.support.helpers import wait_for
from tests.support.sshd import SshServer

MiB = 1 << 20


@pytest.fixture(scope="module")
def sshd() -> Iterator[SshServer]:
    with SshServer() as server:
        yield server


@pytest.fixture
def mariadb() -> Iterator[Any]:
    connection = pymysql.connect(host="127.0.0.1", port=3306, user="root", password="",
                                 autocommit=True)
    name = f"ferry_reuse_{uuid.uuid4().hex[:8]}"
    with connection.cursor() as cursor:
        cursor.execute(f"CREATE DATABASE `{name}`")
        cursor.execute(f"CREATE TABLE `{name}`.`items` (id INT PRIMARY KEY, v VARCHAR(40))")
        cursor.execute(f"INSERT INTO `{name}`.`items` VALUES (1, 'first-version')")  # noqa: S608
    yield connection, name
    with connection.cursor() as cursor:
        cursor.execute(f"DROP DATABASE IF EXISTS `{name}`")
    connection.close()


@pytest.fixture
def services() -> Iterator[list[Service]]:
    started: list[Service] = []
    yield started
    for service in reversed(started):
        service.stop()
        service.engine.dispose()


def start(service: Service, started: list[Service]) -> Service:
    service.start()
    started.append(service)
    return service


def requests_of(engine: Engine, ids: list[str]) -> dict[str, Any]:
    with engine.connect() as connection:
        return {r.request_id: r for r in connection.execute(
            select(archive_requests).where(archive_requests.c.request_id.in_(ids)))}


def job(engine: Engine, archive_id: str) -> Any:
    with engine.connect() as connection:
        return connection.execute(select(archive_jobs).where(archive_jobs.c.id == archive_id)).one()


def wait_transferred(engine: Engine, ids: list[str], timeout: float = 90) -> dict[str, Any]:
    """Every request answered and its transfer.completed recorded by the archiver."""

    def done() -> dict[str, Any] | None:
        found = requests_of(engine, ids)
        failed = [r for r in found.values() if r.state == "failed"]
        if failed:
            errors = [job(engine, r.archive_id).error for r in failed]
            raise AssertionError(f"archive failed: {errors}")
        complete = len(found) == len(ids) and all(r.transferred_at for r in found.values())
        return found if complete else None

    found: dict[str, Any] = wait_for(done, timeout=timeout, what=f"{ids} transferred")  # type: ignore[assignment]
    return found


def wait_answered(engine: Engine, ids: list[str], timeout: float = 60) -> dict[str, Any]:
    def done() -> dict[str, Any] | None:
        found = requests_of(engine, ids)
        answered = len(found) == len(ids) and "waiting" not in {r.state for r in found.values()}
        return found if answered else None

    found: dict[str, Any] = wait_for(done, timeout=timeout, what=f"{ids} answered")  # type: ignore[assignment]
    return found


def member(archive: Path, name: str) -> str:
    """One file's text out of a small .tar.zst / .tar.gz archive."""
    body = archive.read_bytes()
    if archive.name.endswith(".zst"):
        body = zstandard.ZstdDecompressor().stream_reader(io.BytesIO(body)).read()
    with tarfile.open(fileobj=io.BytesIO(body)) as tar:
        extracted = tar.extractfile(name)
        assert extracted is not None, f"{name} not in {archive}"
        return extracted.read().decode()


def dump_text(archive: Path) -> str:
    with archive.open("rb") as raw:
        return zstandard.ZstdDecompressor().stream_reader(raw).read().decode()


# -- a second migration after the sources changed -------------------------------------------


def test_second_migration_of_changed_sources_ships_the_changed_data_but_a_root_within_its_age(
    sshd: SshServer, tmp_path: Path, rabbit_url: str, make_pg_database: Callable[[], str],
    mariadb: tuple[Any, str], services: list[Service],
) -> None:
    connection, database = mariadb
    shared, vm_root, server_root = tmp_path / "gfs", tmp_path / "vm", tmp_path / "server"
    for directory, name in ((shared, "data.txt"), (vm_root, "etc/app.conf"),
                            (server_root, "etc/my.cnf")):
        (directory / name).parent.mkdir(parents=True)
        (directory / name).write_text("first-version\n")
    destination = tmp_path / "destination"
    settings = archiver_settings(
        tmp_path, sshd, rabbit_url, make_pg_database(), transfer_database_url=make_pg_database(),
        # no gc while it runs: a staging file kept is what reuse would have answered from
        destination=str(destination), staging_gc_seconds=0)
    archiver = start(archiver_bootstrap(settings, datacenter=DC), services)
    start(transfer_bootstrap(settings), services)
    engine = archiver.engine

    def migrate(migration: str, kinds: tuple[str, ...]) -> dict[str, Any]:
        """One migration's requests, as the resolver and snapshotter send them; its
        requests once transferred (their copies verified at the destination)."""
        events: list[tuple[Any, str]] = []
        host = address(sshd)
        if "shared_fs" in kinds:
            events.append((archive_request(f"{migration}:gfs", "shared_fs", "gfs:data", host=host,
                                           path=str(shared)), migration))
        if "database" in kinds:
            events.append((archive_request(f"{migration}:db", "database", f"db:{database}",
                                           host=host, database=database, engine="mysql"),
                           migration))
        if "db_server_root" in kinds:
            events.append((archive_request(f"{migration}:root", "db_server_root",
                                           "root:mysql-mega-2", host=host,
                                           path=str(server_root)), migration))
        if "local_fs" in kinds:
            events.append((SnapshotReady(
                datacenter=DC, request_id=f"{migration}:vm", snapshot_id=f"s-{migration}",
                driver="none", host=host, size_bytes=0, reuse_key="local_fs:ey04-s50000:/",
                source=ArchiveSource(host=host, path=str(vm_root))), migration))
        send(rabbit_url, *events)
        return wait_transferred(engine, [event.request_id for event, _ in events])

    def shipped(migration: str, request: Any) -> Path:
        """The copy at the destination of the archive that answered `request`."""
        return destination / migration / Path(job(engine, request.archive_id).file_path).name

    everything = ("shared_fs", "database", "db_server_root", "local_fs")
    # Given a first migration of a customer: each of its sources archived and transferred
    first = migrate("m-1", everything)
    for request in first.values():  # each staging file is still there to be reused
        assert Path(job(engine, request.archive_id).file_path).is_file()
    # When every source changes and the customer is migrated a second time
    for directory, name in ((shared, "data.txt"), (vm_root, "etc/app.conf"),
                            (server_root, "etc/my.cnf")):
        (directory / name).write_text("second-version\n")
    with connection.cursor() as cursor:
        cursor.execute(f"UPDATE `{database}`.`items` SET v = 'second-version' "  # noqa: S608
                       "WHERE id = 1")
    second = migrate("m-2", everything)
    # Then each filesystem and the database was archived afresh, and the copies shipped
    # for the second migration hold the changed data
    for request_id in ("gfs", "db", "vm"):
        old, new = first[f"m-1:{request_id}"], second[f"m-2:{request_id}"]
        assert new.archive_id != old.archive_id and not new.reused, request_id
    assert member(shipped("m-2", second["m-2:gfs"]), "./data.txt") == "second-version\n"
    assert member(shipped("m-2", second["m-2:vm"]), "./etc/app.conf") == "second-version\n"
    assert "'second-version'" in dump_text(shipped("m-2", second["m-2:db"]))
    assert "'first-version'" not in dump_text(shipped("m-2", second["m-2:db"]))
    # But the database server's root, within its age, was reused: the old content came back
    # (what every kind did before: this is what would have shipped for all of them)
    assert second["m-2:root"].archive_id == first["m-1:root"].archive_id
    assert second["m-2:root"].reused
    assert member(shipped("m-2", second["m-2:root"]), "./etc/my.cnf") == "first-version\n"
    # When the root's archive is older than archive_reuse_seconds (its finished_at moved back
    # by a day and a second)
    with engine.begin() as db:
        db.execute(update(archive_jobs).where(archive_jobs.c.id == first["m-1:root"].archive_id)
                   .values(finished_at=time.time() - settings.archive_reuse_seconds - 1))
    third = migrate("m-3", ("db_server_root",))
    # Then it is archived afresh, with the changed file
    assert third["m-3:root"].archive_id != first["m-1:root"].archive_id
    assert member(shipped("m-3", third["m-3:root"]), "./etc/my.cnf") == "second-version\n"


# -- staging retention ------------------------------------------------------------------------


def transferred(rabbit_url: str, *answers: tuple[Any, str]) -> None:
    """transfer.completed for each (request row, migration), as the transfer service sends it
    once the copy at the destination was verified."""
    send(rabbit_url, *[(TransferCompleted(
        request_id=request.request_id, archive_id=request.archive_id,
        destination=f"/destination/{migration}", bytes=1, duration_s=1.0, mb_per_s=1.0,
        sha256="0" * 64), migration) for request, migration in answers])


def gc(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
       settings: Settings) -> str:
    """`ferry archives gc`, as an operator on the archiver's host runs it; what it printed."""
    monkeypatch.setenv("FERRY_STATE_DIR", str(settings.state_dir))
    monkeypatch.setenv("FERRY_STAGING_DIR", str(settings.staging_dir))
    monkeypatch.setenv("FERRY_ARCHIVER_DATABASE_URL", str(settings.archiver_database_url))
    monkeypatch.setenv("COLUMNS", "250")
    capsys.readouterr()
    assert main(["archives", "gc"]) == 0
    return capsys.readouterr().out


def test_gc_frees_exactly_the_transferred_expired_files(
    sshd: SshServer, tmp_path: Path, rabbit_url: str, pg_url: str, services: list[Service],
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
) -> None:
    sources = {name: tmp_path / name for name in ("a", "b", "root")}
    for directory in sources.values():
        directory.mkdir()
        (directory / "file").write_bytes(os.urandom(64 << 10))
    settings = archiver_settings(tmp_path, sshd, rabbit_url, pg_url,
                                 staging_gc_seconds=0)  # only the operator's gc, here
    engine = start(archiver_bootstrap(settings, datacenter=DC), services).engine
    host = address(sshd)
    # Given two shared filesystems' archives and a server root's, which a second customer
    # on that server reuses
    send(rabbit_url, (archive_request("a", "shared_fs", "gfs:a", host=host,
                                      path=str(sources["a"])), "m-a"),
         (archive_request("b", "shared_fs", "gfs:b", host=host, path=str(sources["b"])), "m-b"),
         (archive_request("root-1", "db_server_root", "root:db1", host=host,
                          path=str(sources["root"])), "m-r1"))
    wait_answered(engine, ["a", "b", "root-1"])
    send(rabbit_url, (archive_request("root-2", "db_server_root", "root:db1", host=host,
                                      path=str(sources["root"])), "m-r2"))
    found = wait_answered(engine, ["a", "b", "root-1", "root-2"])
    assert found["root-2"].reused and found["root-2"].archive_id == found["root-1"].archive_id
    files = {name: Path(job(engine, found[name].archive_id).file_path)
             for name in ("a", "b", "root-1")}
    # When a's and the root's first request were transferred and verified (b was not)
    transferred(rabbit_url, (found["a"], "m-a"), (found["root-1"], "m-r1"))
    wait_for(lambda: all(r.transferred_at for r in requests_of(engine, ["a", "root-1"]).values()),
             what="transfer.completed recorded")
    # Then gc frees a's file only, printing its name and size: b waits for its transfer,
    # the root is within its reuse age (and its second request not transferred yet)
    size_a = job(engine, found["a"].archive_id).compressed_bytes
    manifest_a = manifest_path(files["a"])
    listed_a = manifest_a.stat().st_size
    gc_printed = gc(monkeypatch, capsys, settings)
    assert f"freed {files['a']} ({size_a} bytes, archive {found['a'].archive_id})" in gc_printed
    assert f"freed {manifest_a} ({listed_a} bytes" in gc_printed  # its manifest goes with it
    assert f"2 file(s), {size_a + listed_a} bytes freed" in gc_printed
    assert not files["a"].exists() and not manifest_a.exists()
    assert files["b"].exists() and files["root-1"].exists()
    assert job(engine, found["a"].archive_id).removed_at is not None
    # When the root's second request was transferred too, but it is still within its age
    transferred(rabbit_url, (found["root-2"], "m-r2"))
    wait_for(lambda: requests_of(engine, ["root-2"])["root-2"].transferred_at,
             what="transfer.completed recorded")
    assert "0 file(s), 0 bytes freed" in gc(monkeypatch, capsys, settings)
    # When it is past its age (finished a day and a second ago)
    with engine.begin() as db:
        db.execute(update(archive_jobs).where(archive_jobs.c.id == found["root-1"].archive_id)
                   .values(finished_at=time.time() - settings.archive_reuse_seconds - 1))
    printed = gc(monkeypatch, capsys, settings)
    # Then its file is freed; b's, never transferred, still stays
    size_root = job(engine, found["root-1"].archive_id).compressed_bytes
    assert f"freed {files['root-1']} ({size_root} bytes" in printed
    assert not files["root-1"].exists() and files["b"].exists()
    assert sorted(p.name for p in (settings.staging_dir / DC).iterdir()) == sorted(
        [files["b"].name, manifest_path(files["b"]).name])


def test_the_archiver_deletes_a_transferred_file_itself_and_keeps_the_others(
    sshd: SshServer, tmp_path: Path, rabbit_url: str, pg_url: str, services: list[Service],
) -> None:
    source = tmp_path / "gfs"
    (source / "dir").mkdir(parents=True)
    (source / "dir" / "file").write_text("data")
    settings = archiver_settings(tmp_path, sshd, rabbit_url, pg_url, staging_gc_seconds=0.2)
    engine = start(archiver_bootstrap(settings, datacenter=DC), services).engine
    send(rabbit_url, *[(archive_request(name, "shared_fs", f"gfs:{name}", host=address(sshd),
                                        path=str(source)), f"m-{name}") for name in ("a", "b")])
    found = wait_answered(engine, ["a", "b"])
    files = {name: Path(job(engine, found[name].archive_id).file_path) for name in found}
    # When a's copy at the destination was verified (transfer.completed)
    transferred(rabbit_url, (found["a"], "m-a"))
    # Then the archiver deletes its staging file by itself, soon; b's, not transferred, stays
    # (the file goes before the row's removed_at commits: wait for the row, then look)
    wait_for(lambda: job(engine, found["a"].archive_id).removed_at is not None,
             what="a's staging file recorded as deleted")
    assert not files["a"].exists()
    assert files["b"].is_file() and job(engine, found["b"].archive_id).removed_at is None


# -- staging space ----------------------------------------------------------------------------


@contextlib.contextmanager
def tmpfs(path: Path, size: int) -> Iterator[Path]:
    """A tmpfs of `size` bytes mounted at `path` (made), unmounted afterwards."""
    path.mkdir(parents=True, exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0755", "ferry-test",
                    str(path)], check=True, capture_output=True)
    try:
        yield path
    finally:
        subprocess.run(["umount", str(path)], check=True, capture_output=True)


def free_bytes(path: Path) -> int:
    disk = os.statvfs(path)
    return disk.f_bavail * disk.f_frsize


def test_staging_too_full_for_the_next_archive_makes_it_wait_until_space_is_freed(
    sshd: SshServer, tmp_path: Path, rabbit_url: str, pg_url: str, services: list[Service],
) -> None:
    source = tmp_path / "gfs"
    source.mkdir()
    (source / "media.bin").write_bytes(os.urandom(6 * MiB))  # incompressible, as media are
    with tmpfs(tmp_path / "staging", 16 * MiB) as staging:
        # Given a staging volume of 16 MiB that other files fill to 10 MiB
        filler = staging / "other-archive.tar.zst"
        filler.write_bytes(os.urandom(10 * MiB))
        settings = archiver_settings(tmp_path, sshd, rabbit_url, pg_url,
                                     staging_wait_seconds=0.2)
        engine = start(archiver_bootstrap(settings, datacenter=DC), services).engine
        # When a 6 MiB source is to be archived (6.6 MiB with the margin; 6 MiB free)
        send(rabbit_url, (archive_request("r1", "shared_fs", "gfs:media", host=address(sshd),
                                          path=str(source), used_bytes=6 * MiB), "m-1"))

        def waiting() -> Any:
            with engine.connect() as db:
                row = db.execute(select(archive_jobs)).first()
            return row if row is not None and row.state == "pending" and (
                row.error or "").startswith("waiting for") else None

        # Then the job waits, saying for how much, spending no attempt, writing nothing
        first = wait_for(waiting, what="the archive waiting for staging space")
        assert first.attempts == 0  # type: ignore[attr-defined]
        need = int(6 * MiB * settings.staging_space_margin) + 1
        assert f"waiting for {need} bytes free in staging {staging / DC}" in \
            first.error  # type: ignore[attr-defined]
        assert "6291456 used bytes × 1.1" in first.error  # type: ignore[attr-defined]
        assert list((staging / DC).iterdir()) == []
        wait_for(lambda: (w := waiting()) and w.updated_at > first.updated_at,  # type: ignore[attr-defined]
                 what="the wait looked at staging again")
        assert requests_of(engine, ["r1"])["r1"].state == "waiting"
        # When space is freed
        filler.unlink()
        # Then it runs, once, and completes
        [answered] = wait_answered(engine, ["r1"]).values()
        archive = job(engine, answered.archive_id)
        assert answered.state == "completed" and archive.attempts == 1, archive.error
        assert Path(archive.file_path).stat().st_size == archive.compressed_bytes > 6 * MiB


@pytest.mark.parametrize("compression", ["zstd", "gzip"])
def test_staging_filling_up_mid_write_fails_the_attempt_and_leaves_no_partial_file(
    sshd: SshServer, tmp_path: Path, rabbit_url: str, pg_url: str, services: list[Service],
    compression: str,
) -> None:
    source = tmp_path / "gfs"
    source.mkdir()
    (source / "media.bin").write_bytes(os.urandom(12 * MiB))
    with tmpfs(tmp_path / "staging", 8 * MiB) as staging:
        empty = free_bytes(staging)
        settings = archiver_settings(tmp_path, sshd, rabbit_url, pg_url,
                                     compression=compression, max_attempts=2)
        engine = start(archiver_bootstrap(settings, datacenter=DC), services).engine
        # When the inventory undercounts a 12 MiB source as 1 MiB, for an 8 MiB staging
        send(rabbit_url, (archive_request("r1", "shared_fs", "gfs:media", host=address(sshd),
                                          path=str(source), used_bytes=1 * MiB), "m-1"))
        [answered] = wait_answered(engine, ["r1"]).values()
        archive = job(engine, answered.archive_id)
        # Then each attempt failed cleanly on the full disk, and the job failed after the last
        assert answered.state == "failed" and archive.state == "failed"
        assert archive.attempts == 2
        assert f"staging {staging / DC} filled up while archive {archive.id} was written" in \
            archive.error and "its partial files are removed" in archive.error
        # and no partial file is left: the staging volume is as empty as before
        assert list((staging / DC).iterdir()) == []
        assert free_bytes(staging) == empty
