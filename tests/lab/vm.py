"""A Debian kernel under QEMU software emulation, reachable over SSH like a Xen host.

This machine's kernel has neither device-mapper nor nbd, and KVM cannot run here; TCG can.
The guest gets two raw virtio disks (an origin, /dev/vda, 128 MiB unless a test module asks
for more, and a 64 MiB disk for COW files, /dev/vdb) and user networking with sshd
forwarded to 127.0.0.1:<free port>.
Booting fails loudly (LabBootError with the console's tail), never skips.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path
from types import TracebackType

from shared.errors import FerryError
from shared.ssh import SSHConfig, SSHHost
from tests.lab.initramfs import build_base, with_keys
from tests.support.sshd import free_port, generate_key

QEMU = "/usr/bin/qemu-system-x86_64"
ORIGIN_MIB = 128
COW_DISK_MIB = 64
BOOT_TIMEOUT = float(os.environ.get("FERRY_LAB_BOOT_TIMEOUT", "180"))


class LabBootError(RuntimeError):
    """The lab VM did not come up; the message carries the console's tail."""


class LabVM:
    """One guest. `address` is what the snapshotter's settings use to reach it."""

    def __init__(self, origin_mib: int = ORIGIN_MIB) -> None:
        self.origin_mib = origin_mib
        self.dir = Path(tempfile.mkdtemp(prefix="ferry-lab-"))
        self.port = 0
        self.user_key_path = self.dir / "id_ed25519"
        self.known_hosts_path = self.dir / "known_hosts"
        self.console_path = self.dir / "console.log"
        self._process: subprocess.Popen[bytes] | None = None
        self._host: SSHHost | None = None

    @property
    def address(self) -> str:
        return f"root@127.0.0.1:{self.port}"

    def __enter__(self) -> LabVM:
        self.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()

    def start(self) -> None:
        """Build (or reuse) the initramfs, boot, wait for sshd. Raises LabBootError."""
        if not Path(QEMU).exists():
            raise LabBootError(f"{QEMU} missing: apt-get install qemu-system-x86")
        image, base = build_base()
        host_key = self.dir / "ssh_host_ed25519_key"
        host_pub = generate_key(host_key)
        user_pub = generate_key(self.user_key_path)
        initrd = with_keys(base, host_key, user_pub, self.dir / "initrd.cpio")
        for name, mib in (("origin.raw", self.origin_mib), ("cow.raw", COW_DISK_MIB)):
            with (self.dir / name).open("wb") as disk:
                disk.truncate(mib << 20)
        for _attempt in range(3):  # the free port may be taken between probe and bind
            self.port = free_port()
            self.known_hosts_path.write_text(f"[127.0.0.1]:{self.port} {host_pub}\n")
            mark = len(self.console())
            self._launch(image, initrd)
            state = self._wait_for_ssh(mark)
            if state == "up":
                return
            # a TCG guest now and then hangs in early boot (a soft lockup in the kernel's
            # crypto self-tests, seen once in ~20 boots on a loaded host): boot it again
            if state != "hung" and "Could not set up host forwarding" not in self.console():
                break
        tail = self.console()[-3000:]
        self.stop()
        raise LabBootError(f"lab VM did not answer ssh within {BOOT_TIMEOUT:.0f}s on port "
                           f"{self.port}; console tail:\n{tail}")

    def _launch(self, image: Path, initrd: Path) -> None:
        self.stop_qemu()
        argv = [
            QEMU, "-accel", "tcg,thread=multi", "-smp", "2", "-cpu", "max", "-m", "1G",
            "-nodefaults", "-display", "none", "-no-reboot", "-serial", "stdio",
            "-kernel", str(image), "-initrd", str(initrd),
            "-append", "console=ttyS0 panic=-1 quiet loglevel=4",
            "-drive", f"file={self.dir / 'origin.raw'},format=raw,if=virtio,cache=unsafe",
            "-drive", f"file={self.dir / 'cow.raw'},format=raw,if=virtio,cache=unsafe",
            "-nic", f"user,model=virtio-net-pci,hostfwd=tcp:127.0.0.1:{self.port}-:22",
        ]
        console = self.console_path.open("ab")
        self._process = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=console,
                                         stderr=subprocess.STDOUT, start_new_session=True)
        console.close()

    def _wait_for_ssh(self, mark: int) -> str:
        """"up", "hung" (a soft lockup before init), or "down"; reads the console after
        `mark` (this launch's part)."""
        deadline = time.monotonic() + BOOT_TIMEOUT
        while time.monotonic() < deadline:
            if self._process is None or self._process.poll() is not None:
                return "down"
            console = self.console()[mark:]
            if "lab: ready" in console:
                try:
                    self.host().run(["true"], timeout=20)
                    return "up"
                except FerryError:
                    self.host().close()
            elif "BUG: soft lockup" in console:
                return "hung"
            time.sleep(0.5)
        return "down"

    def host(self) -> SSHHost:
        """A host-layer connection to the guest (the same kind the services use)."""
        if self._host is None:
            self._host = SSHHost(SSHConfig(host="127.0.0.1", port=self.port, user="root",
                                           key_path=self.user_key_path,
                                           known_hosts_path=self.known_hosts_path,
                                           connect_timeout=20), name="lab")
        return self._host

    def sh(self, script: str, timeout: float = 120) -> str:
        """Run a fixed test script in the guest (test-authored text only); its stdout."""
        return self.host().run(["sh", "-c", script], timeout=timeout).stdout.decode()

    def console(self) -> str:
        try:
            return self.console_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def stop_qemu(self) -> None:
        if self._host is not None:
            self._host.close()
            self._host = None
        process, self._process = self._process, None
        if process is not None and process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)  # only the qemu we started
            process.wait(timeout=30)

    def stop(self) -> None:
        """Power the guest off (kill our qemu) and delete its disks, keys and console."""
        self.stop_qemu()
        shutil.rmtree(self.dir, ignore_errors=True)
