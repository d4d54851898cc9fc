"""The lab guest's initramfs: Debian's own binaries and kernel modules in one cpio archive.

Built from this machine's packages (busybox-static, dmsetup, nbd-server, openssh-server,
e2fsprogs, xfsprogs, reiserfsprogs, util-linux, bash, coreutils' `timeout`, and for the
archiver's sequence run in the guest nbdkit with its `nbd` plugin and `cow` filter and
nbd-client) and `/lib/modules/<version>`, with the shared libraries `ldd` names (nbdkit
dlopens its plugin and filter, so those are listed explicitly). The result is cached under
/tmp, keyed by a hash of every input (paths, sizes, mtimes, the init script), so a rerun
only boots. The per-run secrets (host key, authorized key) are a second small cpio
appended to it: the kernel unpacks concatenated archives in order.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

CACHE = Path(os.environ.get("FERRY_LAB_CACHE", "/tmp/ferry-lab-cache"))
BUILDER_VERSION = "5"  # bump when the layout below changes

# Real tools the snapshotter runs on a Xen host; busybox gives the rest (sh, ip, sha256sum...).
BINARIES = (
    "/usr/sbin/dmsetup", "/usr/bin/nbd-server", "/usr/sbin/sshd", "/usr/sbin/losetup",
    "/usr/sbin/mke2fs", "/usr/sbin/e2fsck", "/usr/sbin/blockdev", "/bin/bash",
    "/usr/bin/timeout", "/usr/bin/stat", "/usr/bin/truncate", "/usr/bin/pgrep",
    # the journal tests: the filesystems a Xen guest has, and dumpe2fs to see a dirty journal
    "/usr/sbin/dumpe2fs", "/usr/sbin/mkfs.xfs", "/usr/sbin/mkreiserfs",
    # the archiver's COW + mount sequence, run in the guest for reiserfs (kernel nbd path)
    "/usr/bin/nbdkit", "/usr/lib/x86_64-linux-gnu/nbdkit/plugins/nbdkit-nbd-plugin.so",
    "/usr/lib/x86_64-linux-gnu/nbdkit/filters/nbdkit-cow-filter.so", "/usr/sbin/nbd-client",
)
# Names these binaries also answer to (busybox would shadow them otherwise).
ALIASES = {"/usr/sbin/mke2fs": ("/usr/sbin/mkfs.ext4", "/usr/sbin/mkfs.ext3"),
           "/usr/sbin/e2fsck": ("/usr/sbin/fsck.ext4",)}
MODULES = ("virtio_pci", "virtio_blk", "virtio_net", "loop", "dm-mod", "dm-bufio",
           "dm-snapshot", "nbd", "crc32c_generic", "ext4", "xfs", "reiserfs")

INIT = r"""#!/bin/busybox sh
export PATH=/usr/sbin:/usr/bin:/sbin:/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mkdir -p /dev/pts /dev/mapper /run/sshd /run/ferry /tmp /var/log /mnt
mount -t devpts devpts /dev/pts
mount -t tmpfs tmpfs /run
mkdir -p /run/sshd /run/ferry
while read -r module; do
  insmod "$module" || echo "lab: insmod $module failed"
done < /etc/modules.order
ln -sf /proc/mounts /etc/mtab
ip link set lo up
ip link set eth0 up
ip addr add 10.0.2.15/24 dev eth0
ip route add default via 10.0.2.2
chmod 600 /etc/ssh/ssh_host_ed25519_key
/usr/sbin/sshd -E /var/log/sshd.log
echo "lab: ready"
while true; do sleep 3600; done
"""

SSHD_CONFIG = """Port 22
HostKey /etc/ssh/ssh_host_ed25519_key
PermitRootLogin prohibit-password
PubkeyAuthentication yes
PasswordAuthentication no
KbdInteractiveAuthentication no
UsePAM no
UseDNS no
PidFile /run/sshd.pid
Subsystem sftp internal-sftp
# dmsetup makes its own /dev/mapper nodes: there is no udev in the lab guest
SetEnv DM_DISABLE_UDEV=1 PATH=/usr/sbin:/usr/bin:/sbin:/bin
"""


class LabBuildError(RuntimeError):
    """The initramfs could not be built: a tool, the kernel or a module is missing."""


def kernel() -> tuple[Path, str]:
    """The newest Debian kernel image and its version. Raises LabBuildError if none."""
    images = sorted(Path("/boot").glob("vmlinuz-*-amd64"))
    if not images:
        raise LabBuildError("no /boot/vmlinuz-*-amd64: apt-get install linux-image-amd64")
    image = images[-1]
    version = image.name.removeprefix("vmlinuz-")
    if not Path(f"/lib/modules/{version}/modules.dep").exists():
        raise LabBuildError(f"/lib/modules/{version}/modules.dep missing for {image}")
    return image, version


def _libraries(binary: str) -> set[str]:
    done = subprocess.run(["ldd", binary], capture_output=True, text=True, check=False)
    if done.returncode != 0:
        return set()  # static (busybox)
    found = set(re.findall(r"(/\S+\.so[^\s]*)", done.stdout))
    return {path for path in found if Path(path).exists()}


def _module_order(version: str) -> list[str]:
    """Module paths in load order: each one's dependencies first (from modules.dep)."""
    base = Path(f"/lib/modules/{version}")
    deps: dict[str, list[str]] = {}
    by_name: dict[str, str] = {}
    for line in (base / "modules.dep").read_text().splitlines():
        path, _, rest = line.partition(":")
        deps[path] = rest.split()
        by_name[Path(path).name.split(".ko")[0].replace("-", "_")] = path
    order: list[str] = []

    def visit(path: str) -> None:
        if path in order:
            return
        for dep in reversed(deps.get(path, [])):  # modules.dep lists the deepest last
            visit(dep)
        order.append(path)

    for name in MODULES:
        path = by_name.get(name.replace("-", "_"))
        if path is None:
            raise LabBuildError(f"kernel {version} has no module {name}")
        visit(path)
    return order


def _inputs() -> tuple[str, list[str], list[str], str]:
    image, version = kernel()
    missing = [b for b in (*BINARIES, "/bin/busybox") if not Path(b).exists()]
    if missing:
        raise LabBuildError(f"missing {', '.join(missing)}: run scripts/setup.sh --test (as root)")
    files = sorted({*BINARIES, "/bin/busybox", *(lib for b in BINARIES for lib in _libraries(b))})
    modules = _module_order(version)
    digest = hashlib.sha256(f"{BUILDER_VERSION}\n{INIT}\n{SSHD_CONFIG}\n{image}".encode())
    for path in [*files, *(f"/lib/modules/{version}/{m}" for m in modules)]:
        stat = Path(path).stat()
        digest.update(f"{path}:{stat.st_size}:{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()[:16], files, modules, version


def _copy(path: str, root: Path) -> None:
    target = root / path.lstrip("/")
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy2(os.path.realpath(path), target)


def _write_cpio(root: Path, output: Path) -> None:
    names = subprocess.run(["find", ".", "-mindepth", "1"], cwd=root, capture_output=True,
                           check=True).stdout
    with output.open("wb") as out:
        subprocess.run(["cpio", "--quiet", "-o", "-H", "newc", "-R", "0:0"], cwd=root,
                       input=names, stdout=out, check=True)


def build_base() -> tuple[Path, Path]:
    """(kernel image, cached base initramfs), building the initramfs if its inputs changed.

    Raises LabBuildError when a package the lab needs is missing.
    """
    image = kernel()[0]
    key, files, modules, version = _inputs()
    cached = CACHE / f"initramfs-{key}.cpio"
    if cached.exists():
        return image, cached
    CACHE.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="ferry-lab-root-") as tmp:
        root = Path(tmp)
        for sub in ("bin", "sbin", "usr/bin", "usr/sbin", "etc/ssh", "root/.ssh", "proc", "sys",
                    "dev", "run", "tmp", "var/empty", "mnt"):
            (root / sub).mkdir(parents=True, exist_ok=True)
        for path in files:
            _copy(path, root)
        for binary, aliases in ALIASES.items():
            for alias in aliases:
                (root / alias.lstrip("/")).symlink_to(Path(binary).name)
        shipped = {Path(b).name for b in BINARIES} | {Path(a).name for v in ALIASES.values()
                                                      for a in v}
        applets = subprocess.run(["/bin/busybox", "--list"], capture_output=True, text=True,
                                 check=True).stdout.split()
        for applet in applets:
            link = root / "bin" / applet
            if applet not in shipped and not link.exists():
                link.symlink_to("busybox")
        for module in modules:
            _copy(f"/lib/modules/{version}/{module}", root)
        (root / "etc/modules.order").write_text(
            "".join(f"/lib/modules/{version}/{m}\n" for m in modules))
        (root / "init").write_text(INIT)
        (root / "init").chmod(0o755)
        (root / "etc/ssh/sshd_config").write_text(SSHD_CONFIG)
        (root / "etc/passwd").write_text("root:x:0:0:root:/root:/bin/bash\n"
                                         "sshd:x:100:65534::/run/sshd:/bin/false\n")
        (root / "etc/group").write_text("root:x:0:\nnogroup:x:65534:\n")
        (root / "etc/shadow").write_text("root:*:19000:0:99999:7:::\n")
        (root / "etc/shadow").chmod(0o600)
        partial = cached.with_suffix(f".{os.getpid()}.partial")
        _write_cpio(root, partial)
        partial.rename(cached)  # atomic: a concurrent builder never sees half a file
    return image, cached


def with_keys(base: Path, host_key: Path, authorized_key: str, output: Path) -> Path:
    """`base` followed by a cpio holding the guest's host key and root's authorized key."""
    with tempfile.TemporaryDirectory(prefix="ferry-lab-keys-") as tmp:
        root = Path(tmp) / "root"
        (root / "etc/ssh").mkdir(parents=True)
        (root / "root/.ssh").mkdir(parents=True, mode=0o700)
        shutil.copy(host_key, root / "etc/ssh/ssh_host_ed25519_key")
        (root / "etc/ssh/ssh_host_ed25519_key").chmod(0o600)
        (root / "root/.ssh/authorized_keys").write_text(authorized_key + "\n")
        keys = Path(tmp) / "keys.cpio"
        _write_cpio(root, keys)
        with output.open("wb") as out:
            out.write(base.read_bytes())
            out.write(keys.read_bytes())
    return output
