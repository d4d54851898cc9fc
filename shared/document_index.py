"""What the document's rules look up, each built once: the VMs and environments by duid,
the VMs each environment lists, where each VM has filesystems, and which VMs hold each
mountpoint a shared-filesystem move asks for. A lookup here is a dict or set access, so
the rules stay linear in the document's size."""

from __future__ import annotations

from shared.document_schema import Environment, MigrationDocument, Vm


class DocumentIndex:
    """Lookups over one structurally valid document; `vms` and `environments` are filled by
    whoever declares them (the rules: the first of a duid wins)."""

    def __init__(self, document: MigrationDocument) -> None:
        self.document = document
        self.vms: dict[str, Vm] = {}
        self.environments: dict[str, Environment] = {}
        self._members: dict[str, frozenset[str]] = {}
        self._mountpoints: dict[str, frozenset[str]] = {}

    def members_of(self, environment: str) -> frozenset[str]:
        """The VMs an environment lists, as a set (made once per environment)."""
        found = self._members.get(environment)
        if found is None:
            found = self._members[environment] = frozenset(self.environments[environment].vms)
        return found

    def mountpoints_of(self, vm_duid: str) -> frozenset[str]:
        """Where a VM has filesystems, as a set (made once per VM)."""
        found = self._mountpoints.get(vm_duid)
        if found is None:
            found = self._mountpoints[vm_duid] = frozenset({
                filesystem.mountpoint
                for disk in self.vms[vm_duid].disks
                for filesystem in disk.filesystems
            })
        return found

    def holders(self) -> dict[tuple[str, str], list[str]]:
        """For every (environment, mountpoint) a shared-filesystem move asks for, the VMs
        that environment lists with a filesystem there, in its order (a VM listed twice
        counts once). Each listed VM is looked at once per environment asked for."""
        wanted: dict[str, set[str]] = {}
        for move in self.document.migration.shared_filesystems:
            if move.new_environment in self.environments:
                wanted.setdefault(move.new_environment, set()).add(move.mountpoint)
        holders: dict[tuple[str, str], list[str]] = {}
        for env, mountpoints in wanted.items():
            for vm_duid in dict.fromkeys(self.environments[env].vms):
                if vm_duid in self.vms:
                    for mountpoint in self.mountpoints_of(vm_duid) & mountpoints:
                        holders.setdefault((env, mountpoint), []).append(vm_duid)
        return holders
