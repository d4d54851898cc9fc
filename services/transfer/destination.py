"""Where archives go: `[user@]host[:port]:/path` over SSH, or a local directory.

Each archive lands at `<root>/<migration id>/<file name>`. Both names come from events, so
they are checked against a narrow alphabet here: no separator, no `..`, no leading `-`.
"""

from __future__ import annotations

import posixpath
import re
from dataclasses import dataclass
from pathlib import Path

from services.transfer import rsync
from shared.addresses import parse_address
from shared.errors import ConfigurationError, PermanentError
from shared.hosts import Host, LocalExecutor
from shared.settings import Settings
from shared.ssh import SSHConfig, SSHHost

_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9._+=@,-]{0,199}$")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


class UnsafeNameError(PermanentError):
    """A migration id or archive file name that cannot be a path component."""


def safe_component(value: str, what: str) -> str:
    """`value` if it is one plain path component. Raises UnsafeNameError naming `what`."""
    if not _NAME.match(value) or value in {".", ".."}:
        raise UnsafeNameError(
            f"{what} {value!r} cannot name a file at the destination: use letters, digits and "
            "._+=@,- only, not starting with . or -, at most 200 characters")
    return value


@dataclass(frozen=True)
class Destination:
    """A parsed FERRY_DESTINATION. `text` is how jobs record it (and the parallel-limit key)."""

    text: str
    root: str
    host: str | None = None  # None: a local directory
    user: str | None = None
    port: int = 22

    @property
    def is_local(self) -> bool:
        return self.host is None

    @property
    def _login(self) -> str:
        """`user@host`, an IPv6 host in brackets (remote destinations only)."""
        host = f"[{self.host}]" if self.host is not None and ":" in self.host else self.host
        return f"{self.user}@{host}"

    @property
    def address(self) -> str:
        """`user@host:port` for the host layer and messages; `local` for a directory."""
        return "local" if self.host is None else f"{self._login}:{self.port}"

    def file_path(self, migration_id: str, file_name: str) -> str:
        """The archive's absolute path at the destination. Raises UnsafeNameError."""
        return posixpath.join(self.root, safe_component(migration_id, "migration id"),
                              safe_component(file_name, "archive file name"))

    def rsync_target(self, path: str) -> str:
        """rsync's destination argument for `path`: `user@host:path`, or the path itself."""
        return path if self.host is None else f"{self._login}:{path}"


def parse_destination(text: str | None, settings: Settings) -> Destination:
    """FERRY_DESTINATION as a Destination; unset means `<state_dir>/destination`.

    Raises ConfigurationError for a malformed address or a relative remote path.
    """
    if text is None or not text.strip():
        root = (settings.state_dir / "destination").resolve()
        return Destination(text=str(root), root=str(root))
    if _CONTROL.search(text):
        raise ConfigurationError(f"FERRY_DESTINATION {text!r} contains control characters")
    address, separator, remote = text.partition(":/")
    if not separator and re.match(r"^[^/]*:", text):
        raise ConfigurationError(
            f"FERRY_DESTINATION {text!r}: the remote path must be absolute "
            "([user@]host[:port]:/path)")
    if not separator or "/" in address:  # no `host:` before the path: a local directory
        root = Path(text).expanduser().resolve()
        return Destination(text=str(root), root=str(root))
    remote_root = posixpath.normpath("/" + remote)
    user, host, port = parse_address(address)  # raises ConfigurationError, naming it
    return Destination(text=text, root=remote_root, host=host, user=user or settings.ssh_user,
                       port=port)


def ssh_identity(settings: Settings) -> tuple[Path, Path]:
    """(key, known_hosts) for the destination: its own settings, else the FERRY_SSH_* ones.

    Raises ConfigurationError when either is missing.
    """
    key = settings.destination_ssh_key_path or settings.ssh_key_path
    known_hosts = settings.destination_known_hosts_path or settings.ssh_known_hosts_path
    if key is None or known_hosts is None:
        raise ConfigurationError(
            "a remote FERRY_DESTINATION needs an SSH key and a known_hosts file: set "
            "FERRY_DESTINATION_SSH_KEY_PATH and FERRY_DESTINATION_KNOWN_HOSTS_PATH (or "
            "FERRY_SSH_KEY_PATH and FERRY_SSH_KNOWN_HOSTS_PATH)")
    return key, known_hosts


def rsync_argv_to(destination: Destination, source: Path, remote: str, settings: Settings, *,
                  append: bool = True) -> list[str]:
    """The rsync argv that sends `source` to `remote` at the destination (over SSH with its
    identity, or a local path), with the transfer's timeout and bandwidth limit; `append`
    as rsync.rsync_argv. Raises ConfigurationError (see ssh_identity)."""
    ssh = None
    if not destination.is_local:
        key, known_hosts = ssh_identity(settings)
        ssh = rsync.ssh_command(key=key, known_hosts=known_hosts, port=destination.port,
                                connect_timeout=settings.ssh_connect_timeout)
    return rsync.rsync_argv(source, destination.rsync_target(remote), ssh=ssh,
                            timeout_seconds=settings.transfer_timeout_seconds,
                            bwlimit_kbps=settings.transfer_bwlimit_kbps, append=append)


def open_host(destination: Destination, settings: Settings) -> Host:
    """The host layer's view of the destination: SSH (known host keys only) or this machine.

    Raises ConfigurationError (see ssh_identity).
    """
    if destination.host is None:
        return LocalExecutor()
    key, known_hosts = ssh_identity(settings)
    assert destination.user is not None  # noqa: S101 (parse_destination always sets it)
    return SSHHost(SSHConfig(host=destination.host, port=destination.port, user=destination.user,
                             key_path=key, known_hosts_path=known_hosts,
                             connect_timeout=settings.ssh_connect_timeout),
                   name=destination.address)
