"""A real OpenSSH server on 127.0.0.1, on a free port: for tests, and for `ferry demo --ssh`.

Integration tests of the host layer need the same sshd our hosts run, not a fake: host key
checks, cipher negotiation, exit statuses and stream back-pressure are its behaviour.
"""

from __future__ import annotations

import getpass
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from types import TracebackType

from shared.ssh import SSHConfig

SSHD = Path("/usr/sbin/sshd")
PRIVSEP_DIR = Path("/run/sshd")  # sshd refuses to start without it


class SshServerError(RuntimeError):
    """The test sshd could not be set up or did not start."""


def free_port() -> int:
    """A TCP port on 127.0.0.1 nobody listens on right now (someone may take it later)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def generate_key(path: Path) -> str:
    """Write an ed25519 key pair at `path` and `path`.pub; return the public line."""
    subprocess.run(
        ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", path.name, "-f", str(path)],
        check=True,
        capture_output=True,
    )
    return path.with_suffix(".pub").read_text().strip()


def _children(pid: int) -> list[int]:
    try:
        return [int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except (FileNotFoundError, ProcessLookupError):
        return []


def _descendants(pid: int) -> list[int]:
    found: list[int] = []
    for child in _children(pid):
        found += [child, *_descendants(child)]
    return found


class SshServer:
    """`/usr/sbin/sshd -D` on 127.0.0.1:<free port>, accepting one ed25519 user key.

    Use as a context manager; `stop()` ends only the sshd this object started (and the
    per-connection sshd processes it forked).
    """

    def __init__(self) -> None:
        if not SSHD.exists():
            raise SshServerError(
                f"{SSHD} is missing: install openssh-server (apt-get install -y openssh-server);"
                " the integration tests need a real sshd"
            )
        self.host = "127.0.0.1"
        self.port = 0
        self.user = getpass.getuser()
        self.dir = Path(tempfile.mkdtemp(prefix="ferry-sshd-"))
        self.host_key_path = self.dir / "ssh_host_ed25519_key"
        self.user_key_path = self.dir / "id_ed25519"
        self.known_hosts_path = self.dir / "known_hosts"
        self.config_path = self.dir / "sshd_config"
        self.log_path = self.dir / "sshd.log"
        self.host_key_pub = ""
        self._process: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> SshServer:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def start(self) -> None:
        """Generate keys, write the config, start sshd and wait until it accepts.

        Raises SshServerError if sshd exits or does not listen within 10 s.
        """
        PRIVSEP_DIR.mkdir(mode=0o755, exist_ok=True)
        self.host_key_pub = generate_key(self.host_key_path)
        user_key_pub = generate_key(self.user_key_path)
        (self.dir / "authorized_keys").write_text(user_key_pub + "\n")
        for _attempt in range(3):  # the free port may be taken between probe and bind
            self.port = free_port()
            self._write_config()
            if self._launch():
                self.known_hosts_path.write_text(f"[{self.host}]:{self.port} {self.host_key_pub}\n")
                return
        raise SshServerError(f"sshd did not start; its log:\n{self.log()}")

    def _write_config(self) -> None:
        ciphers = ",".join(
            [
                "aes128-gcm@openssh.com",
                "aes256-gcm@openssh.com",
                "chacha20-poly1305@openssh.com",
                "aes128-ctr",
                "aes192-ctr",
                "aes256-ctr",
            ]
        )
        (self.dir / "home").mkdir(exist_ok=True)
        self.config_path.write_text(
            "\n".join(
                [
                    f"Port {self.port}",
                    f"ListenAddress {self.host}",
                    f"HostKey {self.host_key_path}",
                    f"PidFile {self.dir / 'sshd.pid'}",
                    f"AuthorizedKeysFile {self.dir / 'authorized_keys'}",
                    "PermitRootLogin prohibit-password",
                    "PubkeyAuthentication yes",
                    "PasswordAuthentication no",
                    "KbdInteractiveAuthentication no",
                    "UsePAM no",
                    "StrictModes no",
                    "MaxSessions 32",
                    "MaxStartups 32",
                    f"Ciphers {ciphers}",
                    "Subsystem sftp internal-sftp",
                    # bash started by sshd sources $HOME/.bashrc; root's on this machine runs
                    # `pyenv init`, whose rehash lock, left behind by any killed shell, stalls
                    # every later login for 60 s. Test sessions get a home of their own.
                    f"SetEnv HOME={self.dir / 'home'}",
                    "",
                ]
            )
        )

    def _command(self) -> list[str]:
        """The command that runs sshd in the foreground (a subclass may wrap it, e.g. in
        `ip netns exec`); `_launch` starts it and waits until it greets."""
        return [str(SSHD), "-D", "-e", "-f", str(self.config_path)]

    def _launch(self) -> bool:
        """Start `_command()` and wait up to 10 s until it greets with `SSH-` on
        `host:port`; False (and nothing left running) if it exits or never does."""
        with self.log_path.open("ab") as log:
            self._process = subprocess.Popen(
                self._command(),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
            )
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                return False
            try:
                with socket.create_connection((self.host, self.port), timeout=0.5) as probe:
                    if probe.recv(4).startswith(b"SSH-"):
                        return True
            except OSError:
                time.sleep(0.05)
        self._kill_own_sshd()
        return False

    def log(self) -> str:
        """What sshd wrote to stderr so far (handy in assertion messages)."""
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def ssh_config(self, **overrides: object) -> SSHConfig:
        """An SSHConfig that reaches this server as its user; `overrides` replace fields."""
        fields: dict[str, object] = {
            "host": self.host,
            "port": self.port,
            "user": self.user,
            "key_path": self.user_key_path,
            "known_hosts_path": self.known_hosts_path,
            "connect_timeout": 5,
        }
        fields.update(overrides)
        return SSHConfig.model_validate(fields)

    def session_pids(self) -> list[int]:
        """PIDs of the per-connection sshd processes our sshd forked."""
        if self._process is None or self._process.poll() is not None:
            return []
        return _children(self._process.pid)

    def drop_connections(self) -> None:
        """Kill every open connection's sshd and what it runs, as if the host went away.

        Children go before parents, so each is reaped by a live parent and no command is
        left orphaned and running.
        """
        for session in self.session_pids():
            tree = [session, *_descendants(session)]
            for pid in reversed(tree):
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass

    def _kill_own_sshd(self) -> None:
        if self._process is None:
            return
        if self._process.poll() is None:
            self._process.terminate()
            try:
                self._process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait()
        self._process = None

    def stop(self) -> None:
        """Stop the sshd we started and its connections; remove the temp dir."""
        self.drop_connections()
        self._kill_own_sshd()
        shutil.rmtree(self.dir, ignore_errors=True)
