"""The inventory host `local` (this machine, no SSH) only where a setting allows it."""

from __future__ import annotations

import pytest

from shared.addresses import host_pool
from shared.errors import ConfigurationError
from shared.hosts import LocalExecutor
from shared.settings import Settings


def test_local_is_refused_by_default_naming_the_setting() -> None:
    assert Settings.model_fields["allow_local_hosts"].default is False
    with pytest.raises(ConfigurationError, match="FERRY_ALLOW_LOCAL_HOSTS"):
        host_pool(Settings(allow_local_hosts=False)).get("local")


def test_local_is_the_local_executor_when_allowed() -> None:
    assert isinstance(host_pool(Settings(allow_local_hosts=True)).get("local"), LocalExecutor)
