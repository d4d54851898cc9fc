"""Documents and settings the resolver's tests share: the example, and variants of it."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[3]
EXAMPLE = json.loads((ROOT / "examples" / "migration.json").read_text())
INVENTORY = ROOT / "examples" / "inventory.yaml"


def example_document(customer: str = "cust-1042", public_ips: int = 1,
                     **migration: Any) -> dict[str, Any]:
    """The seed's example for `customer`, with `public_ips` public IPs (the extra ones carry
    no mapping) and any `migration` section replaced."""
    document = copy.deepcopy(EXAMPLE)
    document["customer"]["id"] = customer
    for n in range(2, public_ips + 1):
        document["public_ips"].append({"duid": f"ip_{n}", "port_mappings": []})
    if public_ips == 0:
        document["public_ips"] = []
        document["migration"]["ip_equivalences"] = []
    document["migration"].update(migration)
    return document
