"""The loopback sshd the tests start (it lives in ferry/ because `ferry demo --ssh` uses it)."""

from ferry.loopback_sshd import SshServer, SshServerError, free_port, generate_key

__all__ = ["SshServer", "SshServerError", "free_port", "generate_key"]
