"""What the lab tests do inside the guest: a writer that stands for a customer's running VM,
file hashes, and the checks (leftovers, writability, fsck). Test-authored scripts only."""

from __future__ import annotations

import time

from tests.lab.vm import LabVM
from tests.support.helpers import wait_for

# Appends a counter (fsynced) and rewrites a few blocks, forever: a VM in use.
WRITER = (
    "i=0; while :; do i=$((i+1)); echo $i >> /mnt/{vm}/writer.log; "
    "dd if=/dev/urandom of=/mnt/{vm}/churn bs=4k count=4 seek=$((i % 32 * 4)) "
    "conv=notrunc,fsync 2>/dev/null; sleep 0.2; done"
)


class Guest:
    def __init__(self, vm: LabVM) -> None:
        self.vm = vm

    def sh(self, script: str, timeout: float = 120) -> str:
        return self.vm.sh(script, timeout)

    def start_writer(self, vm: str = "vm1") -> None:
        self.sh(f"rm -f /mnt/{vm}/writer.log; setsid sh -c '{WRITER.format(vm=vm)}' "
                f"</dev/null >/dev/null 2>&1 & echo $! > /run/writer-{vm}.pid")
        wait_for(lambda: int(self.sh(f"wc -l < /mnt/{vm}/writer.log 2>/dev/null || "
                                     "echo 0").strip() or 0) >= 2, 60, "the writer writes")

    def stop_writer(self, vm: str = "vm1") -> int:
        """Stop the writer; the last counter it wrote."""
        self.sh(f"kill $(cat /run/writer-{vm}.pid); sleep 0.5; sync")
        return int(self.sh(f"tail -n 1 /mnt/{vm}/writer.log").strip())

    def writer_lines(self, vm: str = "vm1") -> list[int]:
        return [int(x) for x in self.sh(f"cat /mnt/{vm}/writer.log").split()]

    def write_random(self, path: str, mib: int) -> str:
        """Write `mib` MiB of random data to `path`, synced; its sha256."""
        return self.sh(f"dd if=/dev/urandom of={path} bs=1M count={mib} conv=fsync "
                       f"2>/dev/null && sha256sum {path}").split()[0]

    def writable_within(self, vm: str = "vm1", timeout: float = 30) -> float:
        """Seconds a synced write to the mounted origin took (the origin is not suspended)."""
        started = time.monotonic()
        self.sh(f"echo probe > /mnt/{vm}/probe && sync", timeout=timeout)
        return time.monotonic() - started

    def suspended(self, device: str) -> bool:
        attr = self.sh(f"dmsetup info -c --noheadings -o attr {device}").strip()
        return attr[2:3] == "s"

    def leftovers(self) -> list[str]:
        """Everything Ferry could have left: ferry-* devices, loops on COW files, nbd-servers."""
        found = [line.split()[0] for line in self.sh("dmsetup ls").splitlines()
                 if line.startswith("ferry-")]
        found += [line for line in self.sh("/usr/sbin/losetup -l -n -O BACK-FILE").splitlines()
                  if "ferry-" in line]
        found += [f"nbd-server pid {pid}" for pid in
                  self.sh("pidof nbd-server || true").split()]
        found += [f"file {name}" for name in self.sh("ls /run/ferry /var/lib/ferry/cow "
                                                     "2>/dev/null || true").split()
                  if name.startswith("ferry-")]
        return found

    def fsck_clean(self, vm: str = "vm1") -> str:
        """Unmount the origin, `e2fsck -fn` it, mount it again; e2fsck's output if unclean."""
        out = self.sh(f"umount /mnt/{vm} && e2fsck -fn /dev/mapper/lab-{vm} >/tmp/fsck.out "
                      f"2>&1; rc=$?; mount /dev/mapper/lab-{vm} /mnt/{vm}; echo rc=$rc; "
                      "cat /tmp/fsck.out")
        return "" if out.startswith("rc=0") else out
