"""Each service its own RabbitMQ user, allowed only what it needs: `ferry broker setup`.

What a service's user `ferry-<service>` may do in the vhost, all read from the code:
- configure: nothing. The admin declares the whole topology here; a service only checks its
  queues exist (a passive declare needs no permission). With `configure` on its own queue
  names a service could delete them, or declare one that dead-letters into another
  service's queue and feed it through its own retry key.
- read: its own work queue(s) (`archiver.<dc>`, `transfer.<dc>` for every datacenter).
- write: the three Ferry exchanges, never `amq.default` (which routes to any queue by name),
  narrowed by topic permissions to the routing keys it may use: on `ferry.events` the types
  it emits (the services whose code constructs the event, ferry.event_map), on
  `ferry.retry` its own retry queues, on `ferry.dead-letters` its own queue's name.
Operators (`ferry dlq`) keep the admin's FERRY_BROKER_URL.
"""

from __future__ import annotations

import os
import re
import secrets
import shlex
import shutil
import subprocess
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated
from urllib.parse import quote, unquote, urlsplit, urlunsplit

import typer

from ferry.event_map import event_routes
from services.resolver.inventory import FileInventory
from shared.bus import declare_all
from shared.contracts import EVENTS
from shared.errors import ConfigurationError
from shared.settings import SERVICES, Settings
from shared.topology import (
    DATACENTER_SERVICES,
    DEAD_EXCHANGE,
    EVENTS_EXCHANGE,
    RETRY_EXCHANGE,
    queue_name,
)

USER_PREFIX = "ferry-"
NOTHING = "^$"


class BrokerSetupError(ConfigurationError):
    """rabbitmqctl is missing or failed, or the setup was asked something it cannot do."""


def datacenter_pattern() -> str:
    """The datacenter names the contracts accept, unanchored (`<service>.<dc>` queues)."""
    [meta] = EVENTS["archive.completed"].model_fields["datacenter"].metadata
    return str(meta.pattern).removeprefix("^").removesuffix("$")


def queue_pattern(service: str) -> str:
    """The service's work queue names, as an unanchored regular expression."""
    if service in DATACENTER_SERVICES:
        return rf"{service}\.{datacenter_pattern()}"
    return re.escape(queue_name(service))


def emitted_keys(service: str) -> list[str]:
    """The routing keys `service` publishes on ferry.events, as regular expressions: each
    event type its code constructs, `.<dc>` appended where a datacenter routes it."""
    keys = []
    for route in event_routes():
        if service in route.emitters:
            key = re.escape(route.type)
            keys.append(f"{key}\\.{datacenter_pattern()}"
                        if EVENTS[route.type].ROUTED_BY_DATACENTER else key)
    return keys


def _anchored(alternatives: Iterable[str]) -> str:
    found = list(alternatives)
    return f"^({'|'.join(found)})$" if found else NOTHING


@dataclass(frozen=True)
class Grant:
    """One service's broker user and what it may do."""

    service: str
    user: str
    configure: str
    write: str
    read: str
    topics: tuple[tuple[str, str], ...]  # (exchange, routing keys it may publish); read: none


def grant(service: str, prefix: str = USER_PREFIX) -> Grant:
    """What `service`'s broker user may do (see the module's docstring)."""
    queues = queue_pattern(service)
    return Grant(
        service, f"{prefix}{service}", configure=NOTHING,
        write=_anchored(re.escape(e.name) for e in (EVENTS_EXCHANGE, RETRY_EXCHANGE,
                                                    DEAD_EXCHANGE)),
        read=f"^{queues}$",
        topics=((EVENTS_EXCHANGE.name, _anchored(emitted_keys(service))),
                (RETRY_EXCHANGE.name, rf"^{queues}\.retry\.[0-9]+ms$"),
                (DEAD_EXCHANGE.name, f"^{queues}$")))


class Rabbitmqctl:
    """Runs rabbitmqctl (argv `command`, e.g. ["rabbitmqctl", "-n", "rabbit@host"])."""

    def __init__(self, command: Sequence[str] = ("rabbitmqctl",)) -> None:
        if not command or shutil.which(command[0]) is None:
            raise BrokerSetupError(f"{command[0] if command else 'rabbitmqctl'!r} not found: "
                                   f"`ferry broker setup` runs rabbitmqctl on the broker's "
                                   f"host (or give --rabbitmqctl)")
        self.command = list(command)

    def __call__(self, *args: str) -> str:
        try:
            done = subprocess.run([*self.command, *args], capture_output=True, text=True,  # noqa: S603
                                  timeout=60, check=False)
        except subprocess.TimeoutExpired as error:
            raise BrokerSetupError(f"rabbitmqctl {args[0]} timed out after 60 s") from error
        if done.returncode != 0:
            detail = (done.stderr or done.stdout).strip()[-1000:]
            raise BrokerSetupError(f"rabbitmqctl {args[0]} failed (exit {done.returncode}): "
                                   f"{detail}")
        return done.stdout

    def names(self, *args: str) -> set[str]:
        return {line.split("\t")[0] for line in self(*args, "--silent").splitlines() if line}


@dataclass(frozen=True)
class ServiceUser:
    service: str
    user: str
    password: str
    url: str


def service_url(admin_url: str, vhost: str, user: str, password: str) -> str:
    """`admin_url` with another user, password and vhost."""
    parts = urlsplit(admin_url)
    host = parts.hostname or "localhost"
    netloc = f"{quote(user, safe='')}:{quote(password, safe='')}@{host}"
    if parts.port:
        netloc += f":{parts.port}"
    return urlunsplit((parts.scheme, netloc, "/" + quote(vhost, safe=""), "", ""))


def vhost_of(url: str) -> str:
    path = unquote(urlsplit(url).path.removeprefix("/"))
    return path or "/"


def password_variable(service: str) -> str:
    return f"FERRY_{service.upper()}_BROKER_PASSWORD"


def read_passwords(path: Path) -> dict[str, str]:
    """`FERRY_<SERVICE>_BROKER_PASSWORD=...` lines (an env file; other lines are ignored).
    Raises BrokerSetupError for an empty password."""
    passwords = {}
    for line in path.read_text().splitlines():
        name, sep, value = line.strip().partition("=")
        for service in SERVICES:
            if sep and name == password_variable(service):
                if not value:
                    raise BrokerSetupError(f"{path}: {name} is empty")
                passwords[service] = value
    return passwords


def write_passwords(path: Path, passwords: dict[str, str]) -> None:
    """Add the passwords missing from `path` (created mode 0600), keeping its other lines."""
    known = read_passwords(path) if path.exists() else {}
    missing = [s for s in SERVICES if s in passwords and s not in known]
    if not missing:
        return
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    with os.fdopen(fd, "a") as file:
        file.writelines(f"{password_variable(s)}={passwords[s]}\n" for s in missing)


def setup(admin_url: str, settings: Settings, *, vhost: str | None, datacenters: Sequence[str],
          passwords: dict[str, str], ctl: Rabbitmqctl,
          prefix: str = USER_PREFIX) -> list[ServiceUser]:
    """Create the vhost (if missing), declare the whole topology with the admin's
    credentials, then create or update each service's user, password and permissions.
    Idempotent. `passwords` maps a service to its password; a missing one is generated
    (and added to `passwords`). Raises BrokerSetupError (rabbitmqctl), ConfigurationError
    (a queue with other arguments), kombu/amqp errors."""
    if not datacenters:
        raise BrokerSetupError("give --datacenter DC for every datacenter whose archivers will "
                               "run (or FERRY_INVENTORY as a file naming them): its queues "
                               "archiver.<DC> and transfer.<DC> are declared here")
    vhost = vhost or vhost_of(admin_url)
    if vhost not in ctl.names("list_vhosts", "name"):
        ctl("add_vhost", vhost)
        admin = unquote(urlsplit(admin_url).username or "guest")
        ctl("set_permissions", "-p", vhost, admin, ".*", ".*", ".*")
    admin_in_vhost = service_url(admin_url, vhost, unquote(urlsplit(admin_url).username or ""),
                                 unquote(urlsplit(admin_url).password or ""))
    declare_all(admin_in_vhost, settings, datacenters)
    users = ctl.names("list_users")
    made = []
    for service in SERVICES:
        rights = grant(service, prefix)
        password = passwords.setdefault(service, secrets.token_urlsafe(24))
        if rights.user in users:
            ctl("change_password", rights.user, password)
        else:
            ctl("add_user", rights.user, password)
        # topic limits first: write on ferry.events without them would allow every key
        for exchange, keys in rights.topics:
            ctl("set_topic_permissions", "-p", vhost, rights.user, exchange, keys, NOTHING)
        ctl("set_permissions", "-p", vhost, rights.user, rights.configure, rights.write,
            rights.read)
        made.append(ServiceUser(service, rights.user, password,
                                service_url(admin_url, vhost, rights.user, password)))
    return made


def env_passwords(environ: dict[str, str]) -> dict[str, str]:
    """The passwords given as FERRY_<SERVICE>_BROKER_PASSWORD variables (docker-compose's)."""
    return {s: environ[password_variable(s)] for s in SERVICES
            if environ.get(password_variable(s))}


def inventory_datacenters(settings: Settings) -> list[str]:
    """The datacenters FERRY_INVENTORY names when it is a file (an HTTP inventory lists
    none: give -d). Raises ConfigurationError for an unreadable file."""
    if not settings.inventory or settings.inventory.startswith(("http://", "https://")):
        return []
    return sorted(FileInventory(Path(settings.inventory)).document().datacenters)


broker_app = typer.Typer(no_args_is_help=True, help="The broker: each service its own user.")


@broker_app.command("setup")
def setup_command(
    datacenter: Annotated[list[str] | None, typer.Option(
        "--datacenter", "-d", help="a datacenter whose archiver and transfer queues to declare "
                                   "(repeat for each; default: FERRY_INVENTORY's)")] = None,
    vhost: Annotated[str | None, typer.Option(help="default: FERRY_BROKER_URL's")] = None,
    password_file: Annotated[Path | None, typer.Option(
        help="FERRY_<SERVICE>_BROKER_PASSWORD=... lines: used, missing ones generated and "
             "added (mode 0600)")] = None,
    rabbitmqctl: Annotated[str, typer.Option(
        help="how to run rabbitmqctl, e.g. 'rabbitmqctl -n rabbit@broker'")] = "rabbitmqctl",
    user_prefix: Annotated[str, typer.Option(help="service users are PREFIX<service>")]
    = USER_PREFIX,
) -> None:
    """Create each service's broker user with only its own permissions (rabbitmqctl) and
    declare the whole topology with FERRY_BROKER_URL's (admin) credentials. Idempotent.
    Passwords: --password-file, else FERRY_<SERVICE>_BROKER_PASSWORD, else generated and
    printed here, once, in the service URLs."""
    settings = Settings()
    if not settings.broker_url.startswith("amqp"):
        raise BrokerSetupError(f"FERRY_BROKER_URL must be the RabbitMQ admin's amqp:// URL, "
                               f"not {settings.broker_url.split('@')[-1]!r}")
    passwords = env_passwords(dict(os.environ))
    if password_file is not None and password_file.exists():
        passwords.update(read_passwords(password_file))
    given = set(passwords)
    made = setup(settings.broker_url, settings, vhost=vhost,
                 datacenters=datacenter or inventory_datacenters(settings),
                 passwords=passwords, ctl=Rabbitmqctl(shlex.split(rabbitmqctl)),
                 prefix=user_prefix)
    if password_file is not None:
        write_passwords(password_file, passwords)
    for user in made:
        shown = user.url if user.service not in given and password_file is None else (
            service_url(user.url, vhost_of(user.url), user.user, "***"))
        typer.echo(f"FERRY_{user.service.upper()}_BROKER_URL={shown}")
