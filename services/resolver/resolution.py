"""The resolved document: the migration document with every duid replaced by its entity.

Same shape as the document, so it reads the same way: definitions carry the entity in
place of their `duid` (VMs and environments a `name`, public IPs an `address`), and every
reference holds the entity instead of the placeholder. A database group reference becomes
the group itself (engine, version, master, replicas); a shared filesystem move names the
one new VM that receives it.
"""

from __future__ import annotations

from typing import Any

from services.resolver.allocation import Allocations, Needs
from shared.document import MigrationDocument


def needs_of(document: MigrationDocument) -> Needs:
    """What `document` asks the pools for, in document order."""
    return Needs(
        customer_id=document.customer.id,
        environments=tuple(env.duid for env in document.environments),
        vms=tuple(vm.duid for vm in document.vms),
        public_ips=tuple(ip.duid for ip in document.public_ips),
    )


def resolve_document(document: MigrationDocument, allocated: Allocations) -> dict[str, Any]:
    """The document as JSON with the allocated entities in place of duids."""
    vm = allocated.vm_names
    env = allocated.environments
    groups = {
        group.duid: {"engine": group.engine, "version": group.version,
                     "master": vm[group.master], "replicas": [vm[r] for r in group.replicas]}
        for group in document.database_groups
    }
    mountpoints = {
        candidate.duid: {fs.mountpoint for disk in candidate.disks for fs in disk.filesystems}
        for candidate in document.vms
    }
    environments = {e.duid: e for e in document.environments}
    moves = document.migration
    return {
        "version": document.version,
        "customer": document.customer.model_dump(mode="json"),
        "vlan": {"id": allocated.vlan.id, "subnet": allocated.vlan.subnet,
                 "gateway": allocated.vlan.gateway},
        "environments": [
            {"name": env[e.duid], "name_hint": e.name_hint, "vms": [vm[v] for v in e.vms]}
            for e in document.environments
        ],
        "vms": [
            {"name": vm[v.duid], "internal_ip": allocated.internal_ips[v.duid],
             **v.model_dump(mode="json", exclude={"duid", "environment"}),
             "environment": env[v.environment]}
            for v in document.vms
        ],
        "public_ips": [
            {"address": allocated.public_ips[ip.duid],
             "port_mappings": [
                 {**m.model_dump(mode="json", exclude={"vms"}), "vms": [vm[v] for v in m.vms]}
                 for m in ip.port_mappings]}
            for ip in document.public_ips
        ],
        "database_groups": list(groups.values()),
        "migration": {
            "shared_filesystems": [
                {"old_environment": s.old_environment, "mountpoint": s.mountpoint,
                 "new_environment": env[s.new_environment],
                 "new_vm": next(vm[v] for v in environments[s.new_environment].vms
                                if s.mountpoint in mountpoints[v])}
                for s in moves.shared_filesystems
            ],
            "ip_equivalences": [
                {"old_ip": q.old_ip, "new_public_ip": allocated.public_ips[q.new_public_ip]}
                for q in moves.ip_equivalences
            ],
            "databases": [
                {"name": d.name, "old_master": d.old_master, "old_replica": d.old_replica,
                 "new_database_group": groups[d.new_database_group]}
                for d in moves.databases
            ],
            "local_filesystems": [
                {"old_vm": f.old_vm, "new_vm": vm[f.new_vm]} for f in moves.local_filesystems
            ],
        },
    }
