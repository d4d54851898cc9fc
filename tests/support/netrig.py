"""An old site and a new site as separate network hosts on this machine, for tests and benchmarks.

Each host is a network namespace this rig creates, with its own sshd (its own host key, the
rig's one user key authorized), its own address, and one link to the machine's own (root)
namespace: a veth pair. Services keep running in the root namespace, where they reach
RabbitMQ and PostgreSQL on 127.0.0.1; they reach the hosts only through those links. A host
namespace has no default route and no NAT: its traffic goes to the root namespace's end of
its own link and nowhere else (and 127.0.0.1 inside it is its own loopback).

    with NetRig(datacenters=["ey04", "ey02"], vms_per_dc=2, wan_rate="56mbit") as rig:
        rig.hosts["ey04-xen"].address        # "root@10.77.S.2:22"
        rig.hosts["ey04-vm1"].root           # the directory this host's data lives in
        rig.destination   # "root@10.77.S.66:/tmp/ferry-rig-…/new-site/root/srv/ferry"
        rig.cut("new-site"); rig.restore("new-site"); rig.shape("8mbit")

Hosts, per datacenter DC: `DC-xen` (the Xen host) on link `DC-xen`, and `DC-vm1` … `DC-vmN`
(the VMs) sharing one namespace and link `DC-vms`, each with its own address and sshd; the
new site's migration server `new-site` on link `new-site`, shaped with `tc tbf` (this kernel
has no netem; MTU stays 1500, LIMITS.md). Namespaces share the filesystem, so each host gets
its own directory, `<rig dir>/<host>/`: `root` for its data, `sshd` for its server's files.

Addresses: the rig takes a free slot S (0-255, an flock'ed file, so rigs of concurrent test
runs never overlap) and uses 10.77.S.0/24; link L is 10.77.S.(16L)/28, its root end .16L+1,
its hosts .16L+2 on. Nothing on this machine uses 10.77/16 (checked: `ip addr`).

Cleanup always runs: on leaving the `with` (also when its body raises), at interpreter exit
(atexit) for a rig never closed, and at the start of every rig for namespaces, veths and
processes a dead process's rig left (the sweeper: names carry the creating PID).
"""

from __future__ import annotations

import atexit
import contextlib
import fcntl
import itertools
import os
import re
import shutil
import signal
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

from tests.support.sshd import SshServer, SshServerError, generate_key

PREFIX = "ferry-"  # namespaces: ferry-<pid>-<n>, n counting this process's links
VETH_PREFIX = "fr"  # root ends: fr<pid>l<n> (15 characters at most)
SLOTS_DIR = Path("/run/ferry-netrig")
_NS_NAME = re.compile(r"^ferry-(\d+)-(\d+)$")
_VETH_NAME = re.compile(r"^fr(\d+)l(\d+)$")
_LINK_NUMBERS = itertools.count()  # per process: two rigs of one process never share a name


class NetRigError(RuntimeError):
    """The rig could not be built (a command failed, an sshd did not start)."""


def ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    """Run `ip ARGS`; raise NetRigError naming the command and what it said."""
    return run(["ip", *args], check=check)


def run(argv: list[str], check: bool = True,
        timeout: float = 30) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
    if check and done.returncode != 0:
        raise NetRigError(f"`{' '.join(argv)}` exited {done.returncode}: "
                          f"{(done.stderr or done.stdout).strip()}")
    return done


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def namespace_pids(namespace: str) -> list[int]:
    """PIDs of processes inside `namespace` (`ip netns pids`)."""
    done = ip("netns", "pids", namespace, check=False)
    return [int(p) for p in done.stdout.split() if p.isdigit()]


def _kill_in(namespace: str) -> None:
    """SIGKILL every process in a namespace this rig (or a dead run of it) made, by PID."""
    for _ in range(20):
        pids = namespace_pids(namespace)
        if not pids:
            return
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        time.sleep(0.05)


def rig_namespaces() -> list[str]:
    """Every namespace on this machine named like a rig's (any PID)."""
    names = ip("netns", "list", check=False).stdout.split("\n")
    return [n.split()[0] for n in names if n.strip() and _NS_NAME.match(n.split()[0])]


def rig_veths() -> list[str]:
    """Every root-namespace link named like a rig's root end (any PID)."""
    found = []
    for line in ip("-o", "link", "show", check=False).stdout.splitlines():
        name = line.split(":", 2)[1].strip().split("@")[0]
        if _VETH_NAME.match(name):
            found.append(name)
    return found


def sweep() -> list[str]:
    """Remove what rigs of dead processes left: their namespaces (and the processes in
    them, by PID), their veths, their directories. Returns what it removed."""
    removed = []
    for namespace in rig_namespaces():
        match = _NS_NAME.match(namespace)
        if match and not _alive(int(match[1])):
            _kill_in(namespace)
            ip("netns", "delete", namespace, check=False)
            removed.append(namespace)
    for veth in rig_veths():
        match = _VETH_NAME.match(veth)
        if match and not _alive(int(match[1])):
            ip("link", "delete", veth, check=False)
            removed.append(veth)
    for directory in Path(tempfile.gettempdir()).glob("ferry-rig-*"):
        match = re.match(r"^ferry-rig-(\d+)-", directory.name)
        if match and not _alive(int(match[1])):
            shutil.rmtree(directory, ignore_errors=True)
            removed.append(str(directory))
    return removed


class _HostSshd(SshServer):
    """The tests' sshd (tests/support/sshd.py), run inside a namespace on a fixed address,
    authorizing the rig's user key."""

    def __init__(self, namespace: str, address: str, directory: Path, user_key_pub: str) -> None:
        super().__init__()
        shutil.rmtree(self.dir, ignore_errors=True)  # ours lives in the host's directory
        self.namespace = namespace
        self.host, self.port, self.user = address, 22, "root"
        self.dir = directory
        directory.mkdir(parents=True)
        self.host_key_path = directory / "ssh_host_ed25519_key"
        self.user_key_path = directory / "unused"
        self.known_hosts_path = directory / "known_hosts"
        self.config_path = directory / "sshd_config"
        self.log_path = directory / "sshd.log"
        self._user_key_pub = user_key_pub

    def start(self) -> None:
        from ferry.loopback_sshd import PRIVSEP_DIR

        PRIVSEP_DIR.mkdir(mode=0o755, exist_ok=True)
        self.host_key_pub = generate_key(self.host_key_path)
        (self.dir / "authorized_keys").write_text(self._user_key_pub + "\n")
        self._write_config()
        if not self._launch():
            raise SshServerError(f"sshd in {self.namespace} at {self.host} did not start; "
                                 f"its log:\n{self.log()}")
        self.known_hosts_path.write_text(f"{self.host} {self.host_key_pub}\n")

    def _command(self) -> list[str]:
        # started inside the namespace; the base class's readiness probe connects from the
        # root namespace, through the host's link
        return ["ip", "netns", "exec", self.namespace, *super()._command()]

    def stop(self) -> None:
        """Stop this sshd and its connections; the rig removes the directory."""
        self.drop_connections()
        self._kill_own_sshd()


@dataclass
class Link:
    """A veth pair: `root_end` in the root namespace, `eth0` in `namespace`."""

    name: str
    namespace: str
    root_end: str
    network: str  # 10.77.S.(16L)
    gateway: str  # the root end's address


@dataclass
class RigHost:
    """One host of the rig: its namespace, address, sshd and data directory."""

    name: str
    namespace: str
    link: str
    ip: str
    root: Path  # this host's data: archive sources, or the new site's destination root
    sshd: _HostSshd = field(repr=False)

    @property
    def address(self) -> str:
        """The inventory address: `root@IP:22`."""
        return f"root@{self.ip}:22"

    def exec(self, *argv: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
        """Run a command inside this host's namespace (not over ssh), unchecked."""
        return run(["ip", "netns", "exec", self.namespace, *argv], check=False, timeout=timeout)


class NetRig:
    """The rig; a context manager. See the module's docstring."""

    def __init__(self, datacenters: list[str] | tuple[str, ...] = ("ey04",), vms_per_dc: int = 1,
                 wan_rate: str | None = None, wan_burst: str = "64kb",
                 wan_latency: str = "100ms") -> None:
        if not datacenters or len(set(datacenters)) != len(datacenters):
            raise ValueError(f"datacenters must be distinct and not empty: {datacenters!r}")
        if not 0 <= vms_per_dc <= 13:
            raise ValueError(f"vms_per_dc must be 0-13 (one /28 per link): {vms_per_dc}")
        if 2 * len(datacenters) + 1 > 16:
            raise ValueError(f"at most 7 datacenters per rig: {datacenters!r}")
        self.datacenters = list(datacenters)
        self.vms_per_dc = vms_per_dc
        self.wan_rate = wan_rate
        self.wan_burst, self.wan_latency = wan_burst, wan_latency
        self.pid = os.getpid()
        self.hosts: dict[str, RigHost] = {}
        self.links: dict[str, Link] = {}
        self.namespaces: list[str] = []
        self.dir = Path("/nonexistent")
        self.key = Path("/nonexistent")
        self.known_hosts = Path("/nonexistent")
        self.slot = -1
        self._slot_file: Any = None
        self._closed = True

    # -- life cycle ---------------------------------------------------------------------

    def __enter__(self) -> NetRig:
        self.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def start(self) -> None:
        """Sweep dead rigs, then build this one; on any failure remove what was built."""
        sweep()
        self._closed = False
        atexit.register(self.close)
        try:
            self._take_slot()
            self.dir = Path(tempfile.mkdtemp(prefix=f"ferry-rig-{self.pid}-"))
            self.key = self.dir / "id_ed25519"
            user_key_pub = generate_key(self.key)
            self.known_hosts = self.dir / "known_hosts"
            plan: list[tuple[str, list[str]]] = []
            for dc in self.datacenters:
                plan.append((f"{dc}-xen", [f"{dc}-xen"]))
                if self.vms_per_dc:
                    vms = [f"{dc}-vm{i}" for i in range(1, self.vms_per_dc + 1)]
                    plan.append((f"{dc}-vms", vms))
            plan.append(("new-site", ["new-site"]))
            for index, (link_name, host_names) in enumerate(plan):
                link = self._add_link(index, link_name)
                for offset, host_name in enumerate(host_names):
                    self._add_host(link, host_name, f"10.77.{self.slot}.{16 * index + 2 + offset}",
                                   user_key_pub)
            self.known_hosts.write_text("".join(h.sshd.known_hosts_path.read_text()
                                                for h in self.hosts.values()))
            (self.hosts["new-site"].root / "srv" / "ferry").mkdir(parents=True)
            if self.wan_rate is not None:
                self.shape(self.wan_rate)
        except BaseException:
            self.close()
            raise

    def _take_slot(self) -> None:
        SLOTS_DIR.mkdir(exist_ok=True)
        for slot in range(256):
            handle = (SLOTS_DIR / f"slot-{slot}.lock").open("w")
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                handle.close()
                continue
            self.slot, self._slot_file = slot, handle
            return
        raise NetRigError(f"no free rig slot in {SLOTS_DIR} (256 rigs running?)")

    def _add_link(self, index: int, name: str) -> Link:
        number = next(_LINK_NUMBERS) % 100_000  # 15 characters at most in a link's name
        namespace = f"{PREFIX}{self.pid}-{number}"
        root_end = f"{VETH_PREFIX}{self.pid}l{number}"
        ip("netns", "add", namespace)
        self.namespaces.append(namespace)
        ip("-n", namespace, "link", "set", "lo", "up")
        ip("link", "add", root_end, "mtu", "1500", "type", "veth", "peer", "name", "eth0",
           "mtu", "1500", "netns", namespace)
        base = f"10.77.{self.slot}.{16 * index}"
        gateway = f"10.77.{self.slot}.{16 * index + 1}"
        ip("addr", "add", f"{gateway}/28", "dev", root_end)
        ip("link", "set", root_end, "up")
        ip("-n", namespace, "link", "set", "eth0", "up")
        link = Link(name, namespace, root_end, base, gateway)
        self.links[name] = link
        return link

    def _add_host(self, link: Link, name: str, address: str, user_key_pub: str) -> None:
        ip("-n", link.namespace, "addr", "add", f"{address}/28", "dev", "eth0")
        host_dir = self.dir / name
        root = host_dir / "root"
        root.mkdir(parents=True)
        sshd = _HostSshd(link.namespace, address, host_dir / "sshd", user_key_pub)
        host = RigHost(name, link.namespace, link.name, address, root, sshd)
        self.hosts[name] = host
        sshd.start()

    def close(self) -> None:
        """Stop every sshd, delete every namespace and veth, remove the directory; safe to
        call twice, and it carries on past any one failure."""
        if self._closed:
            return
        self._closed = True
        with contextlib.suppress(Exception):
            atexit.unregister(self.close)
        for host in self.hosts.values():
            with contextlib.suppress(Exception):
                host.sshd.stop()
        for namespace in self.namespaces:
            with contextlib.suppress(Exception):
                _kill_in(namespace)
            ip("netns", "delete", namespace, check=False)  # takes its veth pair with it
        for link in self.links.values():
            ip("link", "delete", link.root_end, check=False)  # gone already, normally
        if self.dir.name.startswith("ferry-rig-"):
            shutil.rmtree(self.dir, ignore_errors=True)
        if self._slot_file is not None:
            self._slot_file.close()
            self._slot_file = None

    # -- what tests use -----------------------------------------------------------------

    @property
    def destination(self) -> str:
        """FERRY_DESTINATION for the new site: `root@IP:<its root>/srv/ferry`."""
        server = self.hosts["new-site"]
        return f"root@{server.ip}:{server.root / 'srv' / 'ferry'}"

    @property
    def destination_root(self) -> Path:
        """Where the destination's files land (the same filesystem, seen from here)."""
        return self.hosts["new-site"].root / "srv" / "ferry"

    def _link(self, name: str) -> Link:
        if name in self.hosts:
            name = self.hosts[name].link
        if name not in self.links:
            raise KeyError(f"no link or host {name!r} in this rig; links: {sorted(self.links)}")
        return self.links[name]

    def cut(self, name: str) -> None:
        """Take a link (or a host's link) down at the host's end: packets to and from it
        vanish, as on a cut WAN line; connections stall, new ones time out."""
        link = self._link(name)
        ip("-n", link.namespace, "link", "set", "eth0", "down")

    def restore(self, name: str) -> None:
        """Bring a cut link back up; its addresses and shaping are kept."""
        link = self._link(name)
        ip("-n", link.namespace, "link", "set", "eth0", "up")
        # wait until its root end has carrier again, then forget the neighbour entries the
        # cut left FAILED (else the kernel answers "No route to host" for a while longer)
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            if "LOWER_UP" in ip("link", "show", link.root_end).stdout:
                ip("neigh", "flush", "dev", link.root_end, check=False)
                ip("-n", link.namespace, "neigh", "flush", "dev", "eth0", check=False)
                return
            time.sleep(0.02)
        raise NetRigError(f"link {link.name} ({link.root_end}) has no carrier after restore")

    def shape(self, rate: str | None, name: str = "new-site") -> None:
        """Limit a link to `rate` (tc's units, e.g. `8mbit`) in both directions with a token
        bucket; None removes the limit."""
        link = self._link(name)
        for prefix in ([], ["-n", link.namespace]):
            device = link.root_end if not prefix else "eth0"
            run(["tc", *prefix, "qdisc", "del", "dev", device, "root"], check=False)
            if rate is not None:
                run(["tc", *prefix, "qdisc", "add", "dev", device, "root", "tbf", "rate", rate,
                     "burst", self.wan_burst, "latency", self.wan_latency])
        if name == "new-site":
            self.wan_rate = rate

    def write_inventory(self, path: Path, customer: str = "cust-1",
                        shared_fs: bool = True) -> Path:
        """A Ferry inventory (docs/inventory-api.md) for the rig's old site: per datacenter
        its Xen host, its VMs (each with a root filesystem, driver `none`, archived from the
        VM's `root` directory) in one environment of `customer`, and (with `shared_fs`) a
        shared filesystem at the first VM's `root/data`. Returns `path`."""
        import yaml

        document: dict[str, Any] = {"datacenters": {}, "xen_hosts": {}, "vms": {},
                                    "environments": {}}
        for number, dc in enumerate(self.datacenters):
            xen = self.hosts[f"{dc}-xen"]
            document["datacenters"][dc] = {"archive_hosts": [f"archive-{dc}.internal"]}
            document["xen_hosts"][xen.name] = {"datacenter": dc, "address": xen.address}
            vms = []
            for i in range(1, self.vms_per_dc + 1):
                host = self.hosts[f"{dc}-vm{i}"]
                vm = f"{dc}-s{50000 + 100 * number + i:05d}"
                vms.append(vm)
                document["vms"][vm] = {
                    "datacenter": dc, "xen_host": xen.name, "ssh": host.address,
                    "customer": customer,
                    "filesystems": [{"mountpoint": "/", "device": f"/dev/vg_{dc}/{vm}-root",
                                     "fs_type": "ext4", "used_bytes": 1 << 20,
                                     "size_bytes": 1 << 30, "snapshot_driver": "none",
                                     "path": str(host.root)}],
                }
            environment: dict[str, Any] = {"datacenter": dc, "customer": customer, "vms": vms}
            if shared_fs and vms:
                data = self.hosts[f"{dc}-vm1"].root / "data"
                data.mkdir(exist_ok=True)
                environment["shared_filesystems"] = [{
                    "mountpoint": str(data), "used_bytes": 1 << 20, "mounted_on": vms,
                    "customer": customer}]
            if vms:
                document["environments"][f"{dc}-e{75 + number:05d}"] = environment
        path.write_text(yaml.safe_dump(document, sort_keys=False))
        return path
