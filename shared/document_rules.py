"""The migration document's semantic rules: the checks that need the whole document at once.

They run only on a structurally valid document (`shared.document.validate_document` parses
first), so every field is present and well-formed here; what can still be wrong is how the
parts refer to each other. Every rule is linear in the document's size: a lookup is in a
dict or set built once, never a scan of a list inside a loop over another.
"""

from __future__ import annotations

from collections.abc import Hashable
from dataclasses import dataclass
from typing import Literal, TypeVar

from shared.document_errors import ERRORS_KEPT
from shared.document_index import DocumentIndex
from shared.document_schema import (
    MAX_FILESYSTEMS_IN_ALL,
    MAX_PORT_TARGETS_IN_ALL,
    DocumentError,
    MigrationDocument,
    json_pointer,
)

Kind = Literal["vm", "environment", "public_ip", "database_group"]
_A_KIND: dict[Kind, str] = {
    "vm": "a VM",
    "environment": "an environment",
    "public_ip": "a public IP",
    "database_group": "a database group",
}
K = TypeVar("K", bound=Hashable)
HOLDERS_SHOWN = 5  # VMs named in a message about too many of them


def semantic_errors(document: MigrationDocument) -> tuple[list[DocumentError], int]:
    """The first ERRORS_KEPT semantic problems of `document`, in document order, and how many
    there are in all (0 when it keeps every rule)."""
    rules = _Rules(document)
    return rules.check(), rules.total


@dataclass(frozen=True)
class _Declared:
    kind: Kind
    path: _At


class _At(tuple[str | int, ...]):
    """Where in the document: spelled as a JSON Pointer only when a message needs it (most
    items have no problem, and spelling every path was a third of the rules' time)."""

    __slots__ = ()

    def __str__(self) -> str:
        return json_pointer(*self)


def _at(*parts: str | int) -> _At:
    return _At(parts)


def _first_seen(seen: dict[K, _At], key: K, path: _At) -> _At | None:
    """Where `key` was seen before, or None after remembering it was seen at `path`."""
    earlier = seen.get(key)
    if earlier is None:
        seen[key] = path
    return earlier


def _some(names: list[str]) -> str:
    """The first HOLDERS_SHOWN names, and how many more: a message stays short."""
    shown = ", ".join(names[:HOLDERS_SHOWN])
    rest = len(names) - HOLDERS_SHOWN
    return f"{shown} and {rest:,} more" if rest > 0 else shown


class _Rules:
    def __init__(self, document: MigrationDocument) -> None:
        self.document = document
        self.errors: list[DocumentError] = []
        self.total = 0
        self.declared: dict[str, _Declared] = {}
        self.index = DocumentIndex(document)
        self.vms = self.index.vms  # filled as they are declared: the first of a duid wins
        self.environments = self.index.environments

    def check(self) -> list[DocumentError]:
        self._check_totals()
        self._declare_duids()
        self._check_environments()
        self._check_vms()
        self._check_public_ips()
        self._check_database_groups()
        self._check_shared_filesystems()
        self._check_ip_equivalences()
        self._check_databases()
        self._check_local_filesystems()
        return self.errors

    def _error(self, path: _At, message: str) -> None:
        self.total += 1
        if len(self.errors) < ERRORS_KEPT:
            self.errors.append(DocumentError(path=str(path), message=message))

    def _check_totals(self) -> None:
        doc = self.document
        filesystems = (((("vms", i, "disks", d, "filesystems")), len(disk.filesystems))
                       for i, vm in enumerate(doc.vms) for d, disk in enumerate(vm.disks))
        targets = ((("public_ips", i, "port_mappings", m, "vms"), len(mapping.vms))
                   for i, ip in enumerate(doc.public_ips)
                   for m, mapping in enumerate(ip.port_mappings))
        for parts, limit, what in ((filesystems, MAX_FILESYSTEMS_IN_ALL, "filesystems"),
                                   (targets, MAX_PORT_TARGETS_IN_ALL, "port-mapping targets")):
            count = 0
            for where, size in parts:
                count += size
                if count > limit:
                    self._error(_at(*where),
                                f"the document holds more than {limit} {what} in all")
                    break

    def _declare(self, kind: Kind, duid: str, path: _At) -> bool:
        first = self.declared.get(duid)
        if first is not None:
            self._error(path, f"duid {duid!r} is used twice (also at {first.path})")
            return False
        self.declared[duid] = _Declared(kind, path)
        return True

    def _refers(self, path: _At, duid: str, kind: Kind, what: str) -> bool:
        """Whether `duid` names a declared entity of `kind`; reports it when not."""
        found = self.declared.get(duid)
        if found is None:
            self._error(path, f"{what} {duid!r} is not a duid declared in this document")
            return False
        if found.kind != kind:
            self._error(
                path,
                f"{what} {duid!r} is {_A_KIND[found.kind]} (at {found.path}), not {_A_KIND[kind]}",
            )
            return False
        return True

    def _declare_duids(self) -> None:
        doc = self.document
        for i, env in enumerate(doc.environments):
            if self._declare("environment", env.duid, _at("environments", i, "duid")):
                self.environments[env.duid] = env
        for i, vm in enumerate(doc.vms):
            if self._declare("vm", vm.duid, _at("vms", i, "duid")):
                self.vms[vm.duid] = vm
        for i, ip in enumerate(doc.public_ips):
            self._declare("public_ip", ip.duid, _at("public_ips", i, "duid"))
        for i, group in enumerate(doc.database_groups):
            self._declare("database_group", group.duid, _at("database_groups", i, "duid"))

    def _check_environments(self) -> None:
        for j, env in enumerate(self.document.environments):
            seen: dict[str, _At] = {}
            for k, vm_duid in enumerate(env.vms):
                path = _at("environments", j, "vms", k)
                if (earlier := _first_seen(seen, vm_duid, path)) is not None:
                    self._error(path, f"vm {vm_duid!r} is listed twice (also at {earlier})")
                elif self._refers(path, vm_duid, "vm", "environment member"):
                    vm = self.vms[vm_duid]
                    if vm.environment != env.duid:
                        self._error(
                            path,
                            f"environment {env.duid!r} lists vm {vm_duid!r}, "
                            f"but that VM's environment is {vm.environment!r}",
                        )

    def _check_vms(self) -> None:
        for i, vm in enumerate(self.document.vms):
            path = _at("vms", i, "environment")
            if self._refers(path, vm.environment, "environment", "environment"):
                if vm.duid not in self.index.members_of(vm.environment):
                    self._error(
                        path,
                        f"vm {vm.duid!r} says it is in environment {vm.environment!r}, "
                        "but that environment does not list it",
                    )
            mountpoints: dict[str, _At] = {}
            for d, disk in enumerate(vm.disks):
                for f, filesystem in enumerate(disk.filesystems):
                    path = _at("vms", i, "disks", d, "filesystems", f, "mountpoint")
                    earlier = _first_seen(mountpoints, filesystem.mountpoint, path)
                    if earlier is not None:
                        self._error(
                            path,
                            f"mountpoint {filesystem.mountpoint!r} is used twice on vm "
                            f"{vm.duid!r} (also at {earlier})",
                        )

    def _check_public_ips(self) -> None:
        for i, ip in enumerate(self.document.public_ips):
            ports: dict[tuple[str, int], _At] = {}
            for m, mapping in enumerate(ip.port_mappings):
                base = ("public_ips", i, "port_mappings", m)
                path = _at(*base, "external_port")
                key = (mapping.protocol, mapping.external_port)
                if (earlier := _first_seen(ports, key, path)) is not None:
                    self._error(
                        path,
                        f"{mapping.protocol} port {mapping.external_port} is mapped twice "
                        f"on public IP {ip.duid!r} (also at {earlier})",
                    )
                targets: dict[str, _At] = {}
                for k, vm_duid in enumerate(mapping.vms):
                    path = _at(*base, "vms", k)
                    if (earlier := _first_seen(targets, vm_duid, path)) is not None:
                        self._error(path, f"vm {vm_duid!r} is listed twice (also at {earlier})")
                    else:
                        self._refers(path, vm_duid, "vm", "port mapping target")

    def _check_database_groups(self) -> None:
        for i, group in enumerate(self.document.database_groups):
            path = _at("database_groups", i, "master")
            if self._refers(path, group.master, "vm", "database master"):
                role = self.vms[group.master].role
                if role != "db_master":
                    self._error(
                        path,
                        f"database master {group.master!r} has role {role!r}, not 'db_master'",
                    )
            seen: dict[str, _At] = {}
            for k, replica in enumerate(group.replicas):
                path = _at("database_groups", i, "replicas", k)
                if replica == group.master:
                    self._error(
                        path,
                        f"vm {replica!r} is both the master and a replica of database group "
                        f"{group.duid!r}",
                    )
                elif (earlier := _first_seen(seen, replica, path)) is not None:
                    self._error(path, f"vm {replica!r} is listed twice (also at {earlier})")
                elif self._refers(path, replica, "vm", "database replica"):
                    role = self.vms[replica].role
                    if role != "db_replica":
                        self._error(
                            path,
                            f"database replica {replica!r} has role {role!r}, not 'db_replica'",
                        )

    def _check_shared_filesystems(self) -> None:
        sources: dict[tuple[str, str], _At] = {}
        targets: dict[tuple[str, str], _At] = {}
        holding = self.index.holders()
        for i, move in enumerate(self.document.migration.shared_filesystems):
            path = _at("migration", "shared_filesystems", i)
            shown = f"{move.mountpoint!r}"
            source = (move.old_environment, move.mountpoint)
            if (earlier := _first_seen(sources, source, path)) is not None:
                self._error(
                    path,
                    f"shared filesystem {shown} of old environment {move.old_environment!r} "
                    f"is moved twice (also at {earlier})",
                )
            env_path = _at("migration", "shared_filesystems", i, "new_environment")
            env = move.new_environment
            if not self._refers(env_path, env, "environment", "shared filesystem target"):
                continue
            holders = holding.get((env, move.mountpoint), [])
            if not holders:
                self._error(path, f"environment {env!r} has no VM with a filesystem at {shown}")
            elif len(holders) > 1:
                self._error(
                    path,
                    f"environment {env!r} has {len(holders)} VMs with a filesystem at {shown} "
                    f"({_some(holders)}); exactly one must receive the shared filesystem",
                )
            elif (earlier := _first_seen(targets, (env, move.mountpoint), path)) is not None:
                self._error(
                    path,
                    f"environment {env!r} already receives a shared filesystem at {shown} "
                    f"(at {earlier})",
                )

    def _check_ip_equivalences(self) -> None:
        seen: dict[str, _At] = {}
        for i, equivalence in enumerate(self.document.migration.ip_equivalences):
            path = _at("migration", "ip_equivalences", i, "old_ip")
            if (earlier := _first_seen(seen, equivalence.old_ip, path)) is not None:
                self._error(
                    path, f"old IP {equivalence.old_ip!r} is mapped twice (also at {earlier})"
                )
            path = _at("migration", "ip_equivalences", i, "new_public_ip")
            self._refers(path, equivalence.new_public_ip, "public_ip", "ip equivalence target")

    def _check_databases(self) -> None:
        seen: dict[tuple[str, str], _At] = {}
        for i, move in enumerate(self.document.migration.databases):
            path = _at("migration", "databases", i, "name")
            if (earlier := _first_seen(seen, (move.old_master, move.name), path)) is not None:
                self._error(
                    path,
                    f"database {move.name!r} on {move.old_master!r} is moved twice "
                    f"(also at {earlier})",
                )
            path = _at("migration", "databases", i, "new_database_group")
            self._refers(path, move.new_database_group, "database_group", "database target")

    def _check_local_filesystems(self) -> None:
        old_vms: dict[str, _At] = {}
        new_vms: dict[str, tuple[_At, str]] = {}
        for i, move in enumerate(self.document.migration.local_filesystems):
            path = _at("migration", "local_filesystems", i, "old_vm")
            if (earlier := _first_seen(old_vms, move.old_vm, path)) is not None:
                self._error(path, f"old vm {move.old_vm!r} is migrated twice (also at {earlier})")
            path = _at("migration", "local_filesystems", i, "new_vm")
            if not self._refers(path, move.new_vm, "vm", "local filesystem target"):
                continue
            if move.new_vm in new_vms:
                earlier, other_old_vm = new_vms[move.new_vm]
                self._error(
                    path,
                    f"vm {move.new_vm!r} already receives the local filesystems of "
                    f"{other_old_vm!r} (at {earlier})",
                )
            else:
                new_vms[move.new_vm] = (path, move.old_vm)
