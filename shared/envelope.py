"""The one message envelope every service publishes and consumes (JSON only, never pickle)."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from shared.errors import MalformedMessageError

if TYPE_CHECKING:
    from shared.contracts import Event


def _now() -> datetime:
    return datetime.now(UTC)


class Envelope(BaseModel):
    """Frozen: `id` is unique per message, `migration_id` correlates, `causation_id` traces."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    id: uuid.UUID = Field(default_factory=uuid.uuid4)
    type: str
    migration_id: str
    causation_id: uuid.UUID | None = None
    occurred_at: datetime = Field(default_factory=_now)
    payload: dict[str, Any]

    @classmethod
    def wrap(
        cls, event: Event, *, migration_id: str, cause: Envelope | None = None
    ) -> Envelope:
        """A new envelope around `event`, caused by `cause` when given."""
        return cls(
            type=event.TYPE,
            migration_id=migration_id,
            causation_id=cause.id if cause else None,
            payload=event.model_dump(mode="json"),
        )

    @property
    def routing_key(self) -> str:
        """The event type, plus `.<datacenter>` for events a datacenter routes."""
        from shared.contracts import routing_key_for

        return routing_key_for(self.type, self.payload)

    def event(self) -> Event:
        """The typed payload. Raises MalformedMessageError for an unknown type or bad payload."""
        from shared.contracts import parse_event

        return parse_event(self.type, self.payload)

    def to_json(self) -> bytes:
        return self.model_dump_json().encode()

    @classmethod
    def from_json(cls, body: bytes | str) -> Envelope:
        """Parse a message body. Raises MalformedMessageError when it is not a valid envelope."""
        try:
            return cls.model_validate_json(body)
        except ValidationError as error:
            raise MalformedMessageError(f"not a Ferry envelope: {_first_lines(error)}") from error


def _first_lines(error: ValidationError, limit: int = 3) -> str:
    parts = []
    for item in error.errors()[:limit]:
        where = ".".join(str(p) for p in item["loc"]) or "body"
        parts.append(f"{where}: {item['msg']}")
    return "; ".join(parts)
