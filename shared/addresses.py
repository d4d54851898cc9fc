"""From an inventory address to a `Host`: `local`, `host`, `host:port` or `user@host:port`.

Connections are pooled per address for the life of the process.
"""

from __future__ import annotations

import re

from shared.errors import ConfigurationError
from shared.hosts import Host, HostPool, LocalExecutor
from shared.settings import Settings

_ADDRESS = re.compile(
    r"^(?:(?P<user>[a-z_][a-z0-9_-]{0,31})@)?(?P<host>[A-Za-z0-9.-]{1,253}|\[[0-9a-fA-F:]+\])"
    r"(?::(?P<port>[0-9]{1,5}))?$"
)


def parse_address(address: str) -> tuple[str | None, str, int]:
    """(user or None, host, port). Raises ConfigurationError for anything else."""
    match = _ADDRESS.match(address)
    if not match or not 0 < int(match["port"] or 22) < 65536:
        raise ConfigurationError(f"not a host address: {address!r} (want [user@]host[:port])")
    return match["user"], match["host"].strip("[]"), int(match["port"] or 22)


def host_pool(settings: Settings) -> HostPool:
    """A pool that opens `local` as a LocalExecutor (only with `allow_local_hosts`) and
    anything else over SSH.

    The pool's get() raises ConfigurationError for `local` when it is not allowed, and when
    SSH is needed but no key or known_hosts file is configured.
    """

    def open_host(address: str) -> Host:
        if address == "local":
            if not settings.allow_local_hosts:
                raise ConfigurationError(
                    "host 'local' is this machine itself, reached without SSH: allowed only "
                    "for the demo and tests (FERRY_ALLOW_LOCAL_HOSTS=true); name the host's "
                    "SSH address in the inventory")
            return LocalExecutor()
        from shared.ssh import SSHConfig, SSHHost

        if settings.ssh_key_path is None or settings.ssh_known_hosts_path is None:
            raise ConfigurationError(
                f"{address}: set FERRY_SSH_KEY_PATH and FERRY_SSH_KNOWN_HOSTS_PATH to reach "
                "hosts over SSH")
        user, host, port = parse_address(address)
        return SSHHost(SSHConfig(host=host, port=port, user=user or settings.ssh_user,
                                 key_path=settings.ssh_key_path,
                                 known_hosts_path=settings.ssh_known_hosts_path,
                                 connect_timeout=settings.ssh_connect_timeout), name=address)

    return HostPool(open_host)
