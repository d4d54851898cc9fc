"""The archiver end to end on the embedded backbone: real sshd on 127.0.0.1, real tar, real
MariaDB; archives extracted or restored and compared with their source."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import stat
import subprocess
import tarfile
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pymysql
import pytest
import zstandard
from sqlalchemy import select

from ferry.loopback_sshd import free_port
from services.archiver.bootstrap import bootstrap
from services.archiver.tables import archive_jobs, archive_requests
from shared.bus import Publisher
from shared.contracts import ArchiveRequested, ArchiveSource, Event, SnapshotReady
from shared.envelope import Envelope
from shared.inbox_outbox import outbox_table
from shared.runtime import Service
from shared.settings import Settings
from tests.support.helpers import wait_for
from tests.support.sshd import SshServer
from tests.support.trees import allocated_bytes, build_tree, describe

DC = "ey04"


@pytest.fixture(scope="module")
def sshd() -> Iterator[SshServer]:
    with SshServer() as server:
        yield server


def address(server: SshServer) -> str:
    return f"{server.user}@{server.host}:{server.port}"


def archiver_settings(tmp_path: Path, server: SshServer, broker_url: str = "memory://",
                      db_url: str | None = None, **overrides: Any) -> Settings:
    values: dict[str, Any] = {
        "broker_url": broker_url, "state_dir": tmp_path / "state",
        "archiver_database_url": db_url, "staging_dir": tmp_path / "staging",
        "ssh_key_path": server.user_key_path, "ssh_known_hosts_path": server.known_hosts_path,
        "lease_seconds": 2.0, "job_poll_seconds": 0.1, "outbox_poll_seconds": 0.1,
        "retry_delays": (0.2, 0.5), "max_attempts": 3,
        # these tests' shared filesystems are plain directories (test_archiver_placement
        # checks real mounts)
        "shared_fs_mount_check": False,
    }
    values.update(overrides)
    return Settings(**values)


@contextlib.contextmanager
def running(settings: Settings, datacenter: str = DC, concurrency: int = 2) -> Iterator[Service]:
    service = bootstrap(settings, datacenter=datacenter, concurrency=concurrency)
    service.start()
    try:
        yield service
    finally:
        service.stop()
        service.engine.dispose()


def send(broker_url: str, *events: tuple[Event, str]) -> list[Envelope]:
    publisher = Publisher(broker_url)
    sent = []
    try:
        for event, migration_id in events:
            envelope = Envelope.wrap(event, migration_id=migration_id)
            publisher.publish(envelope.to_json(), routing_key=envelope.routing_key)
            sent.append(envelope)
    finally:
        publisher.close()
    return sent


def archive_request(request_id: str, kind: str, key: str, datacenter: str = DC,
                    **source: Any) -> ArchiveRequested:
    return ArchiveRequested(datacenter=datacenter, request_id=request_id, kind=kind,  # type: ignore[arg-type]
                            reuse_key=key, source=ArchiveSource.model_validate(source))


def answers(service: Service, request_ids: list[str], timeout: float = 60) -> dict[str, Any]:
    """Wait until every request is answered; its archive.completed / archive.failed payloads."""

    def done() -> dict[str, Any] | None:
        with service.engine.connect() as connection:
            states = dict(connection.execute(
                select(archive_requests.c.request_id, archive_requests.c.state)
                .where(archive_requests.c.request_id.in_(request_ids))).all())
            if len(states) < len(request_ids) or "waiting" in states.values():
                return None
            bodies = [json.loads(r.body) for r in connection.execute(select(outbox_table.c.body))]
        found = {b["payload"]["request_id"]: {**b["payload"], "type": b["type"]} for b in bodies
                 if b["type"] in {"archive.completed", "archive.failed"}}
        return found if set(request_ids) <= set(found) else None

    found: dict[str, Any] = wait_for(done, timeout=timeout, what=f"answers to {request_ids}")  # type: ignore[assignment]
    return found


def jobs(service: Service) -> list[Any]:
    with service.engine.connect() as connection:
        return list(connection.execute(select(archive_jobs)))


def staged(settings: Settings) -> list[str]:
    root = settings.staging_dir
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())


def extract(archive: Path, into: Path) -> None:
    into.mkdir()
    flag = "--zstd" if archive.name.endswith(".zst") else "--gzip"
    subprocess.run(["tar", flag, "--numeric-owner", "-xpf", str(archive), "-C", str(into)],
                   check=True, capture_output=True)


# -- shared filesystems -------------------------------------------------------------------


@pytest.fixture(scope="module")
def tree(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("tree") / "data"
    build_tree(root, files=5000)
    return root


@pytest.mark.parametrize("compression", ["zstd", "gzip"])
def test_shared_fs_archived_over_ssh_extracts_to_an_identical_tree(
    compression: str, tree: Path, sshd: SshServer, tmp_path: Path,
) -> None:
    settings = archiver_settings(tmp_path, sshd, compression=compression)
    with running(settings) as service:
        # Given a shared filesystem of 5,000 files mounted on a VM reached over SSH
        send("memory://", (archive_request("r1", "shared_fs", "gfs:data", host=address(sshd),
                                           path=str(tree), label="ey04-e00075:/data"), "m-1"))
        # When it is archived
        completed = answers(service, ["r1"])["r1"]
        [job] = jobs(service)
    # Then the archive is sealed under its final name, 0600, with what the event says
    assert completed["type"] == "archive.completed", completed
    archive = Path(completed["path"])
    suffix = ".tar.zst" if compression == "zstd" else ".tar.gz"
    assert archive.name == f"{job.id}{suffix}" and archive.parent == settings.staging_dir / DC
    # no partial file left; the manifest beside it
    assert staged(settings) == [f"{DC}/{archive.name}", f"{DC}/{archive.name}.manifest.jsonl"]
    assert stat.S_IMODE(archive.stat().st_mode) == 0o600
    assert completed["compressed_bytes"] == archive.stat().st_size < completed["raw_bytes"]
    assert job.sha256 == completed["sha256"] and job.source_label == "ey04-e00075:/data"
    assert job.raw_bytes == job.bytes_done and job.warnings == []
    # And it extracts to the same names, modes, owners, sizes, contents, links and hard links
    copy = tmp_path / "extracted"
    extract(archive, copy)
    assert describe(copy) == describe(tree)
    for sparse in tree.rglob("sparse-*.img"):
        assert allocated_bytes(copy / sparse.relative_to(tree)) < 1 << 20  # holes kept


def test_file_changing_while_read_is_a_warning_not_a_failure(sshd: SshServer,
                                                            tmp_path: Path) -> None:
    live = tmp_path / "live"
    live.mkdir()
    growing = live / "growing.log"
    with growing.open("wb") as handle:
        handle.truncate(0)
        handle.write(b"\0" * (200 << 20))
    stop = threading.Event()

    def append() -> None:  # a busy application writing to its log
        with growing.open("ab") as handle:
            while not stop.is_set():
                handle.write(b"request served\n")
                handle.flush()

    writer = threading.Thread(target=append, daemon=True)
    writer.start()
    try:
        settings = archiver_settings(tmp_path, sshd, archive_progress_seconds=0.2,
                                     zstd_level=9)  # slower: time for progress reports
        with running(settings) as service:
            send("memory://", (archive_request("r1", "shared_fs", "live", host=address(sshd),
                                               path=str(live)), "m-1"))
            completed = answers(service, ["r1"])["r1"]
            with service.engine.connect() as connection:
                bodies = [json.loads(b) for b in connection.execute(select(outbox_table.c.body))
                          .scalars()]
    finally:
        stop.set()
        writer.join()
    assert completed["type"] == "archive.completed"
    assert "file changed as we read it" in " ".join(completed["warnings"])
    # and progress (raw bytes so far) was reported on the way
    progress = [b["payload"]["bytes_done"] for b in bodies if b["type"] == "archive.progress"]
    assert progress and progress == sorted(progress) and progress[-1] <= completed["raw_bytes"]


def test_connection_lost_mid_stream_is_retried_and_completes(sshd: SshServer,
                                                              tmp_path: Path) -> None:
    source = tmp_path / "app"
    source.mkdir()
    (source / "data.txt").write_bytes(b"".join(b"line %d of a busy log\n" % i
                                               for i in range(250_000)))
    # a slow compressor keeps the stream open long enough to cut it
    settings = archiver_settings(tmp_path, sshd, zstd_level=19, compression_threads=1)
    with running(settings) as service:
        send("memory://", (archive_request("r1", "shared_fs", "app", host=address(sshd),
                                           path=str(source)), "m-1"))
        wait_for(lambda: any(p.stat().st_size for p in settings.staging_dir.rglob("*.partial")
                             if ".manifest." not in p.name),  # the archive's, not its manifest
                 timeout=60, what="archive streaming (compressed bytes written)")
        # When the SSH connection dies mid-archive (the host rebooted, a network blip)
        sshd.drop_connections()
        completed = answers(service, ["r1"], timeout=180)["r1"]
        [job] = jobs(service)
    # Then the attempt is given back, retried on a new connection, and completes
    assert completed["type"] == "archive.completed" and job.attempts >= 2
    assert staged(settings) == [f"{DC}/{job.id}.tar.zst", f"{DC}/{job.id}.tar.zst.manifest.jsonl"]
    body = zstandard.ZstdDecompressor().stream_reader(Path(job.file_path).read_bytes()).read()
    assert len(body) == job.raw_bytes and b"line 249999 of a busy log" in body


# -- databases ----------------------------------------------------------------------------


@pytest.fixture
def mariadb() -> Iterator[tuple[pymysql.connections.Connection[Any], list[str]]]:
    connection = pymysql.connect(host="127.0.0.1", port=3306, user="root", password="",
                                 charset="utf8mb4", autocommit=True)
    created: list[str] = []
    yield connection, created
    with connection.cursor() as cursor:
        for name in created:
            cursor.execute(f"DROP DATABASE IF EXISTS `{name}`")
    connection.close()


def fill(connection: Any, database: str, rows: int) -> None:
    with connection.cursor() as cursor:
        cursor.execute(f"CREATE DATABASE `{database}` CHARACTER SET utf8mb4")
        cursor.execute(f"USE `{database}`")
        cursor.execute("""CREATE TABLE items (id INT PRIMARY KEY, name VARCHAR(100) NOT NULL,
            amount DECIMAL(12,2), created DATETIME(6), data BLOB, note TEXT, flag TINYINT)""")
        cursor.execute("CREATE TABLE audit (id INT AUTO_INCREMENT PRIMARY KEY, item INT)")
        cursor.execute("CREATE TRIGGER items_audit AFTER UPDATE ON items FOR EACH ROW "
                       "INSERT INTO audit (item) VALUES (NEW.id)")
        cursor.execute("CREATE PROCEDURE item_count() SELECT COUNT(*) FROM items")
        batch = []
        for i in range(rows):
            batch.append((i, f"item {i} — ünïcødé ✓ 'quoted' \\ back", f"{i * 1.25:.2f}",
                          f"2024-01-{i % 28 + 1:02d} 10:{i % 60:02d}:00.{i % 999999:06d}",
                          bytes([i % 256, (i * 7) % 256, 0, 39, 92]) if i % 3 else None,
                          None if i % 5 else "note\nwith newline\tand tab", i % 2))
            if len(batch) == 10_000:
                cursor.executemany("INSERT INTO items VALUES (%s,%s,%s,%s,%s,%s,%s)", batch)
                batch = []
        if batch:
            cursor.executemany("INSERT INTO items VALUES (%s,%s,%s,%s,%s,%s,%s)", batch)


def restore(archive: Path, database: str) -> None:
    mysql = subprocess.Popen(["mysql", "--default-character-set=utf8mb4", database],
                             stdin=subprocess.PIPE, stderr=subprocess.PIPE)
    assert mysql.stdin is not None
    with archive.open("rb") as compressed:
        reader = zstandard.ZstdDecompressor().stream_reader(compressed)
        shutil.copyfileobj(reader, mysql.stdin, 1 << 20)
    mysql.stdin.close()
    assert mysql.wait() == 0, mysql.stderr.read() if mysql.stderr else ""


def table_rows(connection: Any, database: str, table: str) -> list[tuple[Any, ...]]:
    with connection.cursor() as cursor:
        cursor.execute(f"SELECT * FROM `{database}`.`{table}` ORDER BY id")  # noqa: S608 (ours)
        return list(cursor.fetchall())


def test_database_dumped_on_the_replica_restores_row_for_row(
    sshd: SshServer, tmp_path: Path, mariadb: tuple[Any, list[str]],
) -> None:
    connection, created = mariadb
    source, copy = f"ferry_src_{uuid.uuid4().hex[:8]}", f"ferry_dst_{uuid.uuid4().hex[:8]}"
    created += [source, copy]
    # Given a database of 100k rows on "the replica" (this MariaDB, reached through sshd)
    fill(connection, source, 100_000)
    settings = archiver_settings(tmp_path, sshd)
    with running(settings) as service:
        # When it is archived
        send("memory://", (archive_request("r1", "database", f"db:{source}", host=address(sshd),
                                           database=source, engine="mysql",
                                           pause_replication=True), "m-1"))
        completed = answers(service, ["r1"])["r1"]
        [job] = jobs(service)
    assert completed["type"] == "archive.completed", completed
    assert completed["file_name"] == f"{job.id}.sql.zst"
    # this server is no replica: no position, and the asked-for pause is a recorded warning
    assert job.replication_position is None
    assert completed["warnings"] == [f"pause_replication asked, but {address(sshd)} "
                                     "is not a replica"]
    # Then it restores into a fresh database, row for row, with its trigger and routine
    with connection.cursor() as cursor:
        cursor.execute(f"CREATE DATABASE `{copy}` CHARACTER SET utf8mb4")
    restore(Path(completed["path"]), copy)
    original = table_rows(connection, source, "items")
    assert len(original) == 100_000
    assert table_rows(connection, copy, "items") == original
    with connection.cursor() as cursor:
        cursor.execute(f"SHOW TRIGGERS FROM `{copy}`")
        assert [row[0] for row in cursor.fetchall()] == ["items_audit"]
        cursor.execute(f"SHOW PROCEDURE STATUS WHERE Db = '{copy}'")
        assert [row[1] for row in cursor.fetchall()] == ["item_count"]


def test_server_root_shared_by_two_migrations_is_archived_once(
    sshd: SshServer, tmp_path: Path,
) -> None:
    # Given a database server's root (a small stand-in) with runtime and data directories
    root = tmp_path / "root"
    for name, body in [("etc/my.cnf", "[mysqld]\n"), ("proc/1/status", "running"),
                       ("tmp/scratch", "x"), ("run/mysqld.pid", "1"), ("dev/null-ish", ""),
                       ("sys/kernel", "k"), ("var/lib/mysql/ibdata1", "pages"),
                       ("var/log/mysql.log", "log"), ("home/tmp/keep", "kept")]:
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(body)
    settings = archiver_settings(tmp_path, sshd, compression="gzip")
    with running(settings) as service:
        # When two migrations whose databases live on it each ask for its root
        send("memory://",
             *[(archive_request(f"r{i}", "db_server_root", "root:mysql-mega-2-replica",
                                host=address(sshd), path=str(root), engine="mysql"), f"m-{i}")
               for i in (1, 2)])
        found = answers(service, ["r1", "r2"])
        archives = jobs(service)
    # Then one archive answers both, and it holds the root without runtime or data files
    assert len(archives) == 1 and archives[0].attempts == 1
    assert {found[r]["archive_id"] for r in ("r1", "r2")} == {archives[0].id}
    assert sorted(found[r]["reused"] for r in ("r1", "r2")) == [False, True]
    with tarfile.open(found["r1"]["path"]) as archive:
        names = sorted(archive.getnames())
    # (and without /home's and /var/log's contents: test_archiver_scrub has the whole list)
    assert names == [".", "./dev", "./etc", "./etc/my.cnf", "./home", "./proc", "./run",
                     "./sys", "./tmp", "./var", "./var/lib", "./var/lib/mysql", "./var/log"]


def test_server_root_whose_server_cannot_be_asked_relies_on_the_inventory_excludes(
    tmp_path: Path,
) -> None:
    root = tmp_path / "root"
    for name in ("etc/hostname", "var/lib/mysql/ibdata1"):
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(name)
    # Given a replica on this machine whose mysql client is refused (a user that does not exist)
    settings = Settings(broker_url="memory://", state_dir=tmp_path / "state",
                        staging_dir=tmp_path / "staging", outbox_poll_seconds=0.1,
                        job_poll_seconds=0.1, source_db_user="ferry_no_such_user",
                        compression="gzip")
    with running(settings) as service:
        # When one root request has the inventory's excludes and another has none
        send("memory://",
             (archive_request("r1", "db_server_root", "root:a", host="local", path=str(root),
                              engine="mysql", excludes=("/var/lib/mysql",)), "m-1"),
             (archive_request("r2", "db_server_root", "root:b", host="local", path=str(root),
                              engine="mysql"), "m-2"))
        found = answers(service, ["r1", "r2"])
    # Then the first is archived without the data directory, with a warning saying why
    assert found["r1"]["type"] == "archive.completed"
    [warning] = found["r1"]["warnings"]
    assert "could not ask local for its data directory" in warning and "denied" in warning
    with tarfile.open(found["r1"]["path"]) as archive:
        assert "./etc/hostname" in archive.getnames()
        assert not [n for n in archive.getnames() if n.startswith("./var/lib/mysql")]
    # and the second fails, naming the command and what the server said
    assert found["r2"]["type"] == "archive.failed" and found["r2"]["host"] == "local"
    assert found["r2"]["command"].startswith("mysql --user=ferry_no_such_user")
    assert "Access denied" in found["r2"]["stderr_tail"]


# -- local filesystems from snapshot.ready ------------------------------------------------


def test_snapshot_without_driver_is_archived_as_a_directory_and_nbd_fails_clearly(
    sshd: SshServer, tmp_path: Path,
) -> None:
    source = tmp_path / "vm-root"
    (source / "etc").mkdir(parents=True)
    (source / "etc" / "hostname").write_text("ey04-s50000\n")

    def ready(request_id: str, driver: str, fs_type: str | None = "ext4") -> SnapshotReady:
        return SnapshotReady(datacenter=DC, request_id=request_id, snapshot_id=f"s-{request_id}",
                             driver=driver, host=address(sshd), port=port, size_bytes=1 << 30,  # type: ignore[arg-type]
                             export_name=f"s-{request_id}",
                             reuse_key=f"local:{request_id}",
                             source=ArchiveSource(host=address(sshd), path=str(source),
                                                  device="/dev/vg0/ey04-s50000-root",
                                                  fs_type=fs_type))

    # no nbd-server listens there: the tunnel's forward is refused, the attach fails
    port = free_port()
    settings = archiver_settings(tmp_path, sshd)
    with running(settings) as service:
        send("memory://", (ready("r1", "none"), "m-1"), (ready("r2", "dm"), "m-1"),
             (ready("r3", "dm", fs_type=None), "m-1"))
        found = answers(service, ["r1", "r2", "r3"])
    assert found["r1"]["type"] == "archive.completed" and found["r1"]["kind"] == "local_fs"
    copy = tmp_path / "copy"
    extract(Path(found["r1"]["path"]), copy)
    assert (copy / "etc" / "hostname").read_text() == "ey04-s50000\n"
    assert found["r2"]["type"] == "archive.failed"
    assert found["r2"]["reason"].startswith("AttachError: local: nbdfuse nbd://127.0.0.1:")
    assert "/s-r2 exited" in found["r2"]["reason"] and not found["r2"]["will_retry"]
    assert list((settings.state_dir / "nbd").iterdir()) == []  # nothing left mounted
    # a snapshot without the inventory's fs type is never mounted by a guessed one
    assert found["r3"]["type"] == "archive.failed" and not found["r3"]["will_retry"]
    assert "gives no filesystem type" in found["r3"]["reason"]
    name = Path(found["r1"]["path"]).name
    assert staged(settings) == [f"{DC}/{name}", f"{DC}/{name}.manifest.jsonl"]


# -- hostile input ------------------------------------------------------------------------


def test_crafted_mountpoint_and_database_name_never_reach_a_shell(
    sshd: SshServer, tmp_path: Path,
) -> None:
    marker = uuid.uuid4().hex[:8]
    pwned_x, pwned_y = Path(f"/tmp/pwned-{marker}-X"), Path(f"/tmp/pwned-{marker}-Y")
    settings = archiver_settings(tmp_path, sshd)
    with running(settings) as service:
        # Given requests built directly, past the document's validation
        send("memory://",
             (archive_request("r1", "shared_fs", "evil-fs", host=address(sshd),
                              path=f"/data; touch {pwned_x}"), "m-1"),
             (archive_request("r2", "database", "evil-db", host=address(sshd),
                              database=f"$(touch {pwned_y})", engine="mysql"), "m-1"))
        found = answers(service, ["r1", "r2"])
        failed_jobs = [j for j in jobs(service) if j.state == "failed"]
    # Then no file was created and both fail with errors that say what was wrong
    assert not pwned_x.exists() and not pwned_y.exists()
    # the mountpoint reached tar as one quoted argument: tar says it does not exist
    assert found["r1"]["type"] == "archive.failed" and found["r1"]["host"] == address(sshd)
    assert f"/data; touch {pwned_x}: Cannot open: No such file or directory" in \
        found["r1"]["stderr_tail"]
    assert found["r1"]["command"].startswith("nice -n 19 ionice -c3 -t tar -C '/data; touch ")
    assert len(failed_jobs) == 1 and failed_jobs[0].attempts == 1  # permanent: not retried
    # the database name is refused before anything runs
    assert found["r2"]["type"] == "archive.failed" and "not a plain name" in found["r2"]["reason"]
    assert staged(settings) == []


def test_host_layer_alone_keeps_a_crafted_database_name_away_from_the_shell(
    sshd: SshServer,
) -> None:
    from services.archiver.sources import dump_command
    from shared.addresses import host_pool
    from shared.errors import UnexpectedExit

    marker = Path(f"/tmp/pwned-{uuid.uuid4().hex[:8]}-Z")
    settings = Settings(ssh_key_path=sshd.user_key_path,
                        ssh_known_hosts_path=sshd.known_hosts_path)
    source = ArchiveSource(host=address(sshd), database=f"$(touch {marker})", engine="mysql")
    pool = host_pool(settings)
    # When the dump command is run without the archiver's validation
    with pytest.raises(UnexpectedExit) as failure:
        pool.get(address(sshd)).run(dump_command(source, settings).argv)
    pool.close_all()
    # Then mysqldump got the name as one argument, and no shell ever ran it
    assert f"Unknown database '$(touch {marker})'" in failure.value.stderr_tail
    assert not marker.exists()
    assert os.path.exists("/tmp")
