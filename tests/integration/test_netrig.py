"""The network rig (tests/support/netrig.py): hosts on their own network namespaces, each
with its own sshd and host key, a tbf-shaped link to the new site, and nothing left behind."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.helpers import wait_for
from tests.support.netrig import (
    NetRig,
    RigHost,
    namespace_pids,
    rig_namespaces,
    rig_veths,
    sweep,
)
from tests.support.sshd import generate_key

MB = 1_000_000
ROOT = Path(__file__).resolve().parents[2]


def ssh(rig: NetRig, host: RigHost, command: str, known_hosts: Path | None = None,
        timeout: int = 5) -> subprocess.CompletedProcess[str]:
    """OpenSSH from the root namespace to `host`, strict host key checking."""
    user_host = host.address.rsplit(":", 1)[0]
    return subprocess.run(
        ["ssh", "-F", "none", "-i", str(rig.key), "-o", "IdentitiesOnly=yes",
         "-o", "BatchMode=yes", "-o", "StrictHostKeyChecking=yes",
         "-o", f"UserKnownHostsFile={known_hosts or rig.known_hosts}",
         "-o", "GlobalKnownHostsFile=/dev/null", "-o", f"ConnectTimeout={timeout}",
         user_host, command], capture_output=True, text=True, timeout=timeout + 30)


def mine(pid: int) -> list[str]:
    """This process's rig namespaces and veths (the names carry the PID)."""
    return ([n for n in rig_namespaces() if n.startswith(f"ferry-{pid}-")]
            + [v for v in rig_veths() if v.startswith(f"fr{pid}l")])


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_rig_comes_up_with_every_host_and_goes_away_leaving_nothing() -> None:
    assert mine(os.getpid()) == []
    with NetRig(datacenters=["ey04", "ey02"], vms_per_dc=2) as rig:
        # Then every host has its namespace, its sshd, its address; the VMs of a datacenter
        # share one namespace
        assert sorted(rig.hosts) == ["ey02-vm1", "ey02-vm2", "ey02-xen", "ey04-vm1", "ey04-vm2",
                                     "ey04-xen", "new-site"]
        assert rig.hosts["ey04-vm1"].namespace == rig.hosts["ey04-vm2"].namespace
        assert len({h.ip for h in rig.hosts.values()}) == 7
        assert len(mine(os.getpid())) == 2 * 5  # 5 namespaces, 5 veths
        sshd_pids = [p for h in rig.hosts.values() for p in [h.sshd._process.pid]]  # type: ignore[union-attr]
        assert all(alive(p) for p in sshd_pids)
        directory = rig.dir
        assert rig.destination == (f"root@{rig.hosts['new-site'].ip}:"
                                   f"{rig.hosts['new-site'].root}/srv/ferry")
        assert rig.destination_root.is_dir()
    # Then no namespace, veth, sshd or directory of the rig is left
    assert mine(os.getpid()) == []
    assert not any(alive(p) for p in sshd_pids)
    assert not directory.exists()


def test_rig_is_removed_when_the_body_raises() -> None:
    # Given a rig whose body fails (the negative control: cleanup runs on failure)
    with pytest.raises(RuntimeError, match="the test failed"):  # noqa: PT012
        with NetRig(datacenters=["ey04"], vms_per_dc=1) as rig:
            namespaces = list(rig.namespaces)
            assert mine(os.getpid())
            # and a process started inside a host namespace, as a test might leave one
            rig.hosts["ey04-vm1"].exec("true")
            stray = subprocess.Popen(["ip", "netns", "exec", namespaces[0], "sleep", "600"])
            raise RuntimeError("the test failed")
    # Then everything is gone anyway, the stray process too (killed by its PID)
    assert mine(os.getpid()) == []
    assert stray.wait(timeout=10) == -9


def test_sweeper_removes_what_a_dead_process_left() -> None:
    # Given a namespace and a veth named for a process that no longer exists
    dead = subprocess.Popen(["true"])
    dead.wait()
    namespace, veth = f"ferry-{dead.pid}-0", f"fr{dead.pid}l0"
    subprocess.run(["ip", "netns", "add", namespace], check=True)
    subprocess.run(["ip", "link", "add", veth, "type", "veth", "peer", "name", "eth0",
                    "netns", namespace], check=True)
    # and a process still running inside that namespace (as a dead run's sshd would be)
    stray = subprocess.Popen(["ip", "netns", "exec", namespace, "sleep", "600"])
    try:
        wait_for(lambda: stray.pid in namespace_pids(namespace), timeout=10,
                 what="the stray process in the namespace")
        assert namespace in rig_namespaces() and veth in rig_veths()
        # When a rig starts (it sweeps first)
        with NetRig(datacenters=["ey04"], vms_per_dc=0):
            # Then they are gone, and the live rig's own are kept
            assert namespace not in rig_namespaces() and veth not in rig_veths()
            assert mine(os.getpid())
            assert not [n for n in sweep() if str(os.getpid()) in n]
        assert stray.wait(timeout=10) == -9
    finally:
        if stray.poll() is None:
            stray.kill()
            stray.wait()
        subprocess.run(["ip", "netns", "delete", namespace], capture_output=True)


def test_rig_never_closed_is_removed_when_its_process_exits() -> None:
    # Given a process that starts a rig and exits without closing it
    code = ("from tests.support.netrig import NetRig\n"
            "rig = NetRig(datacenters=['ey04'], vms_per_dc=1)\nrig.start()\n"
            "print(rig.dir, len(rig.namespaces), flush=True)\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=60, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert done.returncode == 0, done.stderr
    directory, count = done.stdout.split()
    assert count == "3"
    # Then its exit (atexit) removed everything it made
    pid = int(Path(directory).name.split("-")[2])
    assert mine(pid) == [] and not Path(directory).exists()


@pytest.fixture(scope="module")
def rig() -> Iterator[NetRig]:
    with NetRig(datacenters=["ey04", "ey02"], vms_per_dc=2) as built:
        yield built


def test_each_host_answers_ssh_with_its_own_host_key_and_a_wrong_one_is_refused(
    rig: NetRig, tmp_path: Path,
) -> None:
    for name, host in rig.hosts.items():
        # Each host answers on its own address, from inside its own namespace
        done = ssh(rig, host, "ip -o -4 addr show dev eth0; ip route")
        assert done.returncode == 0, f"{name}: {done.stderr}"
        assert f"inet {host.ip}/28" in done.stdout, done.stdout
        assert "default" not in done.stdout
    # And a known_hosts that gives another host's key for this address is refused
    xen, vm = rig.hosts["ey04-xen"], rig.hosts["ey04-vm1"]
    impostor = tmp_path / "known_hosts"
    impostor.write_text(f"{xen.ip} {vm.sshd.host_key_pub}\n")
    refused = ssh(rig, xen, "true", known_hosts=impostor)
    assert refused.returncode == 255 and "HOST IDENTIFICATION HAS CHANGED" in refused.stderr
    # as is one that does not know the host
    impostor.write_text(f"10.0.0.1 {generate_key(tmp_path / 'other')}\n")
    refused = ssh(rig, xen, "true", known_hosts=impostor)
    assert refused.returncode == 255 and "Host key verification failed" in refused.stderr


RECEIVER = """
import socket, sys, time
server = socket.create_server((sys.argv[1], int(sys.argv[2])))
print("listening", flush=True)
connection, _ = server.accept()
received, first = 0, None
while chunk := connection.recv(1 << 16):
    first = first or time.monotonic()
    received += len(chunk)
connection.sendall(b"%d" % received)
"""


def send_through(rig: NetRig, size: int) -> float:
    """Send `size` bytes from the root namespace to a receiver on the new site; Mbit/s,
    from the connection to the receiver's count of the last byte."""
    host = rig.hosts["new-site"]
    receiver = subprocess.Popen(
        ["ip", "netns", "exec", host.namespace, sys.executable, "-c", RECEIVER, host.ip, "5001"],
        stdout=subprocess.PIPE, text=True)
    try:
        assert receiver.stdout is not None and receiver.stdout.readline() == "listening\n"
        payload = os.urandom(size)
        with socket.create_connection((host.ip, 5001), timeout=30) as connection:
            started = time.monotonic()
            connection.sendall(payload)
            connection.shutdown(socket.SHUT_WR)
            counted = connection.recv(64)
            elapsed = time.monotonic() - started
        assert int(counted) == size
        return size * 8 / elapsed / MB
    finally:
        receiver.kill()
        receiver.wait()


def test_shaped_link_runs_near_its_rate_and_unshaped_is_much_faster(rig: NetRig) -> None:
    # Given the link to the new site shaped to 8 mbit
    rig.shape("8mbit")
    try:
        shaped = send_through(rig, 4 * MB)
    finally:
        rig.shape(None)
    # Then 4 MB cross it at 8 Mbit/s +- 25 %
    print(f"shaped to 8mbit: {shaped:.2f} Mbit/s")
    assert 6 <= shaped <= 10, f"shaped to 8 mbit, measured {shaped:.1f} Mbit/s"
    # And without the limit the same link is many times faster
    unshaped = send_through(rig, 4 * MB)
    print(f"unshaped: {unshaped:.0f} Mbit/s")
    assert unshaped > 5 * shaped, f"unshaped {unshaped:.1f} Mbit/s, shaped {shaped:.1f}"


CONNECT = """
import socket, sys
try:
    socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=2).close()
    print("connected")
except OSError as error:
    print(type(error).__name__, error)
"""


def test_host_reaches_no_service_of_the_root_namespace_and_has_no_route_out(
    rig: NetRig,
) -> None:
    host = rig.hosts["ey04-vm1"]
    gateway = rig.links[host.link].gateway

    def connect_from_host(address: str, port: int) -> str:
        return host.exec(sys.executable, "-c", CONNECT, address, str(port)).stdout.strip()

    # PostgreSQL listens on 127.0.0.1 of the root namespace (the positive control)
    socket.create_connection(("127.0.0.1", 5432), timeout=2).close()
    # but 127.0.0.1 in a host namespace is its own loopback, and the root end of its link
    # does not forward to it
    assert connect_from_host("127.0.0.1", 5432).startswith("ConnectionRefusedError")
    assert connect_from_host(gateway, 5432).startswith("ConnectionRefusedError")
    # And no route leaves the rig: not to this machine's own network, not to the Internet
    for outside in ("192.0.2.1", "8.8.8.8"):
        route = host.exec("ip", "route", "get", outside)
        assert route.returncode != 0 and "unreachable" in route.stderr, route
        assert "unreachable" in connect_from_host(outside, 80)
    # while the rig's own hosts are reachable through the root namespace... only from there:
    # a host has no route to another host's link either
    other = rig.hosts["ey02-xen"]
    assert "unreachable" in connect_from_host(other.ip, 22)


def test_cut_link_refuses_new_connections_until_restored(rig: NetRig) -> None:
    xen = rig.hosts["ey02-xen"]
    assert ssh(rig, xen, "true").returncode == 0
    rig.cut("ey02-xen")
    try:
        started = time.monotonic()
        cut = ssh(rig, xen, "true", timeout=2)
        assert cut.returncode == 255, cut
        assert time.monotonic() - started < 20
        # the other datacenter's hosts are not affected
        assert ssh(rig, rig.hosts["ey04-xen"], "true").returncode == 0
    finally:
        rig.restore("ey02-xen")
    assert ssh(rig, xen, "true").returncode == 0


def test_inventory_names_the_rig_hosts_and_passes_the_resolver_checks(
    rig: NetRig, tmp_path: Path,
) -> None:
    from services.resolver.inventory import FileInventory, reference_problems

    # Given the rig's inventory, read by the resolver's own file adapter
    path = rig.write_inventory(tmp_path / "inventory.yaml", customer="cust-9")
    document = FileInventory(path).document()
    # Then it has no dangling or foreign references, and names the rig's addresses
    assert reference_problems(document) == []
    assert {x.address for x in document.xen_hosts.values()} == {
        rig.hosts["ey04-xen"].address, rig.hosts["ey02-xen"].address}
    assert sorted(vm.ssh for vm in document.vms.values()) == sorted(
        h.address for n, h in rig.hosts.items() if "-vm" in n)
    assert {vm.customer for vm in document.vms.values()} == {"cust-9"}
    [root] = document.vms["ey04-s50001"].filesystems
    assert root.path == str(rig.hosts["ey04-vm1"].root) and root.snapshot_driver == "none"


def test_two_rigs_at_once_get_their_own_addresses_and_names(rig: NetRig) -> None:
    # Given a second rig while the module's is up (as another test run's would be)
    with NetRig(datacenters=["ey04"], vms_per_dc=0) as other:
        # Then it took another slot: no address or namespace in common, both answer
        assert other.slot != rig.slot
        assert not {h.ip for h in other.hosts.values()} & {h.ip for h in rig.hosts.values()}
        assert not set(other.namespaces) & set(rig.namespaces)
        for each in (rig, other):
            done = ssh(each, each.hosts["ey04-xen"], "ip -o -4 addr show dev eth0")
            assert f"inet {each.hosts['ey04-xen'].ip}/28" in done.stdout, done.stderr
