"""Raw device-mapper on a Xen host, through the host layer (every command an argv list).

What Ferry makes is named `ferry-<job id>-<attempt>-{real,snap}` (and `-cow` for an LV), so
it can always be told apart from the customers' devices.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from shared.errors import PermanentError
from shared.hosts import Host

TIMEOUT = 60.0
NAME_PREFIX = "ferry-"
# ferry-<12 hex job id>-<attempt>, the snapshot's id; devices and files add a suffix
SNAPSHOT_ID = re.compile(r"^ferry-(?P<job>[0-9a-f]{12})-(?P<attempt>[0-9]+)")
DEVICE = re.compile(r"^/dev/[A-Za-z0-9_.+][A-Za-z0-9_.+/-]*$")


class OriginError(PermanentError):
    """The origin cannot be snapshotted: not a device-mapper device, or already snapshotted."""


@dataclass(frozen=True)
class DmDevice:
    name: str
    major: int
    minor: int
    suspended: bool
    inactive_table: bool
    table: str  # the live table, every line

    @property
    def number(self) -> str:
        """major:minor, as tables name the devices they map."""
        return f"{self.major}:{self.minor}"


def check_device(path: str) -> str:
    """`path` if it is a plain /dev path. Raises PermanentError otherwise (an argument that
    starts with `-` would read as an option, `..` would leave /dev)."""
    if not DEVICE.match(path) or ".." in path.split("/"):
        raise PermanentError(f"not a device path: {path!r} (want /dev/...)")
    return path


def snapshot_id_of(name: str) -> str | None:
    """The snapshot id (`ferry-<job>-<attempt>`) a Ferry device or file name belongs to."""
    match = SNAPSHOT_ID.match(name)
    return match.group(0) if match else None


def scan(host: Host) -> list[DmDevice]:
    """Every device-mapper device on the host with its state and live table."""
    info = host.run(["dmsetup", "info", "-c", "--noheadings", "--separator", " ",
                     "-o", "name,major,minor,attr"], timeout=TIMEOUT).stdout.decode()
    if "No devices found" in info:
        return []
    tables: dict[str, list[str]] = {}
    listing = host.run(["dmsetup", "table"], timeout=TIMEOUT).stdout.decode()
    for line in listing.splitlines():
        name, sep, rest = line.partition(": ")
        if sep:
            tables.setdefault(name, []).append(rest.strip())
    devices = []
    for line in info.splitlines():
        parts = line.split()
        if len(parts) != 4:
            continue
        name, major, minor, attr = parts
        devices.append(DmDevice(name, int(major), int(minor), suspended=attr[2:3] == "s",
                                inactive_table=attr[1:2] == "I",
                                table="\n".join(tables.get(name, []))))
    return devices


def name_of(host: Host, device: str) -> str:
    """The device-mapper name of a device path. Raises OriginError if it is not one."""
    done = host.run(["dmsetup", "info", "-c", "--noheadings", "-o", "name", check_device(device)],
                    timeout=TIMEOUT, ok_exits=(0, 1))
    name = done.stdout.decode().strip()
    if done.exited != 0 or not name or "\n" in name:
        raise OriginError(f"{host.name}: {device} is not a device-mapper device "
                          f"(an LV or a dm linear device): {done.stderr_tail.strip()}")
    return name


def table(host: Host, name: str) -> str:
    return host.run(["dmsetup", "table", name], timeout=TIMEOUT).stdout.decode().strip()


def size_sectors(host: Host, device: str) -> int:
    return int(host.run(["blockdev", "--getsz", device], timeout=TIMEOUT).stdout.decode())


def exists(host: Host, name: str) -> bool:
    return host.run(["dmsetup", "info", name], timeout=TIMEOUT, ok_exits=(0, 1)).exited == 0


def create(host: Host, name: str, table_text: str) -> None:
    """`dmsetup create NAME` with the table on stdin (a table may have several lines)."""
    host.run(["dmsetup", "create", name], stdin=table_text.encode() + b"\n", timeout=TIMEOUT)


def load(host: Host, name: str, table_text: str) -> None:
    host.run(["dmsetup", "load", name], stdin=table_text.encode() + b"\n", timeout=TIMEOUT)


def suspend(host: Host, name: str) -> None:
    host.run(["dmsetup", "suspend", name], timeout=TIMEOUT)


def resume(host: Host, name: str) -> None:
    host.run(["dmsetup", "resume", name], timeout=TIMEOUT)


def clear(host: Host, name: str) -> None:
    """Drop an inactive (loaded, not yet resumed) table, so a resume keeps the live one.
    Idempotent: having no inactive table to drop is fine."""
    host.run(["dmsetup", "clear", name], timeout=TIMEOUT, ok_exits=(0, 1))


def remove(host: Host, name: str) -> None:
    """Remove a device if it exists (idempotent)."""
    if exists(host, name):
        host.run(["dmsetup", "remove", name], timeout=TIMEOUT)


def is_suspended(host: Host, name: str) -> bool:
    done = host.run(["dmsetup", "info", "-c", "--noheadings", "-o", "attr", name],
                    timeout=TIMEOUT, ok_exits=(0, 1))
    return done.exited == 0 and done.stdout.decode().strip()[2:3] == "s"


def snapshot_usage(status_line: str) -> tuple[bool, int, int]:
    """(valid, used sectors, total sectors) from a `snapshot` target's status line.

    The kernel reports `Invalid` once the COW filled up (every read then fails) and
    `Overflow` for a full snapshot it keeps only for merging: both are unusable.
    """
    fields = status_line.split()
    if "Invalid" in fields or "Overflow" in fields:
        return False, 0, 0
    for field in fields:
        used, sep, total = field.partition("/")
        if sep and used.isdigit() and total.isdigit():
            return True, int(used), int(total)
    return True, 0, 0
