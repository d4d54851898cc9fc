"""Documents for bench/intake.py: the ordinary 100-VM one, and the worst cases of the field
report (one environment holding every VM, thousands of shared-filesystem moves into it, as
much as fits in the 1 MiB body limit).

Worst for the rules is one environment with all the VMs: every shared-filesystem move
looks for the VMs of that environment mounting its mountpoint, and every VM's membership is
looked up in that environment's list. Mountpoints are short, distinct names (`/a0`, `/a1`,
...), so that many moves fit.
"""

from __future__ import annotations

import json
from typing import Any

MAX_BODY = 1024 * 1024


def disk(mountpoint: str, size: int) -> dict[str, Any]:
    return {"size_gib": size + 5,
            "filesystems": [{"mountpoint": mountpoint, "size_gib": size, "fs_type": "ext3"}]}


def vm(duid: str, role: str, environment: str, *mounts: str) -> dict[str, Any]:
    return {"duid": duid, "role": role, "environment": environment, "memory_mib": 1792,
            "vcpus": 2, "disks": [disk("/", 15), *(disk(m, 50) for m in mounts)]}


def ordinary(app_envs: int = 10, vms_per_env: int = 8, db_pairs: int = 10) -> dict[str, Any]:
    """A valid document with app_envs * vms_per_env + 2 * db_pairs VMs."""
    environments, vms, ips, groups = [], [], [], []
    shared, equivalences, databases, local = [], [], [], []
    for e in range(app_envs):
        env = f"env_app_{e}"
        members = [f"vm_{e}_{n}" for n in range(vms_per_env)]
        environments.append({"duid": env, "name_hint": f"app {e}", "vms": members})
        for n, duid in enumerate(members):
            vms.append(vm(duid, "app", env, *(["/data"] if n == 0 else [])))
            local.append({"old_vm": f"ey04-s{50000 + e * vms_per_env + n}", "new_vm": duid})
        ips.append({"duid": f"ip_{e}", "port_mappings": [
            {"protocol": "tcp", "external_port": port, "vms": members, "internal_port": port}
            for port in (443, 80)]})
        shared.append({"old_environment": f"ey04-e{75 + e:05d}", "mountpoint": "/data",
                       "new_environment": env})
        equivalences.append({"old_ip": f"203.0.113.{10 + e}", "new_public_ip": f"ip_{e}"})
    for d in range(db_pairs):
        env, master, replica = f"env_db_{d}", f"vm_db_{d}_m", f"vm_db_{d}_r"
        environments.append({"duid": env, "name_hint": f"db {d}", "vms": [master, replica]})
        vms += [vm(master, "db_master", env, "/var/lib/mysql"),
                vm(replica, "db_replica", env, "/var/lib/mysql")]
        groups.append({"duid": f"db_{d}", "engine": "mysql", "version": "5.0.51",
                       "master": master, "replicas": [replica]})
        databases.append({"name": f"shop_{d}_production", "old_master": f"mysql-{d}-master",
                          "old_replica": f"mysql-{d}-replica", "new_database_group": f"db_{d}"})
    return _document(environments, vms, ips, groups, shared, equivalences, databases, local)


def _document(environments: list[Any], vms: list[Any], ips: list[Any], groups: list[Any],
              shared: list[Any], equivalences: list[Any], databases: list[Any],
              local: list[Any]) -> dict[str, Any]:
    return {"version": 1, "customer": {"id": "cust-2000", "name": "Bench Corp."},
            "environments": environments, "vms": vms, "public_ips": ips,
            "database_groups": groups,
            "migration": {"shared_filesystems": shared, "ip_equivalences": equivalences,
                          "databases": databases, "local_filesystems": local}}


def _small_vm(duid: str, mounts: list[str]) -> dict[str, Any]:
    filesystems = [{"mountpoint": m, "size_gib": 1, "fs_type": "xfs"} for m in mounts]
    return {"duid": duid, "role": "app", "environment": "e", "memory_mib": 512, "vcpus": 1,
            "disks": [{"size_gib": 1, "filesystems": filesystems}]}


def _move(n: int, mountpoint: str) -> dict[str, str]:
    return {"old_environment": f"o{n}", "mountpoint": mountpoint, "new_environment": "e"}


def worst_valid(vms: int = 4500, moves: int = 6500) -> dict[str, Any]:
    """`vms` VMs in one environment and `moves` shared filesystems moved into it, each
    mounted by exactly one of them (VM n holds /a{n}, /a{n+vms}, ...)."""
    duids = [f"v{n}" for n in range(vms)]
    mounts: list[list[str]] = [[] for _ in range(vms)]
    for m in range(moves):
        mounts[m % vms].append(f"/a{m}")
    return _document([{"duid": "e", "name_hint": "all", "vms": duids}],
                     [_small_vm(duid, mounts[n]) for n, duid in enumerate(duids)],
                     [], [], [_move(m, f"/a{m}") for m in range(moves)], [], [], [])


def worst_invalid(vms: int = 4500, moves: int = 6500) -> dict[str, Any]:
    """`vms` VMs in one environment, every eighth mounting /d, and `moves` moves into it
    that are all wrong: a third to /d (held by 563 of them), a third to a mountpoint no VM
    has, a third repeating an earlier move."""
    duids = [f"v{n}" for n in range(vms)]
    shared = []
    for m in range(moves):
        kind = m % 3
        if kind == 0:
            shared.append(_move(m, "/d"))
        elif kind == 1:
            shared.append(_move(m, f"/n{m}"))
        else:
            shared.append(_move(m - 2, "/d"))
    vms_ = [_small_vm(duid, ["/d"] if n % 8 == 0 else []) for n, duid in enumerate(duids)]
    return _document([{"duid": "e", "name_hint": "all", "vms": duids}], vms_, [], [], shared,
                     [], [], [])


def wrong_shape(count: int = 500_000) -> dict[str, Any]:
    """The example's shape with `count` public IPs that are not objects (the field report's
    34 MB error list)."""
    document = ordinary(1, 1, 0)
    document["public_ips"] = [0] * count
    return document


def compact(document: dict[str, Any]) -> bytes:
    return json.dumps(document, separators=(",", ":")).encode()


def fitting(build: Any, *, vms: int, moves: int, limit: int = MAX_BODY) -> tuple[int, bytes]:
    """The most moves (at most `moves`) that `build(vms, moves)` fits in `limit` bytes."""
    low, high = 0, moves
    while low < high:  # the size grows with the moves: bisect
        middle = (low + high + 1) // 2
        if len(compact(build(vms, middle))) <= limit:
            low = middle
        else:
            high = middle - 1
    return low, compact(build(vms, low))
