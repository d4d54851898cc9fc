"""The archiver service's handlers: plain functions, registered by event type at the bottom."""

from __future__ import annotations

from shared.runtime import ServiceHandler

HANDLERS: dict[str, ServiceHandler] = {}
