"""Wiring for intake: its database, its handlers, its queue, and its HTTP API."""

from __future__ import annotations

import secrets
from collections.abc import Callable

from services.intake import SCHEMA
from services.intake.api import create_app
from services.intake.handlers import HANDLERS
from services.intake.server import ApiServer
from shared.runtime import Service, open_database
from shared.settings import Settings
from shared.topology import QueueSpec, queue_name

NAME = "intake"


def bootstrap(settings: Settings, *, serve_api: bool = True,
              generate_token: bool = False) -> Service:
    """The intake service: the status consumer, and (with `serve_api`) the API served on
    `settings.intake_bind` while the service runs.

    With `generate_token` and no `settings.api_token`, a token is made up and printed when
    the service starts (what `ferry run all` asks for: one process must not sit open).
    """
    generated = generate_token and not settings.api_token
    if generated:
        settings = settings.model_copy(update={"api_token": secrets.token_urlsafe(32)})
    # intake.status hears every event: "#" rather than one binding per type.
    units = open_database(settings, SCHEMA)
    on_start: list[Callable[[], None]] = []
    on_stop: list[Callable[[], None]] = []
    if serve_api:
        server = ApiServer(create_app(settings, units=units), settings.intake_bind)
        on_start.append(server.start)
        if generated:
            on_start.append(lambda: print(
                f"intake: API on {server.url} needs a token (FERRY_API_TOKEN was not set): "
                f"export FERRY_API_TOKEN={settings.api_token}", flush=True))
        on_stop.append(server.stop)
    return Service(NAME, settings, units, QueueSpec(queue_name(NAME), ("#",)), HANDLERS,
                   on_start=on_start, on_stop=on_stop)
