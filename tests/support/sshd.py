"""The loopback sshd the tests start (it lives in shared/ because `ferry demo --ssh` uses it)."""

from shared.loopback_sshd import SshServer, SshServerError, free_port, generate_key

__all__ = ["SshServer", "SshServerError", "free_port", "generate_key"]
