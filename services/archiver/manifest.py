"""Write an archive's manifest (shared.manifest) while its raw stream passes the archiver.

The stream's chunks go to the compressor and, through a bounded queue, to a thread that
reads them as a tar stream and hashes every regular file (hashlib releases the GIL, so the
hashing runs beside the compressor's threads). A database dump is only hashed. The lines go
to a partial file beside the archive's partial (`<archive>.manifest.jsonl.<n>.partial`,
swept with it); `close` appends the trailer, fsyncs, and `seal` names it with the archive.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import queue
import threading
from dataclasses import dataclass
from pathlib import Path

from shared.errors import PermanentError
from shared.manifest import ManifestError, dump_entry, header, line, scan, trailer

DEPTH = 16  # chunks of up to 1 MiB waiting for the manifest thread: it keeps pace or slows tar
_END = b""


class ManifestFailedError(PermanentError):
    """The stream could not be read as what it claims to be (a tar that is not whole)."""


@dataclass(frozen=True)
class ManifestFile:
    path: Path
    sha256: str
    members: int


class _Chunks:
    """A read-only stream over the chunks put on a queue; b"" ends it."""

    def __init__(self) -> None:
        self.queue: queue.Queue[bytes] = queue.Queue(maxsize=DEPTH)
        self._buffer = memoryview(b"")
        self._ended = False
        self.bytes = 0
        self.sha256 = hashlib.sha256()

    def read(self, size: int = -1) -> bytes:
        parts = []
        wanted = size if size >= 0 else 1 << 62
        while wanted > 0:
            if not self._buffer:
                if self._ended:
                    break
                chunk = self.queue.get()
                if chunk is _END or not chunk:
                    self._ended = True
                    break
                self._buffer = memoryview(chunk)
            part = self._buffer[:wanted]
            self._buffer = self._buffer[len(part):]
            parts.append(part)
            wanted -= len(part)
        data = b"".join(parts)
        self.bytes += len(data)
        return data


class ManifestWriter:
    """`feed` the raw chunks (in the streaming thread), then `close` or `abort`.

    `kind` is "tar" or "sql"; `archive_name` the archive's final file name. Raises
    FileExistsError if `path` exists.
    """

    def __init__(self, path: Path, archive_name: str, kind: str) -> None:
        self.path = path
        self.archive_name = archive_name
        self.kind = kind
        self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        self._lines = hashlib.sha256()
        self._members = 0
        self._chunks = _Chunks()
        self._raw = hashlib.sha256()  # a dump's content; a tar's members are hashed one by one
        self._error: BaseException | None = None
        self._closed = False
        self._write(line(header(archive_name, kind)))
        self._thread = threading.Thread(target=self._read, name=f"manifest-{path.name[:20]}",
                                        daemon=True)
        self._thread.start()

    def _write(self, data: bytes) -> None:
        self._lines.update(data)
        view = memoryview(data)
        while view:
            view = view[os.write(self._fd, view):]

    def _read(self) -> None:
        try:
            if self.kind == "sql":
                while chunk := self._chunks.read(1 << 20):
                    self._raw.update(chunk)
                return
            for entry in scan(self._chunks):  # type: ignore[arg-type]
                self._write(line(entry))
                self._members += 1
        except BaseException as error:  # noqa: BLE001 - given to close(); the feeder goes on
            self._error = error
            while self._chunks.read(1 << 20):  # keep draining: feed() must never block
                pass

    def feed(self, chunk: bytes) -> None:
        """Hand one chunk to the manifest thread (waits while DEPTH chunks are queued)."""
        if chunk:
            self._chunks.queue.put(chunk)

    def close(self, archive_sha256: str) -> ManifestFile:
        """Wait for the last member, append the trailer, fsync. Raises ManifestFailedError
        for a stream that was not what it claimed, OSError."""
        self._chunks.queue.put(_END)
        self._thread.join()
        if isinstance(self._error, ManifestError):
            raise ManifestFailedError(f"{self.archive_name}: the raw stream is "
                                      f"{self._error}") from self._error
        if self._error is not None:
            raise self._error
        if self.kind == "sql":
            self._write(line(dump_entry(self.archive_name.rsplit(".", 1)[0],
                                        self._chunks.bytes, self._raw.hexdigest())))
            self._members = 1
        last = line(trailer(self._members, self._chunks.bytes, archive_sha256,
                            self._lines.hexdigest()))
        self._write(last)  # after it, _lines has hashed the whole file
        os.fsync(self._fd)
        os.close(self._fd)
        self._closed = True
        return ManifestFile(self.path, self._lines.hexdigest(), self._members)

    def abort(self) -> None:
        """Stop the thread and remove the partial file. Raises nothing."""
        if not self._closed:
            with contextlib.suppress(queue.Full):
                self._chunks.queue.put(_END, timeout=5)
            self._thread.join(timeout=30)
            with contextlib.suppress(OSError):
                os.close(self._fd)
            self._closed = True
        self.path.unlink(missing_ok=True)
