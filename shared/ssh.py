"""SSH hosts: paramiko, known host keys only, one reused connection per host, local tunnels.

`SSHHost` implements `shared.hosts.Host`: the remote command line is
`bash -o pipefail -c '<shlex.join(argv)>'`, quoted again for the remote login shell.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import threading
from collections.abc import Callable, Collection, Iterable, Mapping
from pathlib import Path
from typing import NoReturn

import paramiko
from pydantic import BaseModel, ConfigDict

from shared.errors import (
    CommandTimedOut,
    ConfigurationError,
    HostKeyError,
    HostUnreachableError,
    PermanentError,
)
from shared.hosts import (
    CommandRunner,
    Deadline,
    Result,
    Sink,
    command_line,
    drain_output,
    feed_stdin,
    finish,
)

log = logging.getLogger(__name__)

# GCM first: measured 425-440 MB/s in paramiko against 322 for its default aes128-ctr
PREFERRED_CIPHERS = (
    "aes128-gcm@openssh.com",
    "aes256-gcm@openssh.com",
    "aes128-ctr",
    "aes192-ctr",
    "aes256-ctr",
)
# paramiko's own rekey after 512 MiB deadlocks long streams (paramiko issue #822: "Key-exchange
# timed out"); never start one from our side. The server still rekeys, and that works.
NEVER_REKEY = 2**62
REMOTE_GRACE = 1.0  # the remote `timeout` fires this long after ours, as a reaper

_Sock = str | tuple[str, int] | socket.socket | paramiko.Channel | paramiko.ProxyCommand


class HostAuthenticationError(PermanentError):
    """The host refused our key: a configuration problem, retrying cannot help."""


class SSHConfig(BaseModel):
    """How to reach one host over SSH: key authentication, host key from known_hosts."""

    model_config = ConfigDict(frozen=True)

    host: str
    port: int = 22
    user: str
    key_path: Path
    known_hosts_path: Path
    connect_timeout: float = 10
    keepalive_interval: int = 15
    ciphers: tuple[str, ...] = PREFERRED_CIPHERS

    @property
    def address(self) -> str:
        """`host:port`, for messages."""
        return f"{self.host}:{self.port}"


class _RefuseUnknownHostKey(paramiko.RejectPolicy):
    """RejectPolicy with an error that says what to fix: keys are never auto-added."""

    def __init__(self, config: SSHConfig) -> None:
        self._config = config

    def missing_host_key(
        self, client: paramiko.SSHClient, hostname: str, key: paramiko.PKey
    ) -> NoReturn:
        raise HostKeyError(
            f"{self._config.address}: host key unknown ({key.get_name()} {key.fingerprint}): "
            f"no entry for {hostname} in {self._config.known_hosts_path}; refusing to connect"
        )


class SSHHost(CommandRunner):
    """Runs commands on one host over one lazily opened, reused SSH connection.

    Each command gets its own channel, so threads may run commands at the same time. A dead
    connection is replaced on the next command.

    Closing an SSH channel does not kill what it started: a command we stop reading (a sink
    raised) dies of SIGPIPE at its next write; with a timeout, the remote command also runs
    under coreutils `timeout`, which kills its process group even if the connection is gone.
    """

    def __init__(self, config: SSHConfig, name: str | None = None) -> None:
        self.config = config
        self.name = name or config.address
        self._client: paramiko.SSHClient | None = None
        self._lock = threading.Lock()
        self._tunnels: list[_Tunnel] = []
        # False on a host whose `timeout` has no --kill-after (coreutils < 7.5, busybox): a
        # timed-out command is then stopped only by closing its channel (SIGPIPE at its next
        # write), not reaped on the host; the local deadline still holds
        self.remote_reaper = True

    def transport(self) -> paramiko.Transport:
        """The live connection, opened (or reopened) if needed.

        Raises HostKeyError (host key unknown or changed), HostAuthenticationError,
        HostUnreachableError (refused, timed out, reset, SSH handshake failed),
        ConfigurationError (unreadable key or known_hosts, no usable cipher).
        """
        return self._live_transport(broken=None)

    def _live_transport(self, broken: paramiko.Transport | None) -> paramiko.Transport:
        with self._lock:
            transport = self._client.get_transport() if self._client else None
            if transport is None or transport is broken or not transport.is_active():
                if self._client is not None:
                    self._client.close()
                self._client = None
                self._client = self._connect()
                transport = self._client.get_transport()
            assert transport is not None  # noqa: S101 (connect() succeeded)
            return transport

    def _channel(
        self, open_on: Callable[[paramiko.Transport], paramiko.Channel]
    ) -> tuple[paramiko.Transport, paramiko.Channel]:
        """A new channel. A connection found broken on the way (the server restarted, it
        only looked alive) is replaced once: no command has started on it yet."""
        transport = self.transport()
        try:
            return transport, open_on(transport)
        except paramiko.ChannelException as exc:  # refused on a healthy connection: keep it
            raise HostUnreachableError(f"{self.name}: channel refused: {exc}") from exc
        except (paramiko.SSHException, OSError, EOFError):
            transport = self._live_transport(broken=transport)
        try:
            return transport, open_on(transport)
        except (paramiko.SSHException, OSError, EOFError) as exc:
            raise HostUnreachableError(f"{self.name}: cannot open a channel: {exc!r}") from exc

    def _connect(self) -> paramiko.SSHClient:
        cfg = self.config
        try:
            key = paramiko.PKey.from_path(cfg.key_path)
        except (OSError, paramiko.SSHException) as exc:
            raise ConfigurationError(f"{self.name}: cannot load key {cfg.key_path}: {exc}") from exc
        client = paramiko.SSHClient()
        try:
            client.load_host_keys(str(cfg.known_hosts_path))
        except OSError as exc:
            raise ConfigurationError(f"{self.name}: cannot read known_hosts: {exc}") from exc
        client.set_missing_host_key_policy(_RefuseUnknownHostKey(cfg))
        try:
            try:
                client.connect(
                    cfg.host, port=cfg.port, username=cfg.user, pkey=key,
                    allow_agent=False, look_for_keys=False,
                    timeout=cfg.connect_timeout, banner_timeout=cfg.connect_timeout,
                    auth_timeout=cfg.connect_timeout, channel_timeout=cfg.connect_timeout,
                    transport_factory=self._new_transport,
                )  # fmt: skip
            except paramiko.BadHostKeyException as exc:
                raise HostKeyError(
                    f"{cfg.address}: host key CHANGED: server offered {exc.key.get_name()} "
                    f"{exc.key.fingerprint}, {cfg.known_hosts_path} has "
                    f"{exc.expected_key.fingerprint}; refusing to connect"
                ) from exc
            except paramiko.AuthenticationException as exc:
                raise HostAuthenticationError(
                    f"{self.name}: {cfg.user} with key {cfg.key_path} refused: {exc}"
                ) from exc
            except (paramiko.SSHException, OSError, EOFError) as exc:
                raise HostUnreachableError(f"{self.name}: cannot connect: {exc!r}") from exc
        except BaseException:
            client.close()
            raise
        transport = client.get_transport()
        assert transport is not None  # noqa: S101 (connected)
        transport.set_keepalive(cfg.keepalive_interval)
        return client

    def _new_transport(
        self,
        sock: _Sock,
        /,
        *,
        gss_kex: bool = False,
        gss_deleg_creds: bool = True,
        disabled_algorithms: Mapping[str, Iterable[str]] | None = None,
    ) -> paramiko.Transport:
        # the gss_* arguments are in the stubs' factory signature; paramiko 5 never passes them
        transport = paramiko.Transport(sock, disabled_algorithms=disabled_algorithms)
        options = transport.get_security_options()
        ciphers = [c for c in self.config.ciphers if c in options.ciphers]
        if not ciphers:
            raise ConfigurationError(
                f"{self.name}: paramiko supports none of {self.config.ciphers}"
            )
        options.ciphers = ciphers
        # per transport (instance attributes shadow the class's): see NEVER_REKEY
        transport.packetizer.REKEY_BYTES = NEVER_REKEY
        transport.packetizer.REKEY_PACKETS = NEVER_REKEY
        return transport

    def _run(
        self,
        script: str,
        argv: list[str],
        timeout: float | None,
        sink: Sink | None,
        ok_exits: Collection[int],
        stdin: bytes | None,
    ) -> Result:
        remote = ["bash", "-o", "pipefail", "-c", script]
        if timeout is not None and self.remote_reaper:
            remote = ["timeout", "--kill-after=2", f"{timeout + REMOTE_GRACE:.3f}", *remote]
        transport, channel = self._channel(
            lambda t: t.open_session(timeout=self.config.connect_timeout)
        )
        with channel:
            try:
                channel.exec_command(command_line(remote))
            except (paramiko.SSHException, OSError, EOFError) as exc:
                raise HostUnreachableError(f"{self.name}: cannot start: {exc!r}") from exc
            if stdin is None:
                channel.shutdown_write()
            else:
                feed_stdin(channel.sendall, channel.shutdown_write, stdin)
            deadline = Deadline(timeout, channel.close)
            try:
                stdout, tail = drain_output(channel.recv, channel.recv_stderr, sink, channel.close)
                exited = channel.recv_exit_status()
            finally:
                deadline.cancel()
        if deadline.expired:
            raise CommandTimedOut(f"{self.name}: timed out after {timeout}s, stopped: {script}")
        if exited == -1 and not transport.is_active():
            raise HostUnreachableError(f"{self.name}: connection lost while running: {script}")
        return finish(self.name, argv, exited, stdout, tail, ok_exits)

    def open_tunnel(self, remote_host: str, remote_port: int) -> tuple[int, Callable[[], None]]:
        """Listen on 127.0.0.1:<free port> and forward each connection to
        remote_host:remote_port as the SSH server sees it. Returns (local port, closer).

        Raises the errors of `transport()`; a forward the server refuses just closes that
        local connection.
        """
        self.transport()  # fail now, not at the first local connection
        tunnel = _Tunnel(self, (remote_host, remote_port))
        with self._lock:
            self._tunnels.append(tunnel)
        return tunnel.port, tunnel.close

    def close(self) -> None:
        """Close tunnels and the connection; the next command reconnects. Raises nothing."""
        with self._lock:
            tunnels, self._tunnels = self._tunnels, []
            client, self._client = self._client, None
        for tunnel in tunnels:
            tunnel.close()
        if client is not None:
            client.close()


class _Tunnel:
    """A local listener whose connections each get a direct-tcpip channel and a pump thread
    (plus one for the other direction: a single thread can deadlock when both sides send)."""

    def __init__(self, host: SSHHost, remote: tuple[str, int]) -> None:
        self._host = host
        self._remote = remote
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port: int = self._listener.getsockname()[1]
        self._pairs: set[tuple[socket.socket, paramiko.Channel]] = set()
        self._lock = threading.Lock()
        self._closed = False
        threading.Thread(target=self._accept, name=f"tunnel-{self.port}", daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, peer = self._listener.accept()
            except OSError:
                return  # listener closed
            threading.Thread(target=self._forward, args=(conn, peer), daemon=True).start()

    def _forward(self, conn: socket.socket, peer: tuple[str, int]) -> None:
        timeout = self._host.config.connect_timeout
        try:
            _, channel = self._host._channel(
                lambda t: t.open_channel("direct-tcpip", self._remote, peer, timeout=timeout)
            )
        except Exception as exc:  # noqa: BLE001 (any failure: drop this one connection)
            log.warning("%s: tunnel to %s refused: %r", self._host.name, self._remote, exc)
            conn.close()
            return
        pair = (conn, channel)
        with self._lock:
            if not self._closed:
                self._pairs.add(pair)
        if self._closed:
            _close_both(*pair)
            return
        upstream = threading.Thread(
            target=_copy, args=(conn.recv, channel.sendall, channel.shutdown_write, pair)
        )
        upstream.start()
        _copy(channel.recv, conn.sendall, lambda: conn.shutdown(socket.SHUT_WR), pair)
        upstream.join()
        with self._lock:
            self._pairs.discard(pair)
        _close_both(*pair)

    def close(self) -> None:
        with self._lock:
            self._closed = True
            pairs, self._pairs = self._pairs, set()
        with contextlib.suppress(OSError):
            self._listener.shutdown(socket.SHUT_RDWR)  # wakes accept(); close() alone does not
        self._listener.close()
        for pair in pairs:
            _close_both(*pair)


def _copy(
    recv: Callable[[int], bytes],
    send: Callable[[bytes], object],
    eof: Callable[[], object],
    pair: tuple[socket.socket, paramiko.Channel],
) -> None:
    """Copy one direction until EOF, then pass the EOF on (half-close). On an error, close
    both ends so the other direction's thread wakes up too."""
    try:
        while data := recv(1 << 16):
            send(data)
        eof()
    except (OSError, EOFError, paramiko.SSHException):
        _close_both(*pair)


def _close_both(conn: socket.socket, channel: paramiko.Channel) -> None:
    with contextlib.suppress(OSError):
        conn.shutdown(socket.SHUT_RDWR)  # wakes a recv() blocked in another thread
    conn.close()
    channel.close()
