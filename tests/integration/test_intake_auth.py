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


@pytest.mark.parametrize("values, status", [
    ({"insecure_no_auth": True}, 200),  # told so, on loopback: served without a token
    ({"api_token": "a-token-of-ours"}, 401),  # the control: a token set is demanded
])
def test_the_api_is_open_only_when_told_so(tmp_path: Path, values: dict[str, object],
                                           status: int) -> None:
    bind = f"127.0.0.1:{free_port()}"
    service = bootstrap(settings(tmp_path, intake_bind=bind, **values))
    service.start()
    try:
        assert httpx.get(f"http://{bind}/migrations", timeout=5).status_code == status
    finally:
        service.stop()


def test_ferry_run_intake_without_a_token_exits_with_a_clear_error(tmp_path: Path) -> None:
    done = run_ferry("run", "intake", env={
        "FERRY_BROKER_URL": "memory://", "FERRY_STATE_DIR": str(tmp_path),
        "FERRY_INTAKE_BIND": f"127.0.0.1:{free_port()}", "FERRY_API_TOKEN": ""}, timeout=60)
    assert done.returncode != 0
    assert "FERRY_API_TOKEN is not set" in done.stdout + done.stderr
