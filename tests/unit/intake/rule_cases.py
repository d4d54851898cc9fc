"""Small invalid documents that break the rules made linear in issue 12, built from the
example; `rules_before_linear.json` holds the errors the quadratic code reported for them."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

EXAMPLE_PATH = Path(__file__).resolve().parents[3] / "examples" / "migration.json"
EXPECTED_PATH = Path(__file__).with_name("rules_before_linear.json")


def _fs(mountpoint: str) -> dict[str, Any]:
    return {"size_gib": 10, "filesystems": [
        {"mountpoint": mountpoint, "size_gib": 5, "fs_type": "ext4"}]}


def semantic_case() -> dict[str, Any]:
    """Wrong shared-filesystem moves of every kind, and environments that disagree with
    their VMs about who is a member."""
    d: dict[str, Any] = json.loads(EXAMPLE_PATH.read_text())
    env_1, env_2 = d["environments"]
    env_1["vms"] += ["vm_1", "vm_9", "vm_5"]  # twice; undeclared; another env's VM
    d["vms"][1]["disks"].append(_fs("/data"))  # vm_2: /data held twice in env_1
    d["vms"][4]["disks"].append(_fs("/srv"))  # vm_5: /srv held once in env_2
    d["vms"][3]["environment"] = "env_2"  # vm_4 says env_2, which does not list it
    extra = copy.deepcopy(d["vms"][5])
    extra["disks"].append(_fs("/srv"))
    d["vms"].append(extra)  # vm_6 declared twice; the second copy also holds /srv
    moves = d["migration"]["shared_filesystems"]
    moves += [
        {"old_environment": "ey04-e00076", "mountpoint": "/nowhere", "new_environment": "env_1"},
        {"old_environment": "ey04-e00075", "mountpoint": "/data", "new_environment": "env_1"},
        {"old_environment": "ey04-e00077", "mountpoint": "/var/lib/mysql",
         "new_environment": "env_2"},
        {"old_environment": "ey04-e00078", "mountpoint": "/srv", "new_environment": "env_2"},
        {"old_environment": "ey04-e00079", "mountpoint": "/srv", "new_environment": "env_2"},
        {"old_environment": "ey04-e00080", "mountpoint": "/", "new_environment": "env_1"},
        {"old_environment": "ey04-e00081", "mountpoint": "/data", "new_environment": "vm_1"},
        {"old_environment": "ey04-e00082", "mountpoint": "/data", "new_environment": "env_9"},
    ]
    return d


def structural_case() -> dict[str, Any]:
    """Arrays too short on their own and because their only item is wrong."""
    d: dict[str, Any] = json.loads(EXAMPLE_PATH.read_text())
    d["vms"][0]["disks"] = []
    d["vms"][1]["disks"][0]["size_gib"] = 0
    d["vms"][2]["disks"] = [{"size_gib": 1}]
    d["public_ips"][0]["port_mappings"][0]["vms"] = []
    d["public_ips"][0]["port_mappings"][1]["vms"] = ["VM 1"]
    d["vms"][3]["disks"] = [{"size_gib": 1, "filesystems": []}, 7]
    return d


def errors_by_case() -> dict[str, list[dict[str, str]]]:
    """Each case's errors as `validate_document` reports them, in order."""
    from shared.document import DocumentInvalidError, validate_document

    found: dict[str, list[dict[str, str]]] = {}
    for name, build in (("semantic", semantic_case), ("structural", structural_case)):
        try:
            validate_document(build())
        except DocumentInvalidError as invalid:
            found[name] = [e.model_dump() for e in invalid.errors]
        else:
            found[name] = []
    return found


if __name__ == "__main__":  # regenerate only from the code before a change
    EXPECTED_PATH.write_text(json.dumps(errors_by_case(), indent=2) + "\n")
