"""Compress a raw archive stream into a staging file on the archiver host.

zstd (python `zstandard`, multi-threaded) or standard gzip (ISA-L's `igzip_threaded`, on
every core; single-threaded zlib is far too slow to keep up with the stream). The file is
created 0600 under a temporary name; `close()` flushes, fsyncs and reports raw bytes,
compressed bytes and the sha256 of the file's bytes, counted as they are written.
Beside each archive lies its manifest (services.archiver.manifest), sealed with it.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Protocol, cast

import zstandard
from isal import igzip_threaded

from shared.manifest import SUFFIX

EXTENSIONS = {"zstd": "zst", "gzip": "gz"}
# Input goes to the compressor in blocks of exactly this size, so block boundaries (and so
# the output bytes) do not depend on how the network happened to chunk the stream.
BLOCK = 1 << 20


class _Stream(Protocol):
    def write(self, data: Any, /) -> int: ...
    def close(self) -> None: ...


@dataclass(frozen=True)
class ArchiveFile:
    path: Path
    raw_bytes: int
    compressed_bytes: int
    sha256: str
    manifest: Path | None = None  # its manifest, sealed with it (None: made before manifests)
    manifest_sha256: str = ""
    excluded: tuple[str, ...] = ()  # what the source command left out on purpose


def manifest_path(archive: Path) -> Path:
    """Where an archive's manifest lies: beside it, `<archive file name>.manifest.jsonl`."""
    return archive.with_name(archive.name + SUFFIX)


class _HashingFile:
    """The compressor's output: written to the fd, hashed and counted on the way."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.bytes = 0
        self.sha256 = hashlib.sha256()

    def write(self, data: Any) -> int:
        view = memoryview(data).cast("B")
        self.sha256.update(view)
        size = len(view)
        while view:
            view = view[os.write(self.fd, view):]
        self.bytes += size
        return size

    def flush(self) -> None:
        """Nothing buffered here; the compressors call it."""


class ArchiveWriter:
    """Feed raw chunks with `write`; `close` seals the file, `abort` removes it.

    Raises FileExistsError if `path` exists (a temporary name is unique per attempt).
    """

    def __init__(self, path: Path, compression: str, *, zstd_level: int = 3,
                 gzip_level: int = 2, threads: int = 0) -> None:
        if compression not in EXTENSIONS:
            raise ValueError(f"unknown compression {compression!r}: zstd or gzip")
        self.path = path
        self.raw_bytes = 0
        self._pending: list[bytes] = []
        self._pending_bytes = 0
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        self._file = _HashingFile(fd)
        self._closed = False
        try:
            self._out = self._compressor(compression, zstd_level, gzip_level, threads)
        except BaseException:
            os.close(fd)
            path.unlink(missing_ok=True)
            raise

    def _compressor(self, compression: str, zstd_level: int, gzip_level: int,
                    threads: int) -> _Stream:
        if compression == "zstd":
            # 0: a worker per core; 1: compress in the streaming thread itself, no workers
            workers = {0: -1, 1: 0}.get(threads, threads)
            context = zstandard.ZstdCompressor(level=zstd_level, threads=workers)
            # zstandard's stubs want IO[bytes]; it only ever calls write() and flush()
            stream: _Stream = context.stream_writer(cast(IO[bytes], self._file), closefd=False)
            return stream
        # igzip_threaded writes a plain header: no file name, mtime 0 (deterministic)
        gzip: _Stream = igzip_threaded.open(self._file, "wb", compresslevel=gzip_level,
                                            threads=threads or -1, block_size=BLOCK)
        return gzip

    def write(self, chunk: bytes) -> None:
        self.raw_bytes += len(chunk)
        self._pending.append(chunk)
        self._pending_bytes += len(chunk)
        if self._pending_bytes >= BLOCK:
            data = b"".join(self._pending)
            whole = len(data) - len(data) % BLOCK
            view = memoryview(data)
            for start in range(0, whole, BLOCK):
                self._out.write(view[start:start + BLOCK])
            rest = bytes(view[whole:])
            self._pending = [rest] if rest else []
            self._pending_bytes = len(rest)

    def close(self) -> ArchiveFile:
        """Finish the compressed stream and fsync the file. Raises OSError."""
        if self._pending:
            self._out.write(b"".join(self._pending))
            self._pending = []
        self._out.close()
        os.fsync(self._file.fd)
        os.close(self._file.fd)
        self._closed = True
        return ArchiveFile(self.path, self.raw_bytes, self._file.bytes,
                           self._file.sha256.hexdigest())

    def abort(self) -> None:
        """Stop and remove the file. Raises nothing."""
        if not self._closed:
            with contextlib.suppress(Exception):
                self._out.close()
            with contextlib.suppress(OSError):
                os.close(self._file.fd)
            self._closed = True
        self.path.unlink(missing_ok=True)


def seal(partial: Path, final: Path) -> None:
    """Rename the finished file to its final name, durably (the directory is fsynced)."""
    os.replace(partial, final)
    fd = os.open(final.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def remove_partials(directory: Path, archive_id: str) -> list[Path]:
    """Delete what earlier attempts at this archive left behind (a worker killed mid-stream):
    partial archives and partial manifests alike."""
    removed = []
    for leftover in directory.glob(f"{archive_id}.*.partial"):
        leftover.unlink(missing_ok=True)
        removed.append(leftover)
    return removed
