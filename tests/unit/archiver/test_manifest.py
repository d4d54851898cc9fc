"""The manifest writer on real GNU tar streams (every format tar writes sparse files in), a
dump, and streams that are cut or not tar at all; the format's own checks."""

from __future__ import annotations

import hashlib
import os
import subprocess
from pathlib import Path

import pytest

from services.archiver.compress import remove_partials
from services.archiver.manifest import (
    ManifestFailedError,
    ManifestInterruptedError,
    ManifestWriter,
)
from shared.manifest import compare, line, parse, path_bytes, scan

ARCHIVE_SHA = "ab" * 32


def small_tree(root: Path) -> Path:
    (root / "d").mkdir(parents=True)
    (root / "d" / "file.txt").write_bytes(b"hello\n" * 1000)
    with (root / "holes.img").open("wb") as sparse:  # 12 data regions: GNU's extended
        sparse.truncate(4 << 20)                       # sparse headers (4 fit in one)
        for region in range(12):
            sparse.seek(region * (300 << 10) + 7)
            sparse.write(bytes([region + 1]) * 5000)
    (root / ("n" * 120)).write_bytes(b"long")
    (root / os.fsdecode(b"bad-\xff")).write_bytes(b"bytes")
    (root / "sym").symlink_to("d/file.txt")
    os.link(root / "d" / "file.txt", root / "hard")
    return root


def tar_bytes(root: Path, *options: str) -> bytes:
    return subprocess.run(["tar", "-C", str(root), "--sort=name", "--numeric-owner", "--sparse",
                           *options, "-cpf", "-", "."], check=True, capture_output=True).stdout


def write(path: Path, data: bytes, kind: str, chunk: int) -> Path:
    writer = ManifestWriter(path, "a1.tar.zst" if kind == "tar" else "a1.sql.zst", kind)
    for start in range(0, len(data), chunk):
        writer.feed(data[start:start + chunk])
    writer.close(ARCHIVE_SHA)
    return path


@pytest.mark.parametrize("tar_format", ["gnu", "pax", "oldgnu"])
@pytest.mark.parametrize("chunk", [1 << 20, 4097])
def test_tar_stream_in_any_chunking_lists_every_member(tmp_path: Path, tar_format: str,
                                                       chunk: int) -> None:
    # Given a GNU tar stream of a tree with holes, a long and a non-UTF-8 name, links
    root = small_tree(tmp_path / "src")
    data = tar_bytes(root, f"--format={tar_format}")
    # When it passes the manifest writer in chunks of any size
    manifest = parse(write(tmp_path / "m", data, "tar", chunk).read_bytes(), "m")
    # Then every member is listed, the sparse file hashed as it extracts (holes as zeros)
    by_path = {path_bytes(e): e for e in manifest.entries}
    assert set(by_path) == {b".", b"./d", b"./d/file.txt", b"./holes.img", b"./" + b"n" * 120,
                            b"./bad-\xff", b"./sym", b"./hard"}
    holes = by_path[b"./holes.img"]
    assert holes["sha256"] == hashlib.sha256((root / "holes.img").read_bytes()).hexdigest()
    assert holes["size"] == 4 << 20 and holes.get("sparse")
    assert by_path[b"./hard"]["type"] == "hardlink"
    assert by_path[b"./sym"]["target"] == "d/file.txt"
    assert (manifest.raw_bytes, manifest.archive_sha256) == (len(data), ARCHIVE_SHA)
    # And a reader of the same stream (what deep verify runs) finds no difference
    assert compare(manifest.entries, list(scan(_Bytes(data)))).ok  # type: ignore[arg-type]


class _Bytes:
    def __init__(self, data: bytes) -> None:
        self.data, self.at = data, 0

    def read(self, size: int = -1) -> bytes:
        end = len(self.data) if size < 0 else self.at + size
        part, self.at = self.data[self.at:end], min(end, len(self.data))
        return part


def test_a_dump_gets_one_member_its_size_and_sha256(tmp_path: Path) -> None:
    dump = b"CREATE TABLE t (a int);\n" * 50_000
    manifest = parse(write(tmp_path / "m", dump, "sql", 65536).read_bytes(), "m")
    assert manifest.entries == [{"path": "a1.sql", "type": "dump", "size": len(dump),
                                 "sha256": hashlib.sha256(dump).hexdigest()}]


def test_a_stream_that_is_not_tar_fails_and_leaves_nothing(tmp_path: Path) -> None:
    writer = ManifestWriter(tmp_path / "m.partial", "a1.tar.zst", "tar")
    writer.feed(b"this is no tar header" * 100)
    with pytest.raises(ManifestFailedError, match="a1.tar.zst: the raw stream is not a whole"):
        writer.close(ARCHIVE_SHA)
    writer.abort()
    assert list(tmp_path.iterdir()) == []


def test_a_stream_cut_short_is_aborted_without_blocking(tmp_path: Path) -> None:
    # Given half of a tar stream fed (the connection dropped)
    data = tar_bytes(small_tree(tmp_path / "src"))
    writer = ManifestWriter(tmp_path / "m.partial", "a1.tar.zst", "tar")
    for start in range(0, len(data) // 2, 512):
        writer.feed(data[start:start + 512])
    # When the attempt gives up, then its reader ends and its partial file is gone
    writer.abort()
    assert not writer._reader.is_alive() and writer._child.poll() is not None
    assert not (tmp_path / "m.partial").exists()


def test_a_cut_damaged_or_foreign_manifest_is_refused(tmp_path: Path) -> None:
    good = write(tmp_path / "m", tar_bytes(small_tree(tmp_path / "src")), "tar",
                 1 << 20).read_bytes()
    lines = good.splitlines(keepends=True)
    with pytest.raises(ValueError, match="no trailer: it was cut short"):
        parse(b"".join(lines[:-1]), "m")
    with pytest.raises(ValueError, match="cut short"):
        parse(good[:-1], "m")
    damaged = good.replace(b'"./d/file.txt"', b'"./d/file.TXT"')
    with pytest.raises(ValueError, match="is damaged: its lines hash to"):
        parse(damaged, "m")
    with pytest.raises(ValueError, match="does not start with a ferry-manifest/1 header"):
        parse(line({"something": "else"}) + lines[-1], "m")


def test_compare_names_missing_extra_and_different_members() -> None:
    base = {"type": "file", "size": 1, "mode": 0o644, "uid": 0, "gid": 0, "mtime": 1,
            "sha256": "0" * 64}
    expected = [{"path": "./a", **base}, {"path": "./b", **base}, {"path_b64": "Li//", **base}]
    actual = [{"path": "./a", **base, "sha256": "1" * 64, "uid": 7}, {"path": "./c", **base},
              {"path_b64": "Li//", **base}]
    result = compare(expected, actual)
    assert (result.checked, result.missing, result.extra) == (3, ["./b"], ["./c"])
    assert result.different == [("./a", ["sha256", "uid"])] and not result.ok


def test_partial_manifests_are_removed_with_partial_archives(tmp_path: Path) -> None:
    for name in ("a1.tar.zst.1234abcd.partial", "a1.tar.zst.manifest.jsonl.1234abcd.partial",
                 "a1.tar.zst", "a1.tar.zst.manifest.jsonl"):
        (tmp_path / name).write_bytes(b"x")
    removed = remove_partials(tmp_path, "a1")
    assert sorted(p.name for p in removed) == ["a1.tar.zst.1234abcd.partial",
                                               "a1.tar.zst.manifest.jsonl.1234abcd.partial"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a1.tar.zst",
                                                         "a1.tar.zst.manifest.jsonl"]


def test_a_reader_that_dies_is_a_retryable_failure_and_the_stream_goes_on(
    tmp_path: Path,
) -> None:
    # Given a manifest reader killed mid-stream (out of memory, say)
    data = tar_bytes(small_tree(tmp_path / "src"))
    writer = ManifestWriter(tmp_path / "m.partial", "a1.tar.zst", "tar")
    writer.feed(data[:10240])
    writer._child.kill()
    writer._child.wait()
    # When the rest of the stream passes, then feeding never fails or blocks
    for start in range(10240, len(data), 4096):
        writer.feed(data[start:start + 4096])
    # And closing says the manifest must be made again (a transient error), leaving nothing
    with pytest.raises(ManifestInterruptedError, match="a1.tar.zst: the manifest's reader "
                                                       "exited -9"):
        writer.close(ARCHIVE_SHA)
    writer.abort()
    assert list(tmp_path.iterdir()) == [tmp_path / "src"]
