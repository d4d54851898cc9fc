"""nbd-server exports of snapshots on a Xen host: one config file and one server per snapshot.

The server listens on 127.0.0.1 only (the archiver comes through an SSH tunnel); that needs
`listenaddr` in `[generic]`, which is per server, hence one server per snapshot. The export
is named after the snapshot and read-only: the archiver mounts it `ro,noload` (the journal
of a crash-consistent ext3/ext4 is not replayed; what it holds was not yet committed).
"""

from __future__ import annotations

import time
import zlib

from shared.errors import TransientError
from shared.hosts import Host

RUN_DIR = "/run/ferry"
FIRST_PORT, PORTS = 10809, 1000
TIMEOUT = 30.0
START_WAIT = 10.0


def config_path(snapshot_id: str) -> str:
    return f"{RUN_DIR}/{snapshot_id}.conf"


def pid_path(snapshot_id: str) -> str:
    return f"{RUN_DIR}/{snapshot_id}.pid"


def render_config(snapshot_id: str, device: str, port: int) -> str:
    return (f"[generic]\n    listenaddr = 127.0.0.1\n    port = {port}\n    allowlist = false\n"
            f"[{snapshot_id}]\n    exportname = {device}\n    readonly = true\n")


def listening_ports(host: Host) -> set[int]:
    """TCP ports something listens on, from /proc/net/tcp{,6} (no ss/netstat needed)."""
    text = host.run(["cat", "/proc/net/tcp", "/proc/net/tcp6"], timeout=TIMEOUT,
                    ok_exits=(0, 1)).stdout.decode()
    ports = set()
    for line in text.splitlines()[1:]:
        fields = line.split()
        if len(fields) > 3 and fields[3] == "0A" and ":" in fields[1]:
            ports.add(int(fields[1].rsplit(":", 1)[1], 16))
    return ports


def server_pids(host: Host, snapshot_id: str = "") -> dict[int, str]:
    """{pid: snapshot id} of our nbd-server processes (all, or one snapshot's)."""
    pattern = f"nbd-server -C {config_path(snapshot_id) if snapshot_id else RUN_DIR + '/ferry-'}"
    done = host.run(["pgrep", "-f", pattern], timeout=TIMEOUT, ok_exits=(0, 1))
    found: dict[int, str] = {}
    for pid in done.stdout.decode().split():
        # the shells that ran pgrep carry the pattern too: keep only real nbd-servers
        argv = host.run(["cat", f"/proc/{pid}/cmdline"], timeout=TIMEOUT,
                        ok_exits=(0, 1)).stdout.split(b"\0")
        if argv and argv[0].endswith(b"nbd-server") and b"-C" in argv:
            conf = argv[argv.index(b"-C") + 1].decode(errors="replace")
            if conf.startswith(f"{RUN_DIR}/ferry-") and conf.endswith(".conf"):
                found[int(pid)] = conf.removeprefix(f"{RUN_DIR}/").removesuffix(".conf")
    return found


def start(host: Host, snapshot_id: str, device: str) -> int:
    """Serve `device` read-only as export `snapshot_id` on 127.0.0.1:<free port>; the port.

    Raises TransientError if no server came up on any of three ports.
    """
    host.run(["mkdir", "-p", RUN_DIR], timeout=TIMEOUT)
    stop(host, snapshot_id)  # a leftover of an earlier try of the same snapshot
    taken = listening_ports(host)
    offset = zlib.crc32(snapshot_id.encode()) % PORTS
    candidates = [FIRST_PORT + (offset + i) % PORTS for i in range(PORTS)]
    tried = []
    for port in [p for p in candidates if p not in taken][:3]:
        tried.append(port)
        host.run(["dd", f"of={config_path(snapshot_id)}", "status=none"], timeout=TIMEOUT,
                 stdin=render_config(snapshot_id, device, port).encode())
        host.run(["nbd-server", "-C", config_path(snapshot_id), "-p", pid_path(snapshot_id)],
                 timeout=TIMEOUT)
        deadline = time.monotonic() + START_WAIT
        while time.monotonic() < deadline:
            if port in listening_ports(host) and server_pids(host, snapshot_id):
                return port
            time.sleep(0.2)
        stop(host, snapshot_id)  # the port was taken meanwhile, or the server died
    raise TransientError(f"{host.name}: nbd-server for {snapshot_id} did not listen on any of "
                         f"ports {tried}")


def stop(host: Host, snapshot_id: str) -> None:
    """Stop the snapshot's nbd-server (and its per-client children); remove its files.

    Idempotent. Raises TransientError if a server survives SIGKILL.
    """
    for signal in ("TERM", "KILL"):
        pids = server_pids(host, snapshot_id)
        if not pids:
            break
        host.run(["kill", f"-{signal}", *map(str, pids)], timeout=TIMEOUT, ok_exits=(0, 1))
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and server_pids(host, snapshot_id):
            time.sleep(0.2)
    if server_pids(host, snapshot_id):
        raise TransientError(f"{host.name}: nbd-server for {snapshot_id} does not stop")
    host.run(["rm", "-f", config_path(snapshot_id), pid_path(snapshot_id)], timeout=TIMEOUT)


def configured(host: Host) -> set[str]:
    """Snapshot ids that have a config file in RUN_DIR (a server may or may not run)."""
    done = host.run(["ls", "-1", RUN_DIR], timeout=TIMEOUT, ok_exits=(0, 1, 2))
    return {name.removesuffix(".conf") for name in done.stdout.decode().split()
            if name.startswith("ferry-") and name.endswith(".conf")}
