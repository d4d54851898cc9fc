"""Ferry's error tree: one root, two branches that decide what the bus does with a message."""

from __future__ import annotations


class FerryError(Exception):
    """Root of every error Ferry raises on purpose."""


class TransientError(FerryError):
    """Worth retrying later: a host or broker unreachable, a lock timeout, a lost connection."""


class ServiceStoppingError(TransientError):
    """The service is stopping: the work is given back at once, without spending an attempt."""


class PermanentError(FerryError):
    """Retrying cannot help: bad input, a missing entity, a refused host key. Dead-letter."""


class UnknownEventError(PermanentError):
    """An event about something this service never saw a request for (a migration, a
    snapshot, an archive): believed by nobody, so no phantom row appears; dead-lettered with
    reason `unknown`."""

    dead_letter_reason = "unknown"


class UnknownMigrationError(UnknownEventError):
    """An event about a migration this service never heard of: no phantom migration."""


class RefusedEventError(PermanentError):
    """An event a service will not believe: it names what is not the sender's to name (a
    file outside staging, another archive's place). No effect, dead-lettered as `refused`."""

    dead_letter_reason = "refused"


class ConfigurationError(PermanentError):
    """A setting is missing or wrong."""


class MalformedMessageError(PermanentError):
    """A message body is not JSON, not an envelope, or its payload fails its schema."""


class LeaseLostError(FerryError):
    """Another worker took over a job whose lease expired: stop working on it, write nothing."""


class CommandError(FerryError):
    """A command on a host exited non-zero. Carries the argv, exit status and stderr's tail."""

    def __init__(self, host: str, argv: list[str], exited: int, stderr_tail: str) -> None:
        self.host = host
        self.argv = list(argv)
        self.exited = exited
        self.stderr_tail = stderr_tail
        command = " ".join(argv)
        super().__init__(
            f"{host}: command exited {exited}: {command}: {stderr_tail.strip()[-500:]}"
        )


class UnexpectedExit(CommandError, PermanentError):
    """A command's exit status says it failed; retrying the same command will not help."""


class CommandTimedOut(TransientError):
    """A command ran past its timeout and was stopped."""


class HostUnreachableError(TransientError):
    """A host could not be reached (connection refused, timed out, reset)."""


class HostKeyError(PermanentError):
    """A host's key is unknown or changed: refused, never auto-added."""
