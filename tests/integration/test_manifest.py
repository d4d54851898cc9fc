"""An archive's manifest through the real archiver (real tar over a real sshd on 127.0.0.1) and
the real transfer (real rsync over it): the manifest lists every member as os.lstat sees the
source; it arrives verified; `ferry archives verify --deep` passes on the copy and fails,
naming the member, on a copy with one byte of a member changed or a member missing."""

from __future__ import annotations

import contextlib
import hashlib
import os
import stat
import subprocess
import tarfile
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import zstandard

from services.transfer.verification import verify_archive
from shared.contracts import ArchiveCompleted
from shared.hosts import LocalExecutor
from shared.manifest import parse, path_bytes
from shared.settings import Settings
from shared.ssh import SSHConfig, SSHHost
from tests.integration.test_archiver import (
    address,
    answers,
    archive_request,
    archiver_settings,
    fill,
    mariadb,  # noqa: F401 - the fixture
    running,
    send,
)
from tests.integration.test_transfer import Migration, remote_settings, start, wait_job
from tests.support.processes import run_ferry
from tests.support.sshd import SshServer

LONG = "a-directory-with-a-long-name-" * 3 + "/" + "and-a-file-whose-name-is-longer-" * 3
BAD_NAME = b"latin1-caf\xe9.txt"  # not UTF-8
CHANGED = "docs/readme.txt"


@pytest.fixture(scope="module")
def sshd() -> Iterator[SshServer]:
    with SshServer() as server:
        yield server


def build_source(root: Path) -> None:
    """Regular files, a symlink, a hard link, a sparse file, a long name, a name that is not
    UTF-8, a fifo, a character device, and owners other than root."""
    (root / "docs").mkdir(parents=True)
    (root / CHANGED).write_bytes(b"the customer's readme\n" * 100)
    (root / "docs" / "empty").write_bytes(b"")
    (root / "data.bin").write_bytes(os.urandom(300_000))
    (root / "docs" / "link-to-readme").symlink_to("readme.txt")
    os.link(root / "data.bin", root / "docs" / "hard-to-data")
    with (root / "disk.img").open("wb") as sparse:
        sparse.truncate(32 << 20)
        sparse.seek(20 << 20)
        sparse.write(b"a few bytes in a hole " * 50)
    (root / LONG).parent.mkdir()
    (root / LONG).write_bytes(b"long name\n")
    (root / os.fsdecode(BAD_NAME)).write_bytes(b"caf\xe9\n")
    os.mkfifo(root / "a-fifo")
    os.mknod(root / "a-null", stat.S_IFCHR | 0o640, os.makedev(1, 3))
    os.chown(root / "docs", 4242, 4343)
    os.chown(root / CHANGED, 1001, 100)
    os.chown(root / "docs" / "link-to-readme", 33, 33, follow_symlinks=False)
    os.chmod(root / "data.bin", 0o4750)  # noqa: S103 - a setuid bit the manifest must keep


def lstat_kind(mode: int) -> str:
    for test, kind in ((stat.S_ISREG, "file"), (stat.S_ISDIR, "dir"), (stat.S_ISLNK, "symlink"),
                       (stat.S_ISFIFO, "fifo"), (stat.S_ISCHR, "chardev")):
        if test(mode):
            return kind
    raise AssertionError(f"unexpected file type {mode:o}")


def check_against_source(entries: list[dict[str, Any]], root: Path) -> None:
    """Every entry is what os.lstat says of the source path, and every source path has one."""
    by_path = {path_bytes(entry): entry for entry in entries}
    on_disk = {b"."} | {b"./" + os.fsencode(p.relative_to(root)) for p in root.rglob("*")}
    assert set(by_path) == on_disk
    for raw, entry in by_path.items():
        path = os.path.join(os.fsencode(root), raw)
        st = os.lstat(path)
        assert (entry["mode"], entry["uid"], entry["gid"]) == (
            stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid), raw
        assert entry["mtime"] == int(st.st_mtime), raw
        if entry["type"] == "hardlink":  # the second name of an inode tar already stored
            target = os.lstat(os.path.join(os.fsencode(root), path_bytes(
                {"path": entry["target"]} if "target" in entry else
                {"path_b64": entry["target_b64"]})))
            assert (target.st_ino, stat.S_ISREG(st.st_mode)) == (st.st_ino, True), raw
            continue
        assert entry["type"] == lstat_kind(st.st_mode), raw
        if entry["type"] == "file":
            with open(path, "rb") as content:  # holes read as zeros
                digest = hashlib.file_digest(content, "sha256").hexdigest()
            assert (entry["size"], entry["sha256"]) == (st.st_size, digest), raw
        if entry["type"] == "symlink":
            assert entry["target"] == os.readlink(path).decode(), raw
        if entry["type"] == "chardev":
            assert (entry["major"], entry["minor"]) == (os.major(st.st_rdev),
                                                        os.minor(st.st_rdev)), raw


@dataclass
class Transferred:
    settings: Settings
    archive: Path  # the copy at the destination
    job: Any


@pytest.fixture(scope="module")
def transferred(sshd: SshServer, tmp_path_factory: pytest.TempPathFactory) -> Transferred:
    """The source archived by the real archiver, then sent by the real transfer over ssh."""
    tmp_path = tmp_path_factory.mktemp("manifest")
    source = tmp_path / "source"
    build_source(source)
    settings = archiver_settings(tmp_path, sshd)
    with running(settings) as service:
        send(settings.broker_url, (archive_request(
            "r1", "shared_fs", "k1", host=address(sshd), path=str(source)), "m-manifest"))
        completed = answers(service, ["r1"])["r1"]
    assert completed["type"] == "archive.completed", completed
    staged = Path(completed["path"])
    manifest = parse(Path(f"{staged}.manifest.jsonl").read_bytes(), "staging")
    check_against_source(manifest.entries, source)
    assert manifest.archive_sha256 == completed["sha256"]
    # the sparse file is marked so, the long and the non-UTF-8 names kept exactly
    [sparse] = [e for e in manifest.entries if e.get("path") == "./disk.img"]
    assert sparse.get("sparse") and sparse["size"] == 32 << 20
    assert any(path_bytes(e) == b"./" + BAD_NAME and "path_b64" in e for e in manifest.entries)
    assert any(e.get("path") == f"./{LONG}" for e in manifest.entries)

    root = tmp_path / "destination"
    transfer = remote_settings(sshd, root, tmp_path, state_dir=tmp_path / "state",
                               staging_dir=settings.staging_dir)
    services: list[Any] = []
    try:
        service = start(transfer, services)
        migration = Migration("memory://", "m-manifest")
        migration.resolve("r1")
        event = ArchiveCompleted.model_validate({
            key: value for key, value in completed.items() if key != "type"})
        assert event.started_at <= datetime.now(event.started_at.tzinfo)
        migration._publish(event)
        job = wait_job(service, event.archive_id, "done")
    finally:
        for running_service in services:
            running_service.stop()
            running_service.engine.dispose()
    arrived = root / "m-manifest" / staged.name
    manifest_copy = Path(f"{arrived}.manifest.jsonl")
    assert manifest_copy.read_bytes() == Path(f"{staged}.manifest.jsonl").read_bytes()
    assert job.result["manifest_sha256"] == hashlib.sha256(manifest_copy.read_bytes()).hexdigest()
    return Transferred(transfer, arrived, job)


def destination_host(sshd: SshServer) -> SSHHost:
    return SSHHost(SSHConfig(host=sshd.host, port=sshd.port, user=sshd.user,
                             key_path=sshd.user_key_path, known_hosts_path=sshd.known_hosts_path,
                             connect_timeout=5), name="destination")


def verify_cli(done: Transferred) -> subprocess.CompletedProcess[str]:
    settings = done.settings
    return run_ferry("archives", "verify", "--deep", "m-manifest", env={
        "FERRY_STATE_DIR": str(settings.state_dir),
        "FERRY_SSH_KEY_PATH": str(settings.ssh_key_path),
        "FERRY_SSH_KNOWN_HOSTS_PATH": str(settings.ssh_known_hosts_path), "COLUMNS": "250"})


@contextlib.contextmanager
def replaced(archive: Path, change: Callable[[Path], None]) -> Iterator[None]:
    """The destination's archive rebuilt: decompressed, `change`d as a raw tar, compressed
    again; the original put back afterwards."""
    original = archive.read_bytes()
    raw = archive.with_name("raw.tar")
    raw.write_bytes(zstandard.ZstdDecompressor().stream_reader(original).read())
    try:
        change(raw)
        archive.write_bytes(zstandard.ZstdCompressor().compress(raw.read_bytes()))
        yield
    finally:
        raw.unlink(missing_ok=True)
        archive.write_bytes(original)


def change_one_byte(raw: Path) -> None:
    """One byte of CHANGED's content flipped: same size, same headers."""
    with tarfile.open(raw) as archive:
        offset = archive.getmember(f"./{CHANGED}").offset_data
    data = bytearray(raw.read_bytes())
    data[offset] ^= 0x20
    raw.write_bytes(bytes(data))


def drop_long_name(raw: Path) -> None:
    subprocess.run(["tar", "--delete", "-f", str(raw), f"./{LONG}"], check=True)


def test_deep_verify_passes_on_the_transferred_archive(sshd: SshServer,
                                                       transferred: Transferred) -> None:
    # Given the archive and its manifest at the destination (the fixture checked the manifest
    # against os.lstat of the source), when it is verified deep where it arrived
    check = verify_archive(transferred.job, destination_host(sshd), transferred.settings,
                           deep=True)
    # Then every member matches
    assert check.ok, check
    assert check.comparison is not None and check.comparison.checked == check.members > 10
    done = verify_cli(transferred)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "1 archive(s) of m-manifest match their manifests" in done.stdout


@pytest.mark.parametrize(("change", "finding"), [
    (change_one_byte, ("different", [(f"./{CHANGED}", ["sha256"])])),
    (drop_long_name, ("missing", [f"./{LONG}"])),
], ids=["one-byte-changed", "member-missing"])
def test_deep_verify_fails_naming_the_member(sshd: SshServer, transferred: Transferred,
                                             change: Callable[[Path], None],
                                             finding: tuple[str, list[Any]]) -> None:
    # Given the destination's archive rebuilt with one member changed or left out
    with replaced(transferred.archive, change):
        # When it is verified deep
        check = verify_archive(transferred.job, destination_host(sshd), transferred.settings,
                               deep=True)
        done = verify_cli(transferred)
    # Then it fails, naming that member and nothing else
    assert not check.ok and check.comparison is not None
    kind, expected = finding
    found = {"different": check.comparison.different, "missing": check.comparison.missing,
             "extra": check.comparison.extra}
    assert found == {"different": [], "missing": [], "extra": [], kind: expected}
    name = expected[0][0] if kind == "different" else expected[0]
    assert done.returncode == 1, done.stdout + done.stderr
    assert f"{kind}" in done.stdout and name in done.stdout, done.stdout


def transfer_locally(tmp_path: Path, staging: Path, completed: dict[str, Any]) -> Any:
    """Send one archive.completed's archive to a local destination with the real transfer."""
    settings = Settings(broker_url="memory://", state_dir=tmp_path / "state",
                        staging_dir=staging, destination=str(tmp_path / "destination"),
                        outbox_poll_seconds=0.1, job_poll_seconds=0.1, lease_seconds=3.0,
                        transfer_backoff_seconds=0.2, transfer_timeout_seconds=30)
    services: list[Any] = []
    try:
        service = start(settings, services)
        migration = Migration("memory://", "m-local")
        migration.resolve(completed["request_id"])
        migration._publish(ArchiveCompleted.model_validate(
            {key: value for key, value in completed.items() if key != "type"}))
        return settings, wait_job(service, completed["archive_id"], "done")
    finally:
        for service in services:
            service.stop()
            service.engine.dispose()


def test_a_dump_has_one_member_and_verifies_deep_at_a_local_destination(
    sshd: SshServer, tmp_path: Path, mariadb: tuple[Any, list[str]],  # noqa: F811
) -> None:
    connection, created = mariadb
    database = f"ferry_manifest_{uuid.uuid4().hex[:8]}"
    created.append(database)
    fill(connection, database, 2_000)
    # Given a database archived by the real archiver (mysqldump over ssh)
    settings = archiver_settings(tmp_path, sshd)
    with running(settings) as service:
        send("memory://", (archive_request("r1", "database", f"db:{database}",
                                           host=address(sshd), database=database,
                                           engine="mysql"), "m-local"))
        completed = answers(service, ["r1"])["r1"]
    assert completed["type"] == "archive.completed", completed
    # Then its manifest has one member: the raw dump, its size and sha256
    staged = Path(completed["path"])
    dump = zstandard.ZstdDecompressor().stream_reader(staged.read_bytes()).read()
    manifest = parse(Path(f"{staged}.manifest.jsonl").read_bytes(), "staging")
    assert len(dump) == completed["raw_bytes"]
    assert manifest.entries == [{"path": staged.name.removesuffix(".zst"), "type": "dump",
                                 "size": len(dump), "sha256": hashlib.sha256(dump).hexdigest()}]
    # When it is sent to a local destination and verified deep there
    transfer, job = transfer_locally(tmp_path, settings.staging_dir, completed)
    check = verify_archive(job, LocalExecutor(), transfer, deep=True)
    # Then it matches
    assert check.ok and check.comparison is not None and check.comparison.checked == 1, check


def test_an_archive_made_before_manifests_is_sent_and_says_no_deep_verify(
    tmp_path: Path,
) -> None:
    # Given a staging archive with no manifest beside it (made before manifests existed)
    staging = tmp_path / "staging"
    (staging / "ey04").mkdir(parents=True)
    archive = staging / "ey04" / "old1.tar.zst"
    archive.write_bytes(zstandard.ZstdCompressor().compress(b"\0" * 10240))
    now = datetime.now(UTC)
    completed = ArchiveCompleted(
        datacenter="ey04", request_id="r-old", archive_id="old1", kind="shared_fs",
        reuse_key="old1", path=str(archive), file_name=archive.name, raw_bytes=10240,
        compressed_bytes=archive.stat().st_size,
        sha256=hashlib.sha256(archive.read_bytes()).hexdigest(), started_at=now,
        finished_at=now).model_dump(mode="json")
    # When it is transferred, then it arrives verified, with no manifest
    settings, job = transfer_locally(tmp_path, staging, completed)
    assert job.result["manifest"] is None
    assert sorted(p.name for p in (tmp_path / "destination" / "m-local").iterdir()) == [
        archive.name]
    # And a deep verify says no deep verify is possible, which is no mismatch
    check = verify_archive(job, LocalExecutor(), settings, deep=True)
    assert check.ok and check.comparison is None
    assert check.notes == ["no manifest (archived before manifests): no deep verify possible"]
