"""Wiring for intake: its database, its handlers, its queue, and its HTTP API."""

from __future__ import annotations

import ipaddress
import logging
import secrets
from collections.abc import Callable

from services.intake import SCHEMA
from services.intake.api import create_app
from services.intake.handlers import HANDLERS
from services.intake.server import ApiServer
from shared.errors import ConfigurationError
from shared.runtime import Service, open_database
from shared.settings import Settings
from shared.topology import QueueSpec, queue_name

NAME = "intake"
log = logging.getLogger(__name__)


def bootstrap(settings: Settings, *, serve_api: bool = True,
              generate_token: bool = False) -> Service:
    """The intake service: the status consumer, and (with `serve_api`) the API served on
    `settings.intake_bind` while the service runs.

    With `generate_token` and no `settings.api_token`, a token is made up and printed when
    the service starts (what `ferry run all` asks for: one process must not sit open).
    Raises ConfigurationError when the API would serve without a token: no token, and not
    `settings.insecure_no_auth` on a loopback address.
    """
    generated = generate_token and not settings.api_token
    if generated:
        settings = settings.model_copy(update={"api_token": secrets.token_urlsafe(32)})
    if serve_api and not settings.api_token:
        refuse_open_api(settings)
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


def refuse_open_api(settings: Settings) -> None:
    """An API without a token is a choice said out loud, and only on this machine.
    Raises ConfigurationError otherwise."""
    if not settings.insecure_no_auth:
        raise ConfigurationError(
            "FERRY_API_TOKEN is not set: intake will not serve its API unauthenticated "
            "(set one, or pass --insecure-no-auth to serve "
            "without one on a loopback address)")
    host = settings.intake_bind.rsplit(":", 1)[0].strip("[]")
    try:
        loopback = ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = host == "localhost"
    if not loopback:
        raise ConfigurationError(
            f"--insecure-no-auth serves the API without a token, so only on a loopback "
            f"address; FERRY_INTAKE_BIND is {settings.intake_bind}")
    log.warning("intake: serving the API on %s WITHOUT AUTHENTICATION (--insecure-no-auth)",
                settings.intake_bind)
