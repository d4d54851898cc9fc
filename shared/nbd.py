"""Mount an nbd export of a snapshot on the archiver host, through a throw-away COW layer.

The Xen host's nbd-server serves the snapshot read-only on its 127.0.0.1; the archiver
reaches it through a paramiko direct-tcpip tunnel (`SSHHost.open_tunnel`). A Xen host
snapshots a running guest without freezing its filesystem, so the snapshot's journal is
dirty: it holds transactions that were committed (fsync'ed) but not yet written in place.
Mounting it `ro,noload` would silently drop them, so the kernel must replay the journal,
which needs a writable device. The export stays read-only; here, nbdkit's `cow` filter
over its `nbd` plugin opens it read-only and keeps every write in an overlay file that is
unlinked at once (under the attachment's own `cow/` directory) and disappears with the
process, so nothing reaches the Xen host. On top of it, a writable device: `nbd-client`
where the `nbd` module exists, else `nbdfuse` (FUSE) + `losetup`. The device is mounted
only as the inventory's filesystem type (never what `blkid` reads from the customer's
bytes), after its head carried that type's superblock and no other's
(`shared.fs_signatures`), with `ro,nosuid,nodev,noexec` (+`nouuid` for XFS). A mount that
fails is a PermanentError with the kernel's message; the journal is never skipped.

Every command runs through a `shared.hosts.Host`: this machine's `LocalExecutor` by
default, or another host over SSH (`on=`), e.g. one whose older kernel still has
reiserfs (removed from Linux 6.13). Each attachment records what it made in
`<run_dir>/<id>/state.json` before making it, with the owner's pid, start time and boot;
`reconcile` undoes the attachments of owners that died (a SIGKILLed archiver worker):
mount, device, nbdfuse, nbdkit and its overlay. `attach_export` always undoes its own,
also on failure.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Protocol

from shared import fs_signatures
from shared.errors import (
    CommandTimedOut,
    FerryError,
    PermanentError,
    TransientError,
    UnexpectedExit,
)
from shared.hosts import Host, LocalExecutor, Result

log = logging.getLogger(__name__)

DEFAULT_RUN_DIR = Path("/run/ferry/nbd")
MOUNT_OPTIONS = "ro,nosuid,nodev,noexec"
EXTRA_OPTIONS = {"xfs": ",nouuid"}  # the snapshot has its origin's UUID
ATTACH_TIMEOUT = 30.0
# a journal replay reads the journal through the tunnel in small requests: minutes on a slow
# link for a large one; past this the attempt is retried (CommandTimedOut is transient)
MOUNT_TIMEOUT = 900.0
STOP_WAIT = 10.0
ANY_EXIT = range(256)
# hints for a type this kernel lacks
GONE = {"reiserfs": "reiserfs left Linux in 6.13: archive it on an archiver whose kernel "
                    "is 6.12 or older"}
# run detached from the caller's session, its output in a log file: `$0` is the log
SPAWN = 'setsid "$@" </dev/null >>"$0" 2>&1 & echo $!'
WRITE = 'cat > "$0.tmp" && mv -f "$0.tmp" "$0"'


class AttachError(TransientError):
    """The export could not be attached (tunnel, nbdkit, nbd, FUSE or loop failed)."""


class MountError(PermanentError):
    """The snapshot cannot be mounted as the inventory's type (the kernel refused it)."""


class UnsupportedFilesystemError(PermanentError):
    """This archiver's kernel has no driver for the inventory's filesystem type."""


class Tunnelling(Protocol):
    def open_tunnel(self, remote_host: str, remote_port: int) -> tuple[int, Callable[[], None]]:
        ...


def _start_time(pid: int) -> str | None:
    """The process's start time (field 22 of /proc/PID/stat): a pid with another start time
    is another process."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]


def _boot_id() -> str:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return ""


class _Box:
    """The machine the attachment lives on, through its Host: commands and small files."""

    def __init__(self, host: Host) -> None:
        self.host = host
        self.name = host.name

    def run(self, argv: list[str], timeout: float = ATTACH_TIMEOUT,
            stdin: bytes | None = None) -> Result:
        """Raises AttachError when the command fails or times out."""
        try:
            return self.host.run(argv, timeout=timeout, stdin=stdin)
        except UnexpectedExit as error:
            raise AttachError(f"{self.name}: {' '.join(argv)} exited {error.exited}: "
                              f"{error.stderr_tail.strip()[-500:]}") from error
        except CommandTimedOut as error:
            raise AttachError(f"{self.name}: {' '.join(argv)}: {error}") from error

    def attempt(self, argv: list[str], timeout: float = ATTACH_TIMEOUT) -> Result:
        """Run, whatever its exit status. Raises what the host raises (timeout, SSH)."""
        return self.host.run(argv, timeout=timeout, ok_exits=ANY_EXIT)

    def read(self, path: str) -> str | None:
        done = self.attempt(["cat", path])
        return done.stdout.decode(errors="replace") if done.exited == 0 else None

    def write(self, path: str, text: str) -> None:
        self.run(["sh", "-c", WRITE, path], stdin=text.encode())

    def exists(self, path: str) -> bool:
        return self.attempt(["test", "-e", path]).exited == 0

    def mounts(self) -> set[str]:
        """The mount points in /proc/mounts, read once."""
        return {line.split()[1] for line in (self.read("/proc/mounts") or "").splitlines()
                if len(line.split()) > 1}

    def mounted(self, path: str) -> bool:
        return path in self.mounts()

    def ours(self, pid: int | None, marker: str) -> bool:
        """Process `pid` runs and names `marker` (our socket or directory) on its command
        line: not a pid reused by another process."""
        if not pid:
            return False
        cmdline = self.attempt(["cat", f"/proc/{pid}/cmdline"]).stdout
        return marker.encode() in cmdline

    def spawn(self, log_path: str, argv: list[str]) -> int:
        """Start argv detached (its own session), output appended to log_path; its pid."""
        return int(self.run(["sh", "-c", SPAWN, log_path, *argv]).stdout.decode().split()[0])

    def log_tail(self, path: str) -> str:
        return (self.read(path) or "").strip()[-500:]


def local_host() -> Host:
    return LocalExecutor("local")


def kernel_nbd_available(on: Host | None = None) -> bool:
    """True where the nbd module is loaded or loads (then nbd-client is used)."""
    box = _Box(on or local_host())
    script = "test -e /sys/module/nbd || modprobe -q nbd 2>/dev/null"
    return box.attempt(["sh", "-c", script]).exited == 0


def check_kernel(fs_type: str, on: Host | None = None) -> None:
    """The kernel of `on` (this machine by default) mounts `fs_type`, after a modprobe
    attempt. Raises UnsupportedFilesystemError naming the kernel, with a hint for reiserfs."""
    box = _Box(on or local_host())
    script = 'modprobe -q "$0" 2>/dev/null; uname -r; cat /proc/filesystems'
    lines = box.run(["sh", "-c", script, fs_type]).stdout.decode().splitlines()
    release = lines[0] if lines else "?"
    if not any(line.split()[-1:] == [fs_type] for line in lines[1:]):
        hint = f"; {GONE[fs_type]}" if fs_type in GONE else ""
        raise UnsupportedFilesystemError(
            f"{box.name}: this archiver's kernel {release} cannot mount {fs_type} (not in "
            f"/proc/filesystems, and no module loaded){hint}")


class _Attachment:
    def __init__(self, box: _Box, run_dir: Path) -> None:
        self.box = box
        self.dir = str(run_dir / uuid.uuid4().hex[:12])
        self.mountpoint = f"{self.dir}/mnt"
        self.socket = f"{self.dir}/nbdkit.sock"
        # one command (one round trip over SSH); mkdir makes its arguments in order, each 700
        box.run(["mkdir", "-p", "-m", "700", self.dir, self.mountpoint, f"{self.dir}/cow"])
        # the directory is the state file's own (reconcile derives it), not recorded
        self.state: dict[str, Any] = {"owner": os.getpid(), "owner_start": _start_time(os.getpid()),
                                      "owner_boot": _boot_id()}
        self.save()

    def save(self) -> None:
        self.box.write(f"{self.dir}/state.json", json.dumps(self.state))

    def record_pid(self, key: str, pidfile: str) -> None:
        """The pid the process wrote itself (what to stop), over the one the spawn saw."""
        text = (self.box.read(pidfile) or "").strip()
        if text.isdigit() and int(text) != self.state.get(key):
            self.state[key] = int(text)
            self.save()


def _wait(ready: Callable[[], bool], dead: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + ATTACH_TIMEOUT
    while not ready():
        if dead():
            raise AttachError(f"{what} exited")
        if time.monotonic() > deadline:
            raise AttachError(f"{what}: not ready after {ATTACH_TIMEOUT:.0f}s")
        time.sleep(0.1)


def _start_cow(att: _Attachment, port: int, export: str) -> None:
    """nbdkit: the cow filter over the nbd plugin, upstream read-only, on a unix socket."""
    box, pidfile, log_path = att.box, f"{att.dir}/nbdkit.pid", f"{att.dir}/nbdkit.log"
    att.state.update(nbdkit_pidfile=pidfile, socket=att.socket)
    att.save()
    pid = box.spawn(log_path, [
        "env", f"TMPDIR={att.dir}/cow", "nbdkit", "--foreground", "--unix", att.socket,
        "--pidfile", pidfile, "--filter=cow", "nbd", "hostname=127.0.0.1", f"port={port}",
        f"export={export}"])
    att.state["nbdkit_pid"] = pid
    att.save()
    try:
        _wait(lambda: box.exists(pidfile), lambda: not box.ours(pid, att.socket),
              f"{box.name}: nbdkit (cow over nbd://127.0.0.1:{port}/{export})")
    except AttachError as error:
        raise AttachError(f"{error}: {box.log_tail(log_path)}") from error
    att.record_pid("nbdkit_pid", pidfile)


def _attach_fuse(att: _Attachment, what: str) -> str:
    box = att.box
    fuse_dir, log_path = f"{att.dir}/fuse", f"{att.dir}/nbdfuse.log"
    box.run(["mkdir", "-p", "-m", "700", fuse_dir])
    att.state["fuse_dir"] = fuse_dir
    att.save()
    pid = box.spawn(log_path, ["nbdfuse", "--pidfile", f"{att.dir}/nbdfuse.pid", fuse_dir,
                               "--unix", att.socket])
    att.state["nbdfuse_pid"] = pid
    att.save()
    try:
        _wait(lambda: box.exists(f"{att.dir}/nbdfuse.pid"), lambda: not box.ours(pid, fuse_dir),
              f"{box.name}: nbdfuse {what}")
    except AttachError as error:
        raise AttachError(f"{error}: {box.log_tail(log_path)}; nbdkit: "
                          f"{box.log_tail(att.dir + '/nbdkit.log')}") from error
    att.record_pid("nbdfuse_pid", f"{att.dir}/nbdfuse.pid")
    att.state["loop"] = box.run(["losetup", "-f", "--show", f"{fuse_dir}/nbd"]
                                ).stdout.decode().strip()
    att.save()
    return str(att.state["loop"])


def _attach_kernel(att: _Attachment, what: str) -> str:
    box = att.box
    listing = box.run(["sh", "-c", 'for d in /sys/block/nbd*; do echo "${d##*/} $(cat $d/size)"; '
                                   "done"]).stdout.decode()
    errors = []
    for line in listing.splitlines():
        name, _, size = line.partition(" ")
        if size.strip() != "0":
            continue
        device = f"/dev/{name}"
        att.state["nbd_device"] = device
        att.save()
        done = box.attempt(["nbd-client", "-unix", att.socket, device])
        if done.exited == 0:
            return device
        errors.append(done.stderr_tail.strip()[-200:])
        del att.state["nbd_device"]
        att.save()
    raise AttachError(f"{box.name}: no free /dev/nbd* device took {what} through nbdkit: "
                      f"{'; '.join(errors[-2:]) or 'none free'}; nbdkit: "
                      f"{box.log_tail(att.dir + '/nbdkit.log')}")


def _dmesg(box: _Box) -> list[str]:
    return box.attempt(["dmesg"]).stdout.decode(errors="replace").splitlines()


def _kernel_message(before: list[str], after: list[str], device: str) -> str:
    """What the kernel said about `device` since `before` (dmesg, where readable)."""
    name = re.compile(rf"\b{re.escape(device.rsplit('/', 1)[-1])}\b")
    known = set(before)
    return " | ".join([line for line in after if line not in known and name.search(line)][-4:])


def _mount(att: _Attachment, device: str, fs_type: str, where: str) -> None:
    box = att.box
    head = box.run(["head", "-c", str(fs_signatures.HEAD_BYTES), device]).stdout
    fs_signatures.check(fs_type, head, f"{where} ({device} on {box.name})")
    att.state["mounted"] = att.mountpoint
    att.save()
    options = MOUNT_OPTIONS + EXTRA_OPTIONS.get(fs_type, "")
    before = _dmesg(box)
    done = box.attempt(["mount", "-t", fs_type, "-o", options, device, att.mountpoint],
                       timeout=MOUNT_TIMEOUT)
    if done.exited != 0:
        kernel = _kernel_message(before, _dmesg(box), device) or done.stderr_tail.strip()[-500:]
        raise MountError(f"{where}: mounting {device} on {box.name} as {fs_type} "
                         f"({options}, journal replayed into the throw-away COW) failed: "
                         f"{kernel}")


def _undo(box: _Box, state: dict[str, Any], directory: str) -> None:
    """Undo an attachment from its recorded state: unmount, detach the device, stop nbdfuse
    and nbdkit (its overlay goes with it), remove the directory. Best effort, idempotent."""
    steps: list[Callable[[], None]] = [
        lambda: _unmount(box, state.get("mounted")),
        lambda: _detach_nbd(box, state.get("nbd_device"), state.get("socket")),
        lambda: _detach_loop(box, state.get("loop"), state.get("fuse_dir")),
        lambda: _stop_fuse(box, state.get("fuse_dir"), state.get("nbdfuse_pid")),
        lambda: _stop_nbdkit(box, state),
    ]
    for step in steps:
        try:
            step()
        except FerryError as error:
            log.warning("nbd: undoing %s on %s: %s", directory, box.name, error)
    mounts = box.mounts()
    for path in (state.get("mounted"), state.get("fuse_dir")):
        if path and path in mounts:  # rm -rf would walk into a mount: leave it
            log.warning("nbd: %s on %s is still mounted; left for the next reconcile", path,
                        box.name)
            return
    box.attempt(["rm", "-rf", directory])


def _unmount(box: _Box, mounted: str | None) -> None:
    if mounted and box.mounted(mounted):
        if box.attempt(["umount", mounted], timeout=120).exited != 0:
            box.attempt(["umount", "-l", mounted])  # busy: detach lazily


def _detach_nbd(box: _Box, device: str | None, socket: str | None) -> None:
    if device and socket:
        name = device.rsplit("/", 1)[-1]
        if (box.read(f"/sys/block/{name}/size") or "0").strip() != "0":
            box.attempt(["nbd-client", "-d", device])


def _detach_loop(box: _Box, loop: str | None, fuse_dir: str | None) -> None:
    if loop and fuse_dir:
        listed = box.attempt(["losetup", "-n", "-O", "BACK-FILE", loop]).stdout.decode().strip()
        if listed.startswith(fuse_dir):  # still ours, not reused by someone else
            box.attempt(["losetup", "-d", loop])


def _stop_fuse(box: _Box, fuse_dir: str | None, pid: int | None) -> None:
    if fuse_dir and box.mounted(fuse_dir):
        box.attempt(["fusermount3", "-u", fuse_dir])
    if fuse_dir:
        _stop(box, pid, fuse_dir, grace=2.0)  # it ends by itself once unmounted


def _stop_nbdkit(box: _Box, state: dict[str, Any]) -> None:
    socket, pid = state.get("socket"), state.get("nbdkit_pid")
    if not socket:
        return
    if not pid and state.get("nbdkit_pidfile"):  # killed between spawn and recording the pid
        text = (box.read(state["nbdkit_pidfile"]) or "").strip()
        pid = int(text) if text.isdigit() else None
    _stop(box, pid, socket)


def _stop(box: _Box, pid: int | None, marker: str, grace: float = 0.0) -> None:
    """Stop our process `pid`: wait `grace` seconds for it to end by itself, then TERM,
    then KILL; return once it is gone. Raises AttachError if it survives SIGKILL."""
    started = time.monotonic()
    sent = ""
    while box.ours(pid, marker):
        waited = time.monotonic() - started
        if waited > grace + 2 * STOP_WAIT:
            raise AttachError(f"{box.name}: process {pid} ({marker}) survives SIGKILL")
        wanted = "KILL" if waited > grace + STOP_WAIT else "TERM" if waited >= grace else ""
        if wanted and wanted != sent:
            box.attempt(["kill", f"-{wanted}", str(pid)])
            sent = wanted
        time.sleep(0.2)


@contextlib.contextmanager
def attach_export(host: Tunnelling | None, export: str, port: int, *, fs_type: str | None,
                  run_dir: Path = DEFAULT_RUN_DIR, on: Host | None = None,
                  where: str = "") -> Iterator[Path]:
    """Mount export `export` of the nbd-server on `host`'s 127.0.0.1:`port` through a
    throw-away COW layer, as `fs_type`; yield the mounted directory. `host` None: the server
    is on the machine that mounts. `on`: the machine that mounts (this one by default; a
    tunnel from here cannot serve another, so `host` must then be None). `where` names the
    source in errors. Everything is undone on leaving, also on failure.

    Raises PermanentError (no fs_type; UnsupportedFilesystemError: the kernel lacks it;
    fs_signatures.SignatureError: the device holds something else; MountError: the kernel
    refused it), AttachError (transient: tunnel, nbdkit, nbd, FUSE or loop failed).
    """
    where = where or f"{getattr(host, 'name', 'local')} export {export}"
    if not fs_type:
        raise PermanentError(f"{where}: the inventory gives no filesystem type for this "
                             "snapshot; it is never guessed from the customer's bytes")
    if host is not None and on is not None:
        raise ValueError("a tunnel from here cannot serve another host: give host or on")
    fs_signatures.require_known(fs_type, where)
    box = _Box(on or local_host())
    check_kernel(fs_type, box.host)
    close_tunnel: Callable[[], None] = lambda: None  # noqa: E731
    local_port = port
    if host is not None:
        local_port, close_tunnel = host.open_tunnel("127.0.0.1", port)
    att: _Attachment | None = None
    try:
        att = _Attachment(box, run_dir)
        _start_cow(att, local_port, export)
        what = f"nbd://127.0.0.1:{local_port}/{export}"
        device = (_attach_kernel(att, what) if kernel_nbd_available(box.host)
                  else _attach_fuse(att, what))
        _mount(att, device, fs_type, where)
        yield Path(att.mountpoint)
    finally:
        try:
            if att is not None:
                _undo(box, att.state, att.dir)
        finally:
            close_tunnel()


def reconcile(run_dir: Path = DEFAULT_RUN_DIR, on: Host | None = None) -> list[str]:
    """Undo attachments in `run_dir` (on `on`, this machine by default) whose owner process
    on this machine is gone (killed workers); the directories it cleaned."""
    box = _Box(on or local_host())
    cleaned: list[str] = []
    listing = box.attempt(["sh", "-c", 'for f in "$0"/*/state.json; do [ -e "$f" ] && '
                                       'echo "$f"; done', str(run_dir)]).stdout.decode()
    for state_file in sorted(listing.splitlines()):
        try:
            state = json.loads(box.read(state_file) or "")
        except ValueError:
            continue
        owner = int(state.get("owner", 0))
        if (owner and state.get("owner_boot", "") in ("", _boot_id())
                and _start_time(owner) == state.get("owner_start")):
            continue  # its owner still runs: not ours to touch
        directory = state_file.rsplit("/", 1)[0]
        log.warning("nbd: undoing %s on %s left by dead process %s", directory, box.name, owner)
        _undo(box, state, directory)
        cleaned.append(directory)
    return cleaned
