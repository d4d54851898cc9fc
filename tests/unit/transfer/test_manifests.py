"""The staging manifest is checked before it is sent: absent is fine, anything else wrong
is a permanent failure naming the file."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from services.transfer.manifests import ManifestInvalidError, staged_manifest
from shared.manifest import dump_entry, header, line, trailer

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
