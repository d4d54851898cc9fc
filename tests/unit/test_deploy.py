"""docker-compose.yml stays a valid deployment of the design (checked by docker-compose)."""

from __future__ import annotations

import subprocess
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]


def test_compose_file_is_accepted_by_docker_compose() -> None:
    done = subprocess.run(["docker-compose", "-f", str(ROOT / "docker-compose.yml"), "config",
                           "-q"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr


def test_compose_runs_every_service_after_healthy_broker_and_database() -> None:
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    services = compose["services"]
    for name in ("intake", "resolver", "snapshotter", "transfer"):
        assert services[name]["command"][:2] == ["run", name]
    archivers = [s for s in services.values() if s.get("command", [""])[:2] == ["run",
                                                                               "archiver"]]
    assert len(archivers) == 2
    for name in ("rabbitmq", "postgres"):
        assert "healthcheck" in services[name]
    for service in (*archivers, services["resolver"]):
        assert service["depends_on"]["rabbitmq"]["condition"] == "service_healthy"
