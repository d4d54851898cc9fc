"""Intake never serves its API open by accident: without a token it refuses to start,
unless told --insecure-no-auth, and then only on a loopback address."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest

from ferry.loopback_sshd import free_port
from services.intake.bootstrap import bootstrap
from shared.errors import ConfigurationError
from shared.settings import Settings
from tests.support.processes import run_ferry


def settings(tmp_path: Path, **values: object) -> Settings:
    return Settings(broker_url="memory://", state_dir=tmp_path, outbox_relay=False,
                    **values)  # type: ignore[arg-type]


def test_intake_without_a_token_refuses_to_start_naming_the_setting(tmp_path: Path) -> None:
    with pytest.raises(ConfigurationError, match="FERRY_API_TOKEN is not set"):
        bootstrap(settings(tmp_path, intake_bind=f"127.0.0.1:{free_port()}"))


def test_insecure_no_auth_is_refused_on_an_address_other_machines_reach(tmp_path: Path) -> None:
    with pytest.raises(ConfigurationError, match="only on a loopback address"):
        bootstrap(settings(tmp_path, insecure_no_auth=True, intake_bind="0.0.0.0:8080"))  # noqa: S104


def test_insecure_no_auth_on_loopback_serves_without_a_token(tmp_path: Path) -> None:
    bind = f"127.0.0.1:{free_port()}"
    service = bootstrap(settings(tmp_path, insecure_no_auth=True, intake_bind=bind))
    service.start()
    try:
        assert httpx.get(f"http://{bind}/migrations", timeout=5).status_code == 200
    finally:
        service.stop()


def test_a_token_is_demanded_when_set(tmp_path: Path) -> None:
    # the control: with a token nothing is refused, and requests without it are
    bind = f"127.0.0.1:{free_port()}"
    service = bootstrap(settings(tmp_path, api_token="a-token-of-ours", intake_bind=bind))
    service.start()
    try:
        assert httpx.get(f"http://{bind}/migrations", timeout=5).status_code == 401
    finally:
        service.stop()


def test_ferry_run_intake_without_a_token_exits_with_a_clear_error(tmp_path: Path) -> None:
    done = run_ferry("run", "intake", env={
        "FERRY_BROKER_URL": "memory://", "FERRY_STATE_DIR": str(tmp_path),
        "FERRY_INTAKE_BIND": f"127.0.0.1:{free_port()}", "FERRY_API_TOKEN": ""}, timeout=60)
    assert done.returncode != 0
    assert "FERRY_API_TOKEN is not set" in done.stdout + done.stderr
