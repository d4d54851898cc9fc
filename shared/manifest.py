"""An archive's manifest: what every member of it is, so a copy can be checked member by member.

The archiver writes one while the raw stream passes it (services.archiver.manifest); the
transfer service reads the archive at the destination with the same `scan` and compares
(`compare`). The format lives here because both ends must agree on it, byte for byte.

A manifest is JSON lines: a header, one line per member, and a trailer that counts them and
carries the archive's sha256 and the sha256 of every line before it, so a truncated or
damaged manifest, or one that belongs to another archive, is told apart from a good one.

Per member: path, type, size, mode, owner (numeric uid/gid, names when tar recorded them),
mtime, link target, device numbers, and the sha256 of a regular file's content. A sparse
file (`tar --sparse`) is hashed as it extracts, holes as zeros, and marked `sparse`: the
hash proves what a restore gets, whichever sparse format tar chose. A name that is not
UTF-8 is kept as its bytes (`path_b64`). A database dump has one member, the raw dump.

This module uses the standard library only, and Python 3.7's: the transfer service runs it
at the destination as a script (`python3 -`, see `script`), where nothing else may exist,
and the archiver runs this file as a script (`python -I shared/manifest.py scan …`).
"""

from __future__ import annotations

import base64
import hashlib
import inspect
import json
import subprocess
import sys
import tarfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import IO, Any

FORMAT = "ferry-manifest/1"
SUFFIX = ".manifest.jsonl"  # beside the archive: `<archive file name>.manifest.jsonl`
READ = 1 << 20
TYPES = {tarfile.REGTYPE: "file", tarfile.AREGTYPE: "file", tarfile.CONTTYPE: "file",
         tarfile.GNUTYPE_SPARSE: "file", tarfile.DIRTYPE: "dir", tarfile.SYMTYPE: "symlink",
         tarfile.LNKTYPE: "hardlink", tarfile.CHRTYPE: "chardev", tarfile.BLKTYPE: "blockdev",
         tarfile.FIFOTYPE: "fifo"}
COMPARED = ("type", "size", "sha256", "mode", "uid", "gid", "uname", "gname", "mtime",
            "target", "target_b64", "major", "minor")
DECOMPRESS = {"zst": ["zstd", "-dc", "--"], "gz": ["gzip", "-dc", "--"]}


class ManifestError(ValueError):
    """A manifest that is incomplete, damaged or not this archive's; or a stream that is not
    a tar archive. The message says which and where."""


def _name(key: str, name: str) -> dict[str, Any]:
    """`{key: name}` for a UTF-8 name, else `{key_b64: its bytes}` (tar names are bytes)."""
    raw = name.encode("utf-8", "surrogateescape")
    try:
        return {key: raw.decode("utf-8")}
    except UnicodeDecodeError:
        return {f"{key}_b64": base64.b64encode(raw).decode("ascii")}


def path_bytes(entry: dict[str, Any]) -> bytes:
    """An entry's path as the bytes tar stored."""
    if "path_b64" in entry:
        return base64.b64decode(entry["path_b64"])
    return str(entry["path"]).encode("utf-8")


def shown(entry: dict[str, Any]) -> str:
    """An entry's path for a message (bytes that are not UTF-8 as \\x escapes)."""
    return path_bytes(entry).decode("utf-8", "backslashreplace")


def describe(member: tarfile.TarInfo) -> dict[str, Any]:
    """One member's entry, without its content hash."""
    kind = TYPES.get(member.type, "other")
    entry: dict[str, Any] = {**_name("path", member.name), "type": kind,
                    "size": member.size if kind == "file" else 0,
                    "mode": member.mode & 0o7777, "uid": member.uid, "gid": member.gid,
                    "mtime": int(member.mtime)}
    if member.uname:
        entry["uname"] = member.uname
    if member.gname:
        entry["gname"] = member.gname
    if kind in ("symlink", "hardlink"):
        entry.update(_name("target", member.linkname))
    if kind in ("chardev", "blockdev"):
        entry["major"], entry["minor"] = member.devmajor, member.devminor
    if member.sparse is not None:
        entry["sparse"] = True
    if kind == "other":
        entry["tar_type"] = member.type.decode("latin-1")
    return entry


class _Forward:
    """A stream that only goes forward, as a file tarfile can `seek` in: tarfile's own
    stream mode (`r|`) copies its whole buffer on every small read, 3.5x slower on a tree of
    small files. tarfile seeks only forward when members are read in order."""

    def __init__(self, stream: IO[bytes]) -> None:
        self.stream = stream
        self.position = 0

    def read(self, size: int | None = -1) -> bytes:
        data = self.stream.read(-1 if size is None else size)
        self.position += len(data)
        return data

    def tell(self) -> int:
        return self.position

    def seekable(self) -> bool:
        return True

    def seek(self, offset: int, whence: int = 0) -> int:
        if whence != 0 or offset < self.position:
            raise tarfile.ReadError(f"cannot go back to byte {offset} of a stream at "
                                    f"{self.position}")
        while self.position < offset:
            if not self.read(min(READ, offset - self.position)):
                break  # cut short: tarfile's next read says so
        return self.position


def _content_sha256(archive: tarfile.TarFile, member: tarfile.TarInfo,
                    forward: _Forward) -> str:
    """A regular member's content hash: read straight from the stream, or through tarfile
    for a sparse one (its holes expanded as zeros)."""
    digest = hashlib.sha256()
    if member.sparse is None:
        forward.seek(member.offset_data)
        left = member.size
        while left:
            chunk = forward.read(min(READ, left))
            if not chunk:
                raise tarfile.ReadError(f"unexpected end of data in {member.name!r}")
            digest.update(chunk)
            left -= len(chunk)
        return digest.hexdigest()
    content = archive.extractfile(member)
    assert content is not None  # noqa: S101 (a regular file always has content)
    chunk = content.read(READ)
    while chunk:
        digest.update(chunk)
        chunk = content.read(READ)
    return digest.hexdigest()


def scan(stream: IO[bytes]) -> Iterator[dict[str, Any]]:
    """Every member of the uncompressed tar `stream`, regular files hashed, in stream order;
    then reads the stream to its end (tar pads past its end marker). Raises ManifestError
    for a stream that is not a whole tar archive."""
    forward = _Forward(stream)
    try:
        archive = tarfile.open(fileobj=forward, mode="r:", encoding="utf-8",  # type: ignore[call-overload]
                               errors="surrogateescape")
        while True:
            member = archive.next()
            if member is None:
                break
            archive.members.clear()  # tarfile keeps every member: a million files add up
            entry = describe(member)
            if entry["type"] == "file":
                entry["sha256"] = _content_sha256(archive, member, forward)
            yield entry
    except tarfile.TarError as error:
        raise ManifestError(f"not a whole tar archive: {error}") from error
    while forward.read(READ):
        pass


def dump_entry(name: str, size: int, sha256: str) -> dict[str, Any]:
    """The one member of a database dump's manifest: the raw dump."""
    return {**_name("path", name), "type": "dump", "size": size, "sha256": sha256}


def line(value: Any) -> bytes:
    """One JSON line, keys sorted: the same entry always makes the same bytes."""
    return json.dumps(value, sort_keys=True, ensure_ascii=True, separators=(",", ":")).encode(
        "ascii") + b"\n"


def header(archive: str, kind: str) -> dict[str, Any]:
    return {"manifest": FORMAT, "archive": archive, "kind": kind}


def trailer(members: int, raw_bytes: int, archive_sha256: str, lines_sha256: str) -> dict[str, Any]:
    """The last line: counts and digests of what came before it (and of the archive)."""
    return {"end": {"members": members, "raw_bytes": raw_bytes,
                    "archive_sha256": archive_sha256, "lines_sha256": lines_sha256}}


@dataclass
class Manifest:
    archive: str
    kind: str  # "tar" or "sql"
    entries: list[dict[str, Any]]
    members: int
    raw_bytes: int
    archive_sha256: str


def parse(data: bytes, where: str) -> Manifest:
    """A manifest's lines, checked whole: the header first, the trailer last, its counts and
    digest right. Raises ManifestError naming `where` (the file) and what is wrong."""
    lines = data.splitlines(keepends=True)
    if not lines or not lines[-1].endswith(b"\n"):
        raise ManifestError(f"manifest {where} is empty or cut short (no final newline)")
    try:
        values = [json.loads(text) for text in lines]
    except ValueError as error:
        raise ManifestError(f"manifest {where} is not JSON lines: {error}") from error
    first, body, last = values[0], values[1:-1], values[-1] if len(values) > 1 else None
    if not isinstance(first, dict) or first.get("manifest") != FORMAT:
        raise ManifestError(f"manifest {where} does not start with a {FORMAT} header")
    end = last.get("end") if isinstance(last, dict) else None
    if not isinstance(end, dict):
        raise ManifestError(f"manifest {where} has no trailer: it was cut short")
    digest = hashlib.sha256(b"".join(lines[:-1])).hexdigest()
    if end.get("lines_sha256") != digest:
        raise ManifestError(f"manifest {where} is damaged: its lines hash to {digest}, its "
                            f"trailer says {end.get('lines_sha256')}")
    if end.get("members") != len(body):
        raise ManifestError(f"manifest {where} lists {len(body)} members, its trailer "
                            f"says {end.get('members')}")
    return Manifest(str(first.get("archive")), str(first.get("kind")), body,
                    int(end["members"]), int(end["raw_bytes"]), str(end["archive_sha256"]))


@dataclass
class Comparison:
    """What a copy of an archive holds against its manifest."""

    checked: int = 0
    missing: list[str] = field(default_factory=list)
    extra: list[str] = field(default_factory=list)
    different: list[tuple[str, list[str]]] = field(default_factory=list)  # path, fields

    @property
    def ok(self) -> bool:
        return not (self.missing or self.extra or self.different)


def compare(expected: list[dict[str, Any]], actual: list[dict[str, Any]]) -> Comparison:
    """Member by member, by path: missing, extra, and the fields that differ (COMPARED)."""
    wanted = {path_bytes(entry): entry for entry in expected}
    result = Comparison()
    seen = set()
    for entry in actual:
        key = path_bytes(entry)
        seen.add(key)
        result.checked += 1
        want = wanted.get(key)
        if want is None:
            result.extra.append(shown(entry))
            continue
        fields = [name for name in COMPARED if want.get(name) != entry.get(name)]
        if fields:
            result.different.append((shown(entry), fields))
    result.missing = [shown(entry) for key, entry in wanted.items() if key not in seen]
    return result


class _Counting:
    """A read-only stream that counts (and for a dump hashes) what is read through it."""

    def __init__(self, stream: IO[bytes], hashing: bool) -> None:
        self.stream = stream
        self.bytes = 0
        self.sha256 = hashlib.sha256() if hashing else None

    def read(self, size: int = -1) -> bytes:
        data = self.stream.read(size)
        self.bytes += len(data)
        if self.sha256 is not None:
            self.sha256.update(data)
        return data


def members(stream: IO[bytes], kind: str, name: str, emit: Callable[[bytes], object]) -> int:
    """`emit` one line per member of the raw stream (`kind` "tar", or "sql": one dump member
    called `name`); returns the stream's size. Raises ManifestError."""
    counted = _Counting(stream, hashing=kind == "sql")
    if counted.sha256 is not None:
        while counted.read(READ):
            pass
        emit(line(dump_entry(name, counted.bytes, counted.sha256.hexdigest())))
    else:
        for entry in scan(counted):  # type: ignore[arg-type]
            emit(line(entry))
    return counted.bytes


def list_archive(path: str, extension: str, kind: str, name: str,
                 emit: Callable[[bytes], object]) -> None:
    """Decompress `path` (a `.zst` or `.gz` file) and `emit` one line per member: what the
    destination holds, in the manifest's terms; then `{"raw_bytes": N}`. Raises
    ManifestError, OSError."""
    command = DECOMPRESS.get(extension)
    if command is None:
        raise ManifestError(f"{path}: unknown compression {extension!r}")
    with subprocess.Popen([*command, path], stdout=subprocess.PIPE) as process:  # noqa: S603
        assert process.stdout is not None  # noqa: S101
        raw_bytes = members(process.stdout, kind, name, emit)
        process.stdout.close()
        if process.wait() != 0:
            raise ManifestError(f"{' '.join(command)} {path} exited {process.returncode}")
    emit(line({"raw_bytes": raw_bytes}))


def script() -> str:
    """This module's source, for `python3 -` (the source on stdin) where the file is not;
    run as a script (this file, or that source), it does:

    - `list PATH EXTENSION KIND NAME`, where the archive is: list_archive's lines;
    - `scan KIND NAME`: the raw stream on stdin, its members' lines on stdout (the archiver
      runs it beside the stream, in its own process: no GIL shared with the compressor).
      A stream that is not what it claims is read to its end anyway, then exit 1.
    """
    return inspect.getsource(sys.modules[__name__])


def main(argv: list[str]) -> int:
    out = sys.stdout.buffer
    try:
        if len(argv) == 5 and argv[0] == "list":
            list_archive(argv[1], argv[2], argv[3], argv[4], out.write)
        elif len(argv) == 3 and argv[0] == "scan":
            try:
                members(sys.stdin.buffer, argv[1], argv[2], out.write)
            finally:
                while sys.stdin.buffer.read(READ):  # the feeder never blocks on us
                    pass
        else:
            sys.stderr.write("usage: manifest list PATH EXTENSION KIND NAME | "
                             "scan KIND NAME\n")
            return 2
    except (ManifestError, OSError) as error:
        sys.stderr.write(f"{error}\n")
        return 1
    out.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
