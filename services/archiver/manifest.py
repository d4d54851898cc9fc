"""Write an archive's manifest (shared.manifest) while its raw stream passes the archiver.

The stream's chunks go to the compressor and, through a pipe, to a child process that reads
them as a tar stream and hashes every regular file (a database dump: the dump as a whole).
A child and not a thread: tarfile's header parsing is Python, and a thread holding the GIL
made the streaming thread wait for it at every chunk (bench/manifest.py: +83% wall time in
a thread). The child is this interpreter running shared/manifest.py as a script in isolated
mode (`-I`: no environment, no user site, not even its own directory on sys.path), so it
needs nothing installed and imports the standard library only; `ps` names the file, not 14 KB
of source on argv. Its lines go to a partial file beside the archive's partial
(`<archive>.manifest.jsonl.<n>.partial`, swept with it); `close` appends the trailer and
fsyncs, and the job seals it with the archive.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import subprocess
import sys
import threading
from dataclasses import dataclass
from pathlib import Path

from shared import manifest as shared_manifest
from shared.errors import PermanentError, TransientError
from shared.manifest import header, line, trailer

PIPE_BYTES = 1 << 20  # the pipe to the child holds one chunk: the stream rarely waits
SCRIPT = str(Path(shared_manifest.__file__).resolve())  # the child's script: the module itself


class ManifestFailedError(PermanentError):
    """The stream could not be read as what it claims to be (a tar that is not whole)."""


class ManifestInterruptedError(TransientError):
    """The manifest's reader died (killed, out of memory): the next attempt makes it again."""


@dataclass(frozen=True)
class ManifestFile:
    path: Path
    sha256: str
    members: int


class ManifestWriter:
    """`feed` the raw chunks (in the streaming thread), then `close` or `abort`.

    `kind` is "tar" or "sql"; `archive_name` the archive's final file name (a dump's one
    member is named after it, without the compression's extension). Raises FileExistsError
    if `path` exists, OSError if the reader cannot start.
    """

    def __init__(self, path: Path, archive_name: str, kind: str) -> None:
        self.path = path
        self.archive_name = archive_name
        self.kind = kind
        self.raw_bytes = 0
        self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        self._lines = hashlib.sha256()
        self._members = 0
        self._broken = False
        self._closed = False
        self._write(line(header(archive_name, kind)))
        try:
            # our own interpreter and module file, fixed arguments: nothing from outside
            self._child = subprocess.Popen(  # noqa: S603
                [sys.executable, "-I", SCRIPT, "scan", kind,
                 archive_name.rsplit(".", 1)[0]],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        except BaseException:
            os.close(self._fd)
            path.unlink(missing_ok=True)
            raise
        assert self._child.stdin is not None  # noqa: S101 (PIPE above)
        self._stdin = self._child.stdin.fileno()
        with contextlib.suppress(OSError):  # a bigger pipe; fine if refused
            fcntl.fcntl(self._stdin, fcntl.F_SETPIPE_SZ, PIPE_BYTES)
        self._stderr = b""
        self._reader = threading.Thread(target=self._read, name=f"manifest-{path.name[:20]}",
                                        daemon=True)
        self._reader.start()

    def _write(self, data: bytes) -> None:
        self._lines.update(data)
        view = memoryview(data)
        while view:
            view = view[os.write(self._fd, view):]

    def _read(self) -> None:
        """The child's lines into the file (a few hundred bytes per member: cheap here)."""
        assert self._child.stdout is not None and self._child.stderr is not None  # noqa: S101
        for entry in self._child.stdout:
            self._write(entry)
            self._members += 1
        self._stderr = self._child.stderr.read()[-2000:]
        self._child.stdout.close()
        self._child.stderr.close()

    def feed(self, chunk: bytes) -> None:
        """Hand one chunk to the reader (waits while the pipe is full)."""
        self.raw_bytes += len(chunk)
        view = memoryview(chunk)
        while view and not self._broken:
            try:
                view = view[os.write(self._stdin, view):]
            except BrokenPipeError:
                self._broken = True  # the reader died: close() says so; the stream goes on

    def close(self, archive_sha256: str) -> ManifestFile:
        """Wait for the last member, append the trailer, fsync. Raises ManifestFailedError
        for a stream that was not what it claimed, ManifestInterruptedError when the reader
        died, OSError."""
        assert self._child.stdin is not None  # noqa: S101
        with contextlib.suppress(BrokenPipeError):
            self._child.stdin.close()
        self._reader.join()
        exited = self._child.wait()
        said = self._stderr.decode("utf-8", "replace").strip()
        if exited == 1:
            raise ManifestFailedError(f"{self.archive_name}: the raw stream is {said}")
        if exited != 0:
            raise ManifestInterruptedError(f"{self.archive_name}: the manifest's reader "
                                           f"exited {exited}: {said or 'no message'}")
        self._write(line(trailer(self._members, self.raw_bytes, archive_sha256,
                                 self._lines.hexdigest())))  # then _lines hashed the file
        os.fsync(self._fd)
        os.close(self._fd)
        self._closed = True
        return ManifestFile(self.path, self._lines.hexdigest(), self._members)

    def abort(self) -> None:
        """Stop the reader and remove the partial file. Raises nothing."""
        if not self._closed:
            with contextlib.suppress(ProcessLookupError):
                self._child.kill()
            with contextlib.suppress(OSError):
                assert self._child.stdin is not None  # noqa: S101
                self._child.stdin.close()
            self._reader.join(timeout=30)
            self._child.wait()
            with contextlib.suppress(OSError):
                os.close(self._fd)
            self._closed = True
        self.path.unlink(missing_ok=True)
