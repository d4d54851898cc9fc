"""docker-compose.yml stays a valid deployment of the design (checked by docker-compose)."""

from __future__ import annotations

import os
import subprocess
import tomllib
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]


def compose_config(**env: str) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if k != "FERRY_API_TOKEN"}
    return subprocess.run(["docker-compose", "-f", str(ROOT / "docker-compose.yml"), "config",
                           "-q"], capture_output=True, text=True, timeout=60,
                          env={**clean, **env})


def test_compose_file_is_accepted_by_docker_compose() -> None:
    done = compose_config(FERRY_API_TOKEN="a-token-for-the-check")
    assert done.returncode == 0, done.stderr


def test_compose_will_not_start_intake_without_a_token() -> None:
    done = compose_config()
    assert done.returncode != 0 and "FERRY_API_TOKEN" in done.stderr, done.stderr
    intake = yaml.safe_load((ROOT / "docker-compose.yml").read_text())["services"]["intake"]
    assert intake["environment"]["FERRY_API_TOKEN"].startswith("${FERRY_API_TOKEN:?")


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


def test_the_image_holds_every_package_the_project_installs() -> None:
    # Given the packages pyproject.toml installs (ferry*, shared*, services*)
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    packages = [p.rstrip("*") for p in pyproject["tool"]["setuptools"]["packages"]["find"]
                ["include"]]
    # Then the Dockerfile copies each before `pip install .`, and the entry point is ferry's
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert all(f"COPY {p} ./{p}\n" in dockerfile for p in packages), packages
    assert pyproject["project"]["scripts"]["ferry"] == "ferry.cli:main"
    assert 'ENTRYPOINT ["ferry"]' in dockerfile
