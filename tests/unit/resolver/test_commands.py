"""`ferry inventory check`: a usable inventory passes and shows a document's jobs; dangling
names fail it."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from rich.console import Console

from ferry.cli import main
from services.resolver import commands
from tests.unit.resolver.documents import INVENTORY, ROOT


@pytest.fixture(autouse=True)
def wide_console(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(commands, "console", Console(width=200))


def test_check_shows_the_jobs_a_document_would_get(capsys: pytest.CaptureFixture[str]) -> None:
    status = main(["inventory", "check", str(INVENTORY), "--document",
                   str(ROOT / "examples" / "migration.json")])
    out = capsys.readouterr().out
    assert status == 0, out
    assert "7 archive jobs" in out and "db_server_root:ey04:mysql-mega-2-replica:/:scrub-" in out
    assert "is usable" in out


def _check_edited(tmp_path: Path, vm: str, **changes: str) -> int:
    """`ferry inventory check` on the example inventory with `changes` made to VM `vm`."""
    data = yaml.safe_load(INVENTORY.read_text())
    data["vms"][vm].update(changes)
    path = tmp_path / "inventory.yaml"
    path.write_text(yaml.safe_dump(data))
    return main(["inventory", "check", str(path)])


def test_check_fails_on_a_name_the_inventory_uses_but_lacks(
    tmp_path: Path, capsys: pytest.CaptureFixture[str],
) -> None:
    assert _check_edited(tmp_path, "ey04-s50002", xen_host="xen-ey04-99") == 1
    assert "VM 'ey04-s50002' names Xen host 'xen-ey04-99', which the inventory lacks" in (
        capsys.readouterr().out)


def test_check_fails_on_a_public_ip_forwarding_to_another_customers_vm(
    tmp_path: Path, capsys: pytest.CaptureFixture[str],
) -> None:
    # Given the example with one of the VMs behind cust-1042's old IP given to cust-2077
    # Then the check fails naming the address, the VM and both owners
    assert _check_edited(tmp_path, "ey04-s50001", customer="cust-2077") == 1
    assert ("public IP '203.0.113.10' of customer 'cust-1042' names VM 'ey04-s50001' of "
            "customer 'cust-2077'") in capsys.readouterr().out
