"""Planning: one archive job per source the migration moves, from the inventory alone.

- each local filesystem of each old VM → `snapshot.requested` (the Xen host's address, the
  device, its size and snapshot driver), archived later from the snapshot;
- each shared (GFS) filesystem → `archive.requested` kind `shared_fs`, taken on one VM that
  mounts it;
- each database → kind `database`, dumped on the old replica;
- each old replica new database VMs start from → kind `db_server_root`, its root filesystem,
  with every customer's per-customer paths of that server left out.
First, though, ownership: a document moves only what its customer owns. Every old VM,
environment, shared filesystem, database, database server and old public IP
(`ip_equivalences[].old_ip`) it names is looked up, and if any belongs to another customer
the migration is refused naming each of them and its owner, before anything is planned (so
before anything is allocated or snapshotted). A database server the hosting company shares
among customers (`customer: shared`) is the one thing every customer may name; each
database on it still has one owner. An old public IP the inventory does not list is refused
like an unknown VM: the resolved document maps that address to a new one (what the
switch-over re-points), so an address nobody is known to own is never taken on a
document's word (an HTTP inventory must serve `public-ips`).
Every request id is `<migration>:<kind>:<n>`, so a replayed migration plans the same ids.
Reuse keys (the archiver coalesces requests with one key into one archive): a shared
server's root is `db_server_root:<datacenter>:<server>:<root>:scrub-<digest of what it
leaves out>`, one archive for every customer on that server (a changed scrub list makes a
new one); every other kind's key carries the migration id
(`<kind>:<migration>:<what>`), so a later migration never meets an old archive of a source
that has changed since, while a replay of the same migration still meets its own.
Nothing comes from free text in the document: hosts, devices and paths are the inventory's.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any

from services.resolver.inventory import (
    SHARED,
    DatabaseServer,
    Datacenter,
    Environment,
    Inventory,
    InventoryInvalidError,
    M,
    PublicIp,
    UnknownEntityError,
    Vm,
    XenHost,
)
from shared.contracts import (
    ArchiveKind,
    ArchiveRequested,
    ArchiveSource,
    PlannedJob,
    SnapshotRequested,
)
from shared.document import DatabaseMove, MigrationDocument
from shared.errors import PermanentError


class PlanningError(PermanentError):
    """The document asks for something the inventory contradicts (a role, an engine…)."""


class NotOwnedError(PermanentError):
    """The document names old entities of another customer: its migration is refused whole."""


REUSE_KEY_MAX = 255  # the archiver's column


def bounded_key(key: str) -> str:
    """`key` as it is when it fits the archiver's column; else its head and a digest of all
    of it (a mountpoint may be 4096 characters), still one key per source."""
    if len(key) <= REUSE_KEY_MAX:
        return key
    digest = hashlib.sha256(key.encode("utf-8")).hexdigest()
    return f"{key[:REUSE_KEY_MAX - len(digest) - 1]}~{digest}"


@dataclass(frozen=True)
class Plan:
    jobs: tuple[PlannedJob, ...]
    snapshots: tuple[SnapshotRequested, ...]
    archives: tuple[ArchiveRequested, ...]


class _Lookups:
    """Asks the inventory once per entity per plan, and says why an entity was wanted. A
    name it lacks is remembered too, so the ownership pass, planning and a shared
    filesystem's alternates never ask the inventory (over HTTP, a request each) again."""

    def __init__(self, inventory: Inventory) -> None:
        self._inventory = inventory
        self._seen: dict[tuple[type[Any], str], Any] = {}  # the entity, or why it is missing

    def find(self, model: type[M], name: str) -> M | None:
        """The entity, or None when the inventory lacks it (planning then says so)."""
        try:
            return self.get(model, name)
        except UnknownEntityError:
            return None

    def get(self, model: type[M], name: str, wanted_as: str = "") -> M:
        key = (model, name)
        if key not in self._seen:
            try:
                self._seen[key] = self._inventory.lookup(model, name)
            except UnknownEntityError as error:
                self._seen[key] = error
        found = self._seen[key]
        if isinstance(found, UnknownEntityError):
            if not wanted_as:
                raise found
            raise UnknownEntityError(f"{found} ({wanted_as})") from found
        entity: M = found
        return entity

    def datacenter(self, name: str, of: str) -> str:
        self.get(Datacenter, name, f"the datacenter of {of}")
        return name


class _Planner:
    def __init__(self, migration_id: str, inventory: Inventory) -> None:
        self.migration_id = migration_id
        self.look = _Lookups(inventory)
        self.jobs: list[PlannedJob] = []
        self.snapshots: list[SnapshotRequested] = []
        self.archives: list[ArchiveRequested] = []
        self._counts: dict[str, int] = {}

    def _job(self, kind: ArchiveKind, datacenter: str, reuse_key: str,
             source: ArchiveSource) -> PlannedJob:
        self._counts[kind] = self._counts.get(kind, 0) + 1
        job = PlannedJob(request_id=f"{self.migration_id}:{kind}:{self._counts[kind]}",
                         kind=kind, datacenter=datacenter, reuse_key=reuse_key, source=source)
        self.jobs.append(job)
        if kind != "local_fs":
            self.archives.append(ArchiveRequested(
                datacenter=datacenter, request_id=job.request_id, kind=kind,
                reuse_key=reuse_key, source=source))
        return job

    def local_filesystems(self, old_vm: str) -> None:
        vm = self.look.get(Vm, old_vm)
        what = f"old VM {old_vm!r}"
        datacenter = self.look.datacenter(vm.datacenter, what)
        xen = self.look.get(XenHost, vm.xen_host, f"the Xen host of {what}")
        if xen.datacenter != vm.datacenter:
            raise InventoryInvalidError(
                f"{what} is in datacenter {vm.datacenter!r} but its Xen host "
                f"{vm.xen_host!r} is in {xen.datacenter!r}")
        for fs in vm.filesystems:
            if fs.fs_type == "swap":
                continue  # nothing worth moving; the new VM gets a fresh one
            source = ArchiveSource(host=vm.ssh, device=fs.device,
                                   path=fs.path if fs.snapshot_driver == "none" and fs.path
                                   else fs.mountpoint,
                                   label=f"{old_vm}:{fs.mountpoint}", fs_type=fs.fs_type,
                                   used_bytes=fs.used_bytes)
            job = self._job("local_fs", datacenter,
                            self._fresh_key("local_fs", old_vm, fs.mountpoint), source)
            self.snapshots.append(SnapshotRequested(
                request_id=job.request_id, datacenter=datacenter, xen_host=xen.address,
                device=fs.device, size_bytes=fs.size_bytes or fs.used_bytes,
                driver=fs.snapshot_driver, reuse_key=job.reuse_key, source=source))

    def shared_filesystem(self, old_environment: str, mountpoint: str) -> None:
        env = self.look.get(Environment, old_environment)
        what = f"old environment {old_environment!r}"
        found = [fs for fs in env.shared_filesystems if fs.mountpoint == mountpoint]
        if not found:
            known = ", ".join(fs.mountpoint for fs in env.shared_filesystems) or "none"
            raise UnknownEntityError(f"{what} has no shared filesystem at {mountpoint!r} in "
                                     f"the inventory (it has: {known})")
        shared = found[0]
        for index, vm_name in enumerate(shared.mounted_on):
            vm = self.look.find(Vm, vm_name)
            if vm is None:
                continue  # another VM that mounts it will do
            label = f"{old_environment}:{mountpoint}"
            datacenter = self.look.datacenter(vm.datacenter, f"old VM {vm_name!r}")
            # the archiver tries these in order when the first cannot be used; only VMs of
            # the same datacenter, whose archivers can reach them
            others = (self.look.find(Vm, name) for name in shared.mounted_on[index + 1:])
            alternates = tuple(other.ssh for other in others
                               if other is not None and other.datacenter == vm.datacenter)
            self._job("shared_fs", datacenter,
                      self._fresh_key("shared_fs", old_environment, mountpoint),
                      ArchiveSource(host=vm.ssh, path=shared.path or mountpoint, label=label,
                                    used_bytes=shared.used_bytes, alternates=alternates))
            return
        raise UnknownEntityError(
            f"no VM that mounts shared filesystem {mountpoint!r} of {what} is in the "
            f"inventory (mounted on: {', '.join(found[0].mounted_on)})")

    def database(self, move: DatabaseMove, engine: str) -> DatabaseServer:
        replica = self.look.get(DatabaseServer, move.old_replica)
        master = self.look.get(DatabaseServer, move.old_master)
        if replica.role != "replica":
            raise PlanningError(f"database server {move.old_replica!r} is a {replica.role} "
                                "in the inventory, not a replica: databases are dumped on "
                                "a replica")
        if master.role != "master":
            raise PlanningError(f"database server {move.old_master!r} is a {master.role} "
                                "in the inventory, not a master")
        if replica.master != move.old_master and move.old_replica not in master.replicas:
            raise PlanningError(f"{move.old_replica!r} is not a replica of "
                                f"{move.old_master!r} in the inventory")
        if move.name not in replica.databases:
            known = ", ".join(sorted(replica.databases)) or "none"
            raise UnknownEntityError(f"database {move.name!r} is not on "
                                     f"{move.old_replica!r} in the inventory (it has: {known})")
        if replica.engine != engine:
            raise PlanningError(f"database {move.name!r} is {replica.engine} on "
                                f"{move.old_replica!r}, but its new group runs {engine}")
        datacenter = self.look.datacenter(replica.datacenter,
                                          f"database server {move.old_replica!r}")
        self._job("database", datacenter,
                  self._fresh_key("database", move.old_replica, move.name),
                  ArchiveSource(host=replica.ssh, database=move.name, engine=replica.engine,
                                pause_replication=replica.pause_replication,
                                label=f"{move.name}@{move.old_replica}",
                                used_bytes=replica.databases[move.name].size_bytes))
        return replica

    def server_root(self, name: str, replica: DatabaseServer) -> None:
        """One archive per server root, the same for every customer on it: its key names
        the server and what it leaves out (never the migration or the customer), and its
        source leaves out every customer's paths, never only the migrating one's."""
        per_customer = (path for _, paths in sorted(replica.customer_paths.items())
                        for path in paths)
        excludes = tuple(dict.fromkeys(
            [*([replica.data_dir] if replica.data_dir else []), *per_customer]))
        # the scrub list is in the key too: an archive made before a customer's paths were
        # listed holds them, and must not be reused once they are
        scrub = hashlib.sha256("\n".join(excludes).encode("utf-8")).hexdigest()[:12]
        key = bounded_key(f"db_server_root:{replica.datacenter}:{name}:{replica.root}:"
                          f"scrub-{scrub}")
        self._job("db_server_root", replica.datacenter, key,
                  ArchiveSource(host=replica.ssh, path=replica.root, excludes=excludes,
                                engine=replica.engine, label=f"{name}:{replica.root}",
                                used_bytes=replica.root_used_bytes))

    def public_ip(self, old_ip: str) -> None:
        """An old public IP the document maps must be in the inventory (in a datacenter it
        knows); nothing is archived for it."""
        ip = self.look.get(PublicIp, old_ip, "an old IP moves only when the inventory says "
                                            "whose it is")
        self.look.datacenter(ip.datacenter, f"old public IP {old_ip!r}")

    def _fresh_key(self, kind: ArchiveKind, *what: str) -> str:
        """A key only this migration uses: no later migration reuses its archive."""
        return bounded_key(":".join((kind, self.migration_id, *what)))


def ownership_problems(document: MigrationDocument, look: _Lookups) -> list[str]:
    """Each old entity `document` names that is not its customer's, with its owner. Names
    the inventory lacks are left to planning (it fails naming them)."""
    customer = document.customer.id
    problems: dict[str, None] = {}  # in document order, each once

    def owned(what: str, owner: str) -> None:
        # SHARED (the model allows it on database servers only) is every customer's to name
        if owner not in (customer, SHARED):
            problems[f"{what} belongs to customer {owner!r}"] = None

    moves = document.migration
    for local in moves.local_filesystems:
        if (vm := look.find(Vm, local.old_vm)) is not None:
            owned(f"old VM {local.old_vm!r}", vm.customer)
    for shared in moves.shared_filesystems:
        if (env := look.find(Environment, shared.old_environment)) is not None:
            owned(f"old environment {shared.old_environment!r}", env.customer)
            for fs in env.shared_filesystems:
                if fs.mountpoint == shared.mountpoint:
                    owned(f"shared filesystem {shared.mountpoint!r} of old environment "
                          f"{shared.old_environment!r}", fs.customer)
    for move in moves.databases:
        for server_name in (move.old_master, move.old_replica):
            if (server := look.find(DatabaseServer, server_name)) is None:
                continue
            owned(f"database server {server_name!r}", server.customer)
            if (database := server.databases.get(move.name)) is not None:
                owned(f"database {move.name!r} on {server_name!r}", database.customer)
    for equivalence in moves.ip_equivalences:
        if (ip := look.find(PublicIp, equivalence.old_ip)) is not None:
            owned(f"old public IP {equivalence.old_ip!r}", ip.customer)
    return list(problems)


def plan_archives(document: MigrationDocument, inventory: Inventory,
                  migration_id: str) -> Plan:
    """Every archive `document` needs, in document order (local filesystems first).

    Raises NotOwnedError naming every old entity that is not the document's customer's (and
    its owner), UnknownEntityError naming an old VM / environment / database / server /
    public IP the inventory lacks, PlanningError or InventoryInvalidError when they
    contradict each other, TransientError when the inventory cannot be reached.
    """
    planner = _Planner(migration_id, inventory)
    if problems := ownership_problems(document, planner.look):
        raise NotOwnedError(f"customer {document.customer.id!r} may move only what it owns: "
                            + "; ".join(problems))
    moves = document.migration
    for local in moves.local_filesystems:
        planner.local_filesystems(local.old_vm)
    for shared in moves.shared_filesystems:
        planner.shared_filesystem(shared.old_environment, shared.mountpoint)
    engines = {group.duid: group.engine for group in document.database_groups}
    replicas: dict[str, DatabaseServer] = {}
    for database in moves.databases:
        replicas[database.old_replica] = planner.database(
            database, engines[database.new_database_group])
    for name, replica in replicas.items():
        planner.server_root(name, replica)
    for equivalence in moves.ip_equivalences:
        planner.public_ip(equivalence.old_ip)
    return Plan(tuple(planner.jobs), tuple(planner.snapshots), tuple(planner.archives))
