"""docker-compose.yml stays a valid deployment of the design (checked by docker-compose)."""

from __future__ import annotations

import os
import subprocess
import tomllib
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]


SERVICES = ("intake", "resolver", "snapshotter", "archiver", "transfer")
SECRETS = {"FERRY_API_TOKEN": "a-token-for-the-check", "FERRY_BROKER_ADMIN_PASSWORD": "admin",
           **{f"FERRY_{s.upper()}_BROKER_PASSWORD": f"pw-{s}" for s in SERVICES}}


def compose_config(**env: str) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if k not in SECRETS}
    return subprocess.run(["docker-compose", "-f", str(ROOT / "docker-compose.yml"), "config",
                           "-q"], capture_output=True, text=True, timeout=60,
                          env={**clean, **env})


def test_compose_file_is_accepted_by_docker_compose() -> None:
    done = compose_config(**SECRETS)
    assert done.returncode == 0, done.stderr


def test_compose_will_not_start_intake_without_a_token() -> None:
    done = compose_config(**{k: v for k, v in SECRETS.items() if k != "FERRY_API_TOKEN"})
    assert done.returncode != 0 and "FERRY_API_TOKEN" in done.stderr, done.stderr
    intake = yaml.safe_load((ROOT / "docker-compose.yml").read_text())["services"]["intake"]
    assert intake["environment"]["FERRY_API_TOKEN"].startswith("${FERRY_API_TOKEN:?")


def test_compose_runs_every_service_after_healthy_broker_and_database() -> None:
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    services = compose["services"]
    for name in ("intake", "resolver", "snapshotter"):
        assert services[name]["command"][:2] == ["run", name]
    archivers = [s for s in services.values() if s.get("command", [""])[:2] == ["run",
                                                                               "archiver"]]
    assert len(archivers) == 2
    assert len([s for s in services.values() if s.get("command", [""])[:2] == [
        "run", "transfer"]]) == 2
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


def _resolved() -> dict[str, Any]:
    done = subprocess.run(["docker-compose", "-f", str(ROOT / "docker-compose.yml"), "config"],
                          capture_output=True, text=True, timeout=60,
                          env={**os.environ, **SECRETS})
    assert done.returncode == 0, done.stderr
    return dict(yaml.safe_load(done.stdout)["services"])


@pytest.mark.parametrize("missing", [k for k in SECRETS if k != "FERRY_API_TOKEN"])
def test_compose_will_not_start_without_each_broker_password(missing: str) -> None:
    done = compose_config(**{k: v for k, v in SECRETS.items() if k != missing})
    assert done.returncode != 0 and missing in done.stderr, done.stderr


def test_each_service_connects_as_its_own_broker_user_and_sees_no_other() -> None:
    services = _resolved()
    ferry = {name: s for name, s in services.items() if s.get("command", [""])[0] == "run"}
    assert len(ferry) == 7, sorted(ferry)
    for name, service in ferry.items():
        own = service["command"][1]
        broker = {k: v for k, v in service["environment"].items() if "BROKER" in k}
        # only its own URL, with its own user and password: never the admin's FERRY_BROKER_URL
        assert broker == {f"FERRY_{own.upper()}_BROKER_URL":
                          f"amqp://ferry-{own}:pw-{own}@rabbitmq:5672/ferry"}, name
        assert service["depends_on"]["broker-setup"]["condition"] == (
            "service_completed_successfully"), name


def test_broker_setup_declares_every_archivers_datacenter_as_the_admin() -> None:
    services = _resolved()
    setup = services["broker-setup"]
    command = setup["command"]
    assert command[:2] == ["broker", "setup"]
    declared = {command[i + 1] for i, word in enumerate(command) if word == "--datacenter"}
    archivers = {s["command"][s["command"].index("--datacenter") + 1]
                 for s in services.values() if s.get("command", [""])[:2] == ["run", "archiver"]}
    transfers = {s["command"][s["command"].index("--datacenter") + 1]
                 for s in services.values() if s.get("command", [""])[:2] == ["run", "transfer"]}
    assert declared == archivers == transfers == {"ey04", "ey02"}
    assert setup["environment"]["FERRY_BROKER_URL"] == "amqp://ferry:admin@rabbitmq:5672/ferry"
    assert all(setup["environment"][f"FERRY_{s.upper()}_BROKER_PASSWORD"] == f"pw-{s}"
               for s in SERVICES)
    assert setup["depends_on"]["rabbitmq"]["condition"] == "service_healthy"


def _datacenter_of(service: dict[str, Any]) -> str | None:
    command = service.get("command", [])
    return command[command.index("--datacenter") + 1] if "--datacenter" in command else None


def _staging_volumes(service: dict[str, Any]) -> set[tuple[str, str]]:
    """(volume, where) of each volume a resolved service mounts under /staging (docker-compose
    v1 resolves them to `source:target:mode` strings, v2 to mappings)."""
    found = set()
    for volume in service.get("volumes", []):
        if isinstance(volume, str):
            source, target, *_ = volume.split(":")
        else:
            source, target = volume["source"], volume["target"]
        if target.startswith("/staging"):
            found.add((source, target))
    return found


def test_each_datacenter_is_one_archiving_host_group_sharing_only_its_own_staging() -> None:
    # Given the resolved deployment
    services = _resolved()
    groups: dict[str, set[str]] = {}
    for name, service in services.items():
        for volume, target in _staging_volumes(service):
            groups.setdefault(volume, set()).add(name)
            # mounted where the archiver writes and the transfer reads: <staging>/<dc>
            dc = volume.removeprefix("staging-")
            assert target == f"{service['environment']['FERRY_STAGING_DIR']}/{dc}", name
    # Then each datacenter's staging volume is mounted by its archivers and its transfer
    # worker, each serving that datacenter, on its archiving host, and by nothing else
    assert groups == {"staging-ey04": {"archiver-ey04", "transfer-ey04"},
                      "staging-ey02": {"archiver-ey02", "transfer-ey02"}}
    for volume, names in groups.items():
        dc = volume.removeprefix("staging-")
        for name in names:
            assert _datacenter_of(services[name]) == dc, name
            assert services[name]["labels"]["ferry.archiving-host"] == dc, name
    # and every archiver or transfer is in one group (none reads a shared staging)
    workers = {name for name, s in services.items()
               if s.get("command", ["", ""])[1:2] in (["archiver"], ["transfer"])}
    assert workers == set().union(*groups.values())


def test_every_ferry_service_serves_its_metrics_on_the_compose_network() -> None:
    services = _resolved()
    ferry = {name: s for name, s in services.items()
             if s.get("command", [""])[0:1] == ["run"]}
    assert {s["command"][1] for s in ferry.values()} >= {*SERVICES}
    for name, service in ferry.items():
        env = service["environment"]
        assert env.get("FERRY_METRICS_PORT") == "9464", name
        assert env.get("FERRY_METRICS_BIND") == "0.0.0.0", name  # noqa: S104 - inside the container
        assert "9464" not in str(service.get("ports", "")), name  # not published on the host
