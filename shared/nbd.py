"""Mount an nbd export of a snapshot read-only on the archiver host, through an SSH tunnel.

The Xen host's nbd-server listens on its 127.0.0.1 only; the archiver reaches it through a
paramiko direct-tcpip tunnel (`SSHHost.open_tunnel`). Where the `nbd` kernel module exists,
`nbd-client -readonly` makes /dev/nbdN; elsewhere (no module, e.g. in a container) FUSE does:
`nbdfuse -r DIR nbd://127.0.0.1:PORT/EXPORT` shows the export as DIR/nbd, `losetup -r`
turns that into a block device. Either device is mounted read-only without journal replay
(`ro,noload` for ext3/ext4, `ro,norecovery` for XFS, `ro,nolog` for ReiserFS): the snapshot
is crash-consistent, and replaying its journal would need a writable device.

Each attachment records what it made in `<run_dir>/<id>/state.json` before making it, with
the owner's pid and start time; `reconcile` undoes the attachments of owners that died
(a SIGKILLed archiver worker), and `attach_export` always undoes its own, also on failure.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import signal
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Protocol

from shared.errors import PermanentError, TransientError

log = logging.getLogger(__name__)

DEFAULT_RUN_DIR = Path("/run/ferry/nbd")
MOUNT_OPTIONS = {"ext2": "ro", "ext3": "ro,noload", "ext4": "ro,noload",
                 "xfs": "ro,norecovery", "reiserfs": "ro,nolog"}
ATTACH_TIMEOUT = 30.0


class AttachError(TransientError):
    """The export could not be attached or mounted (tunnel, nbd, loop or mount failed)."""


class Tunnelling(Protocol):
    def open_tunnel(self, remote_host: str, remote_port: int) -> tuple[int, Callable[[], None]]:
        ...


def _run(argv: list[str], timeout: float = ATTACH_TIMEOUT, check: bool = True) -> str:
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
    except (OSError, subprocess.TimeoutExpired) as error:
        raise AttachError(f"{argv[0]}: {error}") from error
    if check and done.returncode != 0:
        raise AttachError(f"{' '.join(argv)} exited {done.returncode}: {done.stderr.strip()}")
    return done.stdout


def _start_time(pid: int) -> str | None:
    """The process's start time (field 22 of /proc/PID/stat): a pid with another start time
    is another process."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]


def kernel_nbd_available() -> bool:
    """True where the nbd module is loaded or loads (then nbd-client is used)."""
    if Path("/sys/module/nbd").exists():
        return True
    if shutil.which("modprobe") is None:
        return False
    return subprocess.run(["modprobe", "nbd"], capture_output=True).returncode == 0


class _Attachment:
    def __init__(self, run_dir: Path) -> None:
        self.dir = run_dir / uuid.uuid4().hex[:12]
        self.dir.mkdir(parents=True, mode=0o700)
        self.mountpoint = self.dir / "mnt"
        self.mountpoint.mkdir()
        self.state: dict[str, Any] = {"owner": os.getpid(), "owner_start": _start_time(os.getpid())}
        self.save()

    def save(self) -> None:
        tmp = self.dir / "state.json.tmp"
        tmp.write_text(json.dumps(self.state))
        tmp.replace(self.dir / "state.json")


def _attach_fuse(att: _Attachment, uri: str) -> str:
    fuse_dir = att.dir / "fuse"
    fuse_dir.mkdir()
    att.state["fuse_dir"] = str(fuse_dir)
    # its own session: it outlives a killed owner, for reconcile to find by pid
    process = subprocess.Popen(["nbdfuse", "-r", str(fuse_dir), uri], stdin=subprocess.DEVNULL,
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                               start_new_session=True)
    att.state["nbdfuse_pid"] = process.pid
    att.save()
    image = fuse_dir / "nbd"
    deadline = time.monotonic() + ATTACH_TIMEOUT
    while not image.exists():
        if process.poll() is not None:
            err = process.stderr.read().decode(errors="replace") if process.stderr else ""
            raise AttachError(f"nbdfuse {uri} exited {process.returncode}: {err.strip()}")
        if time.monotonic() > deadline:
            raise AttachError(f"nbdfuse {uri}: no {image} after {ATTACH_TIMEOUT:.0f}s")
        time.sleep(0.1)
    att.state["loop"] = _run(["losetup", "-r", "-f", "--show", str(image)]).strip()
    att.save()
    return str(att.state["loop"])


def _attach_kernel(att: _Attachment, port: int, export: str) -> str:
    for size_file in sorted(Path("/sys/block").glob("nbd*/size")):
        device = f"/dev/{size_file.parent.name}"
        if size_file.read_text().strip() != "0":
            continue
        att.state["nbd_device"] = device
        att.save()
        done = subprocess.run(["nbd-client", "-N", export, "127.0.0.1", str(port), device,
                               "-readonly"], capture_output=True, text=True,
                              timeout=ATTACH_TIMEOUT)
        if done.returncode == 0:
            return device
        del att.state["nbd_device"]
        att.save()
    raise AttachError(f"no free /dev/nbd* device took export {export}")


def _mount(att: _Attachment, device: str) -> None:
    fstype = _run(["blkid", "-o", "value", "-s", "TYPE", device], check=False).strip()
    if not fstype:
        raise PermanentError(f"{device}: no filesystem found on the snapshot")
    att.state["mounted"] = str(att.mountpoint)
    att.save()
    _run(["mount", "-t", fstype, "-o", MOUNT_OPTIONS.get(fstype, "ro"), device,
          str(att.mountpoint)], timeout=120)


def _undo(state: dict[str, Any], directory: Path) -> None:
    """Undo an attachment from its recorded state: unmount, detach, stop nbdfuse, remove."""
    mounted = state.get("mounted")
    if mounted and _is_mounted(mounted):
        if subprocess.run(["umount", mounted], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", mounted], capture_output=True)  # busy: detach lazily
    if state.get("nbd_device"):
        subprocess.run(["nbd-client", "-d", state["nbd_device"]], capture_output=True)
    loop, fuse_dir = state.get("loop"), state.get("fuse_dir")
    if loop and fuse_dir:
        listed = subprocess.run(["losetup", "-n", "-O", "BACK-FILE", loop], capture_output=True,
                                text=True).stdout.strip()
        if listed.startswith(fuse_dir):  # still ours, not reused by someone else
            subprocess.run(["losetup", "-d", loop], capture_output=True)
    if fuse_dir and _is_mounted(fuse_dir):
        subprocess.run(["fusermount3", "-u", fuse_dir], capture_output=True)
    pid = state.get("nbdfuse_pid")
    if pid and fuse_dir and fuse_dir.encode() in _cmdline(int(pid)):
        with contextlib.suppress(ProcessLookupError):
            os.kill(int(pid), signal.SIGTERM)
    shutil.rmtree(directory, ignore_errors=True)


def _cmdline(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return b""


def _is_mounted(path: str) -> bool:
    return any(line.split()[1] == path for line in Path("/proc/mounts").read_text().splitlines())


@contextlib.contextmanager
def attach_export(host: Tunnelling | None, export: str, port: int, *,
                  run_dir: Path = DEFAULT_RUN_DIR) -> Iterator[Path]:
    """Mount export `export` of the nbd-server on `host`'s 127.0.0.1:`port`, read-only; yield
    the mounted directory. `host` None: the server is on this machine. Everything is undone
    on leaving, also on failure.

    Raises AttachError (transient: tunnel, nbd, loop or mount failed), PermanentError (no
    filesystem on the export).
    """
    close_tunnel: Callable[[], None] = lambda: None  # noqa: E731
    local_port = port
    if host is not None:
        local_port, close_tunnel = host.open_tunnel("127.0.0.1", port)
    att = _Attachment(run_dir)
    try:
        if kernel_nbd_available():
            device = _attach_kernel(att, local_port, export)
        else:
            device = _attach_fuse(att, f"nbd://127.0.0.1:{local_port}/{export}")
        _mount(att, device)
        yield att.mountpoint
    finally:
        try:
            _undo(att.state, att.dir)
        finally:
            close_tunnel()


def reconcile(run_dir: Path = DEFAULT_RUN_DIR) -> list[str]:
    """Undo attachments whose owner process is gone (killed workers); their directories."""
    cleaned: list[str] = []
    if not run_dir.exists():
        return cleaned
    for state_file in sorted(run_dir.glob("*/state.json")):
        try:
            state = json.loads(state_file.read_text())
        except (OSError, ValueError):
            continue
        owner = int(state.get("owner", 0))
        if owner and _start_time(owner) == state.get("owner_start"):
            continue  # its owner still runs: not ours to touch
        log.warning("nbd: undoing %s left by dead process %s", state_file.parent, owner)
        _undo(state, state_file.parent)
        cleaned.append(str(state_file.parent))
    return cleaned
