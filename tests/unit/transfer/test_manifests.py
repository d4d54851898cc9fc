"""The staging manifest is checked before it is sent: absent is fine, anything else wrong
is a permanent failure naming the file; one that arrived damaged is sent again; a deep
verify where it cannot run says why."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from services.transfer.destination import parse_destination
from services.transfer.manifests import ManifestInvalidError, check_arrived, staged_manifest
from services.transfer.verification import _list_at
from shared.errors import FerryError, TransientError, UnexpectedExit
from shared.hosts import LocalExecutor
from shared.manifest import dump_entry, header, line, trailer
from shared.settings import Settings

SHA = "cd" * 32


def manifest_bytes(archive_sha256: str) -> bytes:
    body = line(header("a1.sql.zst", "sql")) + line(dump_entry("a1.sql", 3, "0" * 64))
    return body + line(trailer(1, 3, archive_sha256, hashlib.sha256(body).hexdigest()))


def payload(**values: str) -> dict[str, str]:
    return {"archive_id": "a1", "sha256": SHA, **values}


def test_an_archive_made_before_manifests_has_none(tmp_path: Path) -> None:
    assert staged_manifest(tmp_path / "a1.sql.zst", payload()) is None


def test_the_archives_own_manifest_is_sent_with_its_sha256(tmp_path: Path) -> None:
    data = manifest_bytes(SHA)
    (tmp_path / "a1.sql.zst.manifest.jsonl").write_bytes(data)
    staged = staged_manifest(tmp_path / "a1.sql.zst", payload())
    assert staged is not None and staged.sha256 == hashlib.sha256(data).hexdigest()


@pytest.mark.parametrize(("data", "recorded", "message"), [
    (manifest_bytes("ef" * 32), "", f"is of an archive with sha256 {'ef' * 32}"),
    (manifest_bytes(SHA)[:-20], "", "cut short"),
    (manifest_bytes(SHA), "0" * 64, f"archive.completed recorded {'0' * 64}"),
], ids=["another-archives", "cut-short", "not-the-recorded-one"])
def test_a_wrong_manifest_is_refused_naming_it(tmp_path: Path, data: bytes, recorded: str,
                                               message: str) -> None:
    (tmp_path / "a1.sql.zst.manifest.jsonl").write_bytes(data)
    with pytest.raises(ManifestInvalidError, match="archive a1: .*") as raised:
        staged_manifest(tmp_path / "a1.sql.zst", payload(manifest_sha256=recorded))
    assert message in str(raised.value) and "a1.sql.zst.manifest.jsonl" in str(raised.value)


def test_a_manifest_that_is_a_symlink_is_refused(tmp_path: Path) -> None:
    (tmp_path / "elsewhere").write_bytes(manifest_bytes(SHA))
    (tmp_path / "a1.sql.zst.manifest.jsonl").symlink_to(tmp_path / "elsewhere")
    with pytest.raises(ManifestInvalidError, match="a1.sql.zst.manifest.jsonl is a symlink"):
        staged_manifest(tmp_path / "a1.sql.zst", payload())


def test_a_manifest_that_arrived_damaged_is_removed_and_sent_again(tmp_path: Path) -> None:
    # Given a manifest at a local destination that is not the one sent
    data = manifest_bytes(SHA)
    (tmp_path / "a1.sql.zst.manifest.jsonl").write_bytes(data)
    staged = staged_manifest(tmp_path / "a1.sql.zst", payload())
    assert staged is not None
    remote = tmp_path / "dest" / "a1.sql.zst.manifest.jsonl"
    remote.parent.mkdir()
    remote.write_bytes(data[:-1] + b" ")
    settings = Settings(state_dir=tmp_path)
    destination = parse_destination(str(tmp_path / "dest"), settings)
    digest = hashlib.sha256(remote.read_bytes()).hexdigest()
    # When it is checked, then it is removed and the attempt is retried (a transient error)
    with pytest.raises(TransientError, match=f"manifest sha256 at local:{remote} is {digest}"):
        check_arrived(staged, digest, destination, LocalExecutor(), str(remote), settings)
    assert not remote.exists()


class NoPython:
    """A destination host without python3 (a fake: the exit status is all that matters)."""

    name = "backup@newsite:22"

    def run(self, argv: list[str], **_: object) -> None:
        raise UnexpectedExit(self.name, argv, 127, "bash: python3: command not found")


def test_a_deep_verify_where_python3_is_missing_says_so() -> None:
    with pytest.raises(FerryError, match="backup@newsite:22 has no python3: a deep verify "
                                         "runs its reader there"):
        _list_at(NoPython(), "/srv/m1/a1.tar.zst", "a1.tar.zst", "tar", 10,  # type: ignore[arg-type]
                 Settings())
