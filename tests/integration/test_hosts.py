"""The host layer against a real OpenSSH sshd on 127.0.0.1 and against this machine."""

from __future__ import annotations

import hashlib
import os
import secrets
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from shared.errors import (
    CommandTimedOut,
    HostKeyError,
    HostUnreachableError,
    PermanentError,
    UnexpectedExit,
)
from shared.hosts import Host, HostPool, LocalExecutor
from shared.ssh import HostAuthenticationError, SSHHost
from tests.support.helpers import wait_for
from tests.support.sshd import SshServer, free_port, generate_key

STREAM_BYTES = 300 << 20


@pytest.fixture(scope="module")
def server() -> Iterator[SshServer]:
    with SshServer() as sshd:
        yield sshd


@pytest.fixture
def ssh_host(server: SshServer) -> Iterator[SSHHost]:
    host = SSHHost(server.ssh_config())
    yield host
    host.close()


@pytest.fixture(params=["ssh", "local"])
def host(request: pytest.FixtureRequest, server: SshServer) -> Iterator[Host]:
    """Each behaviour both executors share is proved on both."""
    executor: Host = SSHHost(server.ssh_config()) if request.param == "ssh" else LocalExecutor()
    yield executor
    executor.close()


def running(marker: str) -> list[str]:
    found = subprocess.run(["pgrep", "-af", marker], capture_output=True, text=True)
    return found.stdout.splitlines()


def wait_until_gone(marker: str, within: float) -> list[str]:
    deadline = time.monotonic() + within
    while (left := running(marker)) and time.monotonic() < deadline:
        time.sleep(0.1)
    return left


# -- commands and exit statuses ---------------------------------------------------------


def test_command_output_and_exit_zero_come_back(host: Host) -> None:
    result = host.run(["printf", "%s\n", "hello world", "second"])

    assert result.ok and result.exited == 0
    assert result.stdout == b"hello world\nsecond\n"
    assert result.argv == ["printf", "%s\n", "hello world", "second"]
    assert result.host == host.name


def test_failing_command_raises_unexpected_exit_with_status_and_stderr_tail(host: Host) -> None:
    with pytest.raises(UnexpectedExit) as failure:
        host.run(["bash", "-c", "echo 'disk on fire' >&2; exit 3"])

    assert failure.value.exited == 3
    assert failure.value.stderr_tail == "disk on fire\n"
    assert failure.value.host == host.name
    assert isinstance(failure.value, PermanentError)


def test_listed_exit_status_is_accepted_but_not_ok(host: Host) -> None:
    result = host.run(["bash", "-c", "exit 1"], ok_exits=(0, 1))

    assert result.exited == 1
    assert not result.ok


def test_stdin_reaches_the_command(host: Host) -> None:
    payload = os.urandom(3 << 20)  # bigger than any pipe or SSH window

    result = host.run(["sha256sum"], stdin=payload)

    assert result.stdout.split()[0].decode() == hashlib.sha256(payload).hexdigest()


def test_pipeline_fails_when_an_early_stage_fails(host: Host) -> None:
    assert host.run_pipeline([["printf", "a\nb\n"], ["sort", "-r"]]).stdout == b"b\na\n"

    with pytest.raises(UnexpectedExit) as failure:
        host.run_pipeline([["bash", "-c", "exit 4"], ["cat"]])

    assert failure.value.exited == 4  # pipefail: cat's 0 does not hide it


# -- streaming --------------------------------------------------------------------------


def test_300_mib_stream_with_chatty_stderr_arrives_whole(host: Host) -> None:
    seen = 0
    digest = hashlib.sha256()

    def sink(chunk: bytes) -> None:
        nonlocal seen
        seen += len(chunk)
        digest.update(chunk)

    started = time.perf_counter()
    # 3.4 MB of stderr before stdout starts: more than a pipe or an SSH channel window holds,
    # so stdout would stall behind it if stderr were not drained at the same time
    result = host.run(
        [
            "bash",
            "-c",
            f"seq 1 500000 >&2; head -c {STREAM_BYTES} /dev/zero; seq 500001 600000 >&2",
        ],
        sink=sink,
        timeout=40,
    )
    elapsed = time.perf_counter() - started

    print(f"\n{host.name}: {STREAM_BYTES / elapsed / 1e6:.0f} MB/s into a sha256 sink")
    assert seen == STREAM_BYTES
    assert digest.digest() == hashlib.sha256(bytes(STREAM_BYTES)).digest()
    assert result.stdout == b""
    assert result.stderr_tail.endswith("599999\n600000\n")
    assert 32 << 10 < len(result.stderr_tail) <= 64 << 10  # a tail, not all 4 MB


# -- timeouts ---------------------------------------------------------------------------


def test_timeout_raises_and_stops_the_command_and_its_children(host: Host) -> None:
    marker = f"{secrets.randbelow(9000) + 1000}.{secrets.randbelow(10**6)}"  # a unique sleep
    started = time.monotonic()

    with pytest.raises(CommandTimedOut):
        host.run(["bash", "-c", f"sleep {marker} & sleep {marker}; wait"], timeout=1)

    assert time.monotonic() - started < 3
    assert wait_until_gone(marker, within=5) == []


def test_without_a_remote_reaper_the_local_deadline_still_stops_a_command(
        ssh_host: SSHHost) -> None:
    """An old host's `timeout` lacks --kill-after (services.archiver.probe): the wrapper is
    left out, and the deadline closes the channel; a command still writing dies of SIGPIPE."""
    marker = f"{secrets.randbelow(9000) + 1000}.{secrets.randbelow(10**6)}"
    ssh_host.remote_reaper = False
    started = time.monotonic()

    with pytest.raises(CommandTimedOut):
        ssh_host.run(["bash", "-c", "while :; do echo tick; sleep 0.1; done", marker],
                     timeout=1, sink=lambda chunk: None)

    assert time.monotonic() - started < 3
    assert wait_until_gone(marker, within=5) == []


# -- injection --------------------------------------------------------------------------


def test_arguments_never_reach_a_shell(host: Host) -> None:
    tag = secrets.token_hex(8)
    files = [Path(f"/tmp/pwned-{tag}"), Path(f"/tmp/pwned2-{tag}"), Path(f"/tmp/pwned3-{tag}")]
    crafted = [
        f"/data; touch {files[0]}",
        f"$(touch {files[1]})",
        f"`touch {files[2]}`' \"\\",
    ]

    result = host.run(["printf", "%s\n", *crafted])
    piped = host.run_pipeline([["printf", "%s\n", *crafted], ["cat"]])

    assert result.stdout.decode().splitlines() == crafted
    assert piped.stdout == result.stdout
    assert [f for f in files if f.exists()] == []


# -- SSH only: ciphers, keys, connections ------------------------------------------------


def test_transport_negotiates_aes128_gcm(ssh_host: SSHHost) -> None:
    transport = ssh_host.transport()

    assert transport.local_cipher == "aes128-gcm@openssh.com"


def test_unknown_host_key_is_refused_before_any_command(server: SshServer, tmp_path: Path) -> None:
    known_hosts = tmp_path / "known_hosts"
    known_hosts.write_text("")
    marker = tmp_path / "ran"
    host = SSHHost(server.ssh_config(known_hosts_path=known_hosts))

    with pytest.raises(HostKeyError, match="(?i)unknown") as refusal:
        host.run(["touch", str(marker)])

    assert f"127.0.0.1:{server.port}" in str(refusal.value)
    assert str(known_hosts) in str(refusal.value)
    assert not marker.exists()
    assert known_hosts.read_text() == ""  # never auto-added


def test_changed_host_key_is_refused_before_any_command(server: SshServer, tmp_path: Path) -> None:
    impostor_key = generate_key(tmp_path / "other_host_key")
    known_hosts = tmp_path / "known_hosts"
    known_hosts.write_text(f"[127.0.0.1]:{server.port} {impostor_key}\n")
    marker = tmp_path / "ran"
    host = SSHHost(server.ssh_config(known_hosts_path=known_hosts))

    with pytest.raises(HostKeyError, match="(?i)changed") as refusal:
        host.run(["touch", str(marker)])

    assert f"127.0.0.1:{server.port}" in str(refusal.value)
    assert not marker.exists()


def test_unauthorized_user_key_is_a_permanent_error(server: SshServer, tmp_path: Path) -> None:
    generate_key(tmp_path / "stranger")
    host = SSHHost(server.ssh_config(key_path=tmp_path / "stranger"))

    with pytest.raises(HostAuthenticationError):
        host.run(["true"])


def test_closed_port_is_unreachable(server: SshServer) -> None:
    host = SSHHost(server.ssh_config(port=free_port()))

    with pytest.raises(HostUnreachableError):
        host.run(["true"])


def test_server_vanishing_mid_command_is_unreachable_then_reconnects(
    server: SshServer, ssh_host: SSHHost
) -> None:
    outcome: list[BaseException] = []
    marker = f"20.{secrets.randbelow(10**6)}"  # a unique sleep, to see it running

    def run_long() -> None:
        try:
            ssh_host.run(["sleep", marker])
        except BaseException as exc:  # noqa: BLE001 (the assertion looks at it)
            outcome.append(exc)

    runner = threading.Thread(target=run_long)
    runner.start()
    wait_for(lambda: running(f"sleep {marker}"), what="the command running on the server")
    server.drop_connections()
    runner.join(timeout=5)

    assert not runner.is_alive()
    assert len(outcome) == 1 and isinstance(outcome[0], HostUnreachableError)
    assert ssh_host.run(["echo", "back"]).stdout == b"back\n"


def test_concurrent_commands_share_one_connection(server: SshServer, ssh_host: SSHHost) -> None:
    logins_before = server.log().count("Accepted publickey")
    results: dict[int, bytes] = {}

    def run_one(i: int) -> None:
        results[i] = ssh_host.run(["bash", "-c", f"sleep 2; echo {i}"]).stdout

    threads = [threading.Thread(target=run_one, args=(i,)) for i in range(4)]
    started = time.monotonic()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    assert results == {i: f"{i}\n".encode() for i in range(4)}
    # in parallel: one after another takes 8 s; each session costs sshd ~0.3 s to start
    assert time.monotonic() - started < 6
    assert server.log().count("Accepted publickey") - logins_before == 1


def test_pool_gives_one_host_per_key_and_it_survives_a_dropped_connection(
    server: SshServer,
) -> None:
    pool = HostPool(lambda key: SSHHost(server.ssh_config(), name=key))
    try:
        first = pool.get("web1")
        first.run(["true"])

        assert pool.get("web1") is first
        assert pool.get("web2") is not first
        server.drop_connections()
        assert pool.get("web1").run(["echo", "ok"]).stdout == b"ok\n"
    finally:
        pool.close_all()


@pytest.fixture
def echo_server() -> Iterator[int]:
    listener = socket.create_server(("127.0.0.1", 0))

    def echo(conn: socket.socket) -> None:
        with conn:
            while data := conn.recv(65536):
                conn.sendall(data)

    def serve() -> None:
        while True:
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            threading.Thread(target=echo, args=(conn,), daemon=True).start()

    threading.Thread(target=serve, daemon=True).start()
    yield listener.getsockname()[1]
    listener.shutdown(socket.SHUT_RDWR)
    listener.close()


def test_tunnel_forwards_bytes_both_ways(ssh_host: SSHHost, echo_server: int) -> None:
    local_port, close_tunnel = ssh_host.open_tunnel("127.0.0.1", echo_server)
    payload = os.urandom(4 << 20)
    try:
        with socket.create_connection(("127.0.0.1", local_port), timeout=10) as conn:
            sender = threading.Thread(target=conn.sendall, args=(payload,))
            sender.start()
            received = bytearray()
            while len(received) < len(payload) and (data := conn.recv(1 << 20)):
                received += data
            sender.join()
            conn.shutdown(socket.SHUT_WR)
            assert conn.recv(1) == b""  # our EOF went through and came back as the echo's
        assert bytes(received) == payload
    finally:
        close_tunnel()

    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", local_port), timeout=2).close()


def test_failing_sink_stops_the_command_feeding_it(host: Host) -> None:
    marker = f"ferry-test-{secrets.token_hex(6)}"

    def full_disk(chunk: bytes) -> None:
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError, match="No space left"):
        host.run(["yes", marker], sink=full_disk)

    assert wait_until_gone(marker, within=5) == []
