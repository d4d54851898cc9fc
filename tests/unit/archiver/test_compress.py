"""The compressor on the archiver host: standard formats, deterministic, 0600, sealed whole."""

from __future__ import annotations

import gzip
import hashlib
import os
import random
import stat
import subprocess
from pathlib import Path

import pytest
import zstandard

from services.archiver.compress import ArchiveWriter, remove_partials, seal


def sample(size: int = 5_000_000) -> bytes:
    rng = random.Random(7)
    text = b"".join(f"row {i} value {rng.random()}\n".encode() for i in range(size // 30))
    return (text + rng.randbytes(size // 4))[:size]


def chunked(data: bytes, sizes: list[int]) -> list[bytes]:
    chunks, at, i = [], 0, 0
    while at < len(data):
        size = sizes[i % len(sizes)]
        chunks.append(data[at:at + size])
        at, i = at + size, i + 1
    return chunks


def write(path: Path, compression: str, chunks: list[bytes]) -> tuple[int, int, str]:
    writer = ArchiveWriter(path, compression)
    for chunk in chunks:
        writer.write(chunk)
    done = writer.close()
    return done.raw_bytes, done.compressed_bytes, done.sha256


@pytest.mark.parametrize("compression", ["zstd", "gzip"])
def test_output_is_a_standard_file_with_counts_and_hash_of_what_was_written(
    compression: str, tmp_path: Path,
) -> None:
    data = sample()
    path = tmp_path / "a.partial"

    raw, compressed, sha = write(path, compression, chunked(data, [65536, 1000, 3 << 20]))

    body = path.read_bytes()
    assert raw == len(data) and compressed == len(body) < len(data)
    assert sha == hashlib.sha256(body).hexdigest()
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    if compression == "gzip":
        assert gzip.decompress(body) == data
        tool = ["gzip", "-t", str(path)]
        assert body[4:8] == b"\0\0\0\0" and body[3] & 0x08 == 0  # no mtime, no file name
    else:
        assert zstandard.ZstdDecompressor().decompressobj().decompress(body) == data
        tool = ["zstd", "-t", "-q", str(path)]
    assert subprocess.run(tool, capture_output=True).returncode == 0


@pytest.mark.parametrize("compression", ["zstd", "gzip"])
def test_same_input_chunked_differently_gives_identical_bytes(compression: str,
                                                             tmp_path: Path) -> None:
    data = sample(3_000_000)

    first = write(tmp_path / "one", compression, chunked(data, [4096]))
    second = write(tmp_path / "two", compression, chunked(data, [1 << 20, 77, 200_000]))

    assert first == second


def test_aborted_file_is_removed(tmp_path: Path) -> None:
    writer = ArchiveWriter(tmp_path / "x.partial", "zstd")
    writer.write(b"some bytes" * 1000)

    writer.abort()

    assert list(tmp_path.iterdir()) == []


def test_an_existing_name_is_never_overwritten(tmp_path: Path) -> None:
    (tmp_path / "x.partial").write_bytes(b"other attempt")

    with pytest.raises(FileExistsError):
        ArchiveWriter(tmp_path / "x.partial", "gzip")
    assert (tmp_path / "x.partial").read_bytes() == b"other attempt"


def test_seal_renames_and_leftovers_of_one_archive_only_are_removed(tmp_path: Path) -> None:
    (tmp_path / "a1.tar.zst.1111.partial").write_bytes(b"dead worker's")
    (tmp_path / "a1.tar.zst.2222.partial").write_bytes(b"mine")
    (tmp_path / "b2.tar.zst.3333.partial").write_bytes(b"another archive's")

    removed = remove_partials(tmp_path, "a1")
    (tmp_path / "a1.tar.zst.4444.partial").write_bytes(b"done")
    seal(tmp_path / "a1.tar.zst.4444.partial", tmp_path / "a1.tar.zst")

    assert {p.name for p in removed} == {"a1.tar.zst.1111.partial", "a1.tar.zst.2222.partial"}
    assert sorted(os.listdir(tmp_path)) == ["a1.tar.zst", "b2.tar.zst.3333.partial"]
