"""The event map, read from the code: who emits each event, who consumes it, and the queues.

- Consumers: every service's `HANDLERS` (services/<name>/handlers.py), the dict its
  consumer dispatches on.
- Emitters: the services whose code constructs the event's contract class
  (`MigrationResolved(...)`), found by reading their source: an event is only ever put in
  an outbox after it was built from its model, so that is where emitting starts.
- Queues: what each service declares, from the same functions its bootstrap and the bus use
  (`shared.topology.queue_name` / `all_queues`, `shared.runtime.routing_keys`).

`ferry topology` prints it; `ferry topology --markdown` is docs/events.md.
"""

from __future__ import annotations

import ast
import functools
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

from rich.console import Group
from rich.table import Table

from services.archiver import handlers as archiver_handlers
from services.intake import handlers as intake_handlers
from services.resolver import handlers as resolver_handlers
from services.snapshotter import handlers as snapshotter_handlers
from services.transfer import handlers as transfer_handlers
from shared import contracts
from shared.contracts import EVENTS
from shared.runtime import routing_keys
from shared.topology import DATACENTER_SERVICES, QueueSpec, all_queues, queue_name

HANDLER_MODULES: dict[str, ModuleType] = {
    "intake": intake_handlers,
    "resolver": resolver_handlers,
    "snapshotter": snapshotter_handlers,
    "archiver": archiver_handlers,
    "transfer": transfer_handlers,
}
DC = "<dc>"  # how a per-datacenter name is shown
ROOT = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class EventRoute:
    type: str
    routing_key: str
    emitters: dict[str, tuple[str, ...]]  # service -> the files that construct the event
    consumers: dict[str, str]  # service -> its handler's name


@dataclass(frozen=True)
class ServiceQueue:
    service: str
    queue: str
    bindings: tuple[str, ...]


def _handler_name(handler: Callable[..., Any]) -> str:
    while isinstance(handler, functools.partial):
        handler = handler.func
    return str(getattr(handler, "__name__", repr(handler)))


def _contract_names(tree: ast.Module) -> tuple[dict[str, str], set[str]]:
    """The names a module binds to contract classes, and its aliases of the module itself."""
    classes: dict[str, str] = {}
    modules: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module == contracts.__name__:
            classes.update({a.asname or a.name: a.name for a in node.names})
        elif isinstance(node, ast.ImportFrom) and node.module == "shared":
            modules.update(a.asname or a.name for a in node.names if a.name == "contracts")
        elif isinstance(node, ast.Import):
            modules.update(a.asname for a in node.names
                           if a.name == contracts.__name__ and a.asname)
    return classes, modules


def constructed_events(source: str) -> set[str]:
    """The event types whose contract class `source` calls, as `X(...)` or `contracts.X(...)`."""
    tree = ast.parse(source)
    classes, modules = _contract_names(tree)
    found: set[str] = set()
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        name = None
        if isinstance(node.func, ast.Name):
            name = classes.get(node.func.id)
        elif (isinstance(node.func, ast.Attribute) and isinstance(node.func.value, ast.Name)
              and node.func.value.id in modules):
            name = node.func.attr
        model = getattr(contracts, name, None) if name else None
        if isinstance(model, type) and issubclass(model, contracts.Event) and model.TYPE:
            found.add(model.TYPE)
    return found


def emitters(packages: Mapping[str, Path]) -> dict[str, dict[str, tuple[str, ...]]]:
    """event type -> service -> the files (relative to the repository) that construct it."""
    found: dict[str, dict[str, list[str]]] = {}
    for service, package in packages.items():
        for path in sorted(package.rglob("*.py")):
            if "migrations" in path.relative_to(package).parts:
                continue
            for event_type in constructed_events(path.read_text()):
                where = str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else path.name
                found.setdefault(event_type, {}).setdefault(service, []).append(where)
    return {t: {s: tuple(files) for s, files in by.items()} for t, by in found.items()}


def _contract_types() -> set[str]:
    return {t for t, model in EVENTS.items() if model.__module__ == "shared.contracts"}


def event_routes() -> list[EventRoute]:
    """Every type of shared.contracts.EVENTS, in declaration order (not the types a test
    declares for itself)."""
    packages = {name: Path(str(module.__file__)).parent
                for name, module in HANDLER_MODULES.items()}
    emitted = emitters(packages)
    routes = []
    for event_type, model in EVENTS.items():
        if event_type not in _contract_types():
            continue
        consumers = {service: _handler_name(module.HANDLERS[event_type])
                     for service, module in HANDLER_MODULES.items()
                     if event_type in module.HANDLERS}
        key = f"{event_type}.{DC}" if model.ROUTED_BY_DATACENTER else event_type
        routes.append(EventRoute(event_type, key, emitted.get(event_type, {}), consumers))
    return routes


def service_queues() -> list[ServiceQueue]:
    """Each service's work queue and its bindings; the per-datacenter ones (archiver,
    transfer) once, as `<service>.<dc>`."""
    result = []
    for service, module in HANDLER_MODULES.items():
        handlers: Mapping[str, Any] = module.HANDLERS
        datacenter = DC if service in DATACENTER_SERVICES else None
        # A queue that hears every event type is bound once, with "#" (intake.status).
        keys = ("#",) if set(handlers) >= _contract_types() else routing_keys(handlers,
                                                                           datacenter)
        result.append(ServiceQueue(service, queue_name(service, datacenter), keys))
    return result


def companion_queues(delivery_limit: int, delays: tuple[float, ...]) -> list[str]:
    """What every service declares next to its work queue `<queue>`: dead letters, retries."""
    _, *others = all_queues(QueueSpec("<queue>", ()), delivery_limit, delays)
    return [queue.name for queue in others]


def _emitted_by(route: EventRoute, files: bool) -> str:
    if not files:
        return ", ".join(route.emitters) or "—"
    return "; ".join(f"{service} ({', '.join(Path(f).name for f in where)})"
                     for service, where in route.emitters.items()) or "—"


def _consumed_by(route: EventRoute) -> str:
    return ", ".join(f"{service} ({handler})" for service, handler in route.consumers.items())


def _queues_note(delivery_limit: int, delays: tuple[float, ...], code: str = "") -> str:
    names = ", ".join(f"{code}{name}{code}" for name in companion_queues(delivery_limit, delays))
    tiers = ",".join(f"{d:g}" for d in delays)
    return (f"Each work queue is a quorum queue ({code}x-delivery-limit{code} {delivery_limit}) "
            f"bound to the topic exchange {code}ferry.events{code}; next to it are {names}: "
            f"its dead letters (through {code}ferry.dead-letters{code}) and one TTL queue per "
            f"retry tier (through {code}ferry.retry{code}; "
            f"{code}FERRY_RETRY_DELAYS={tiers}{code}). On RabbitMQ each service's own broker "
            f"user may publish only the events it emits, the column above "
            f"({code}ferry broker setup{code}).")


def render_tables(delivery_limit: int, delays: tuple[float, ...]) -> Group:
    events = Table("event", "routing key", "emitted by", "consumed by", title="events")
    for route in event_routes():
        events.add_row(route.type, route.routing_key, _emitted_by(route, files=False),
                       _consumed_by(route))
    queues = Table("service", "queue", "bound to", title="queues",
                   caption=_queues_note(delivery_limit, delays))
    for q in service_queues():
        queues.add_row(q.service, q.queue, " ".join(q.bindings))
    return Group(events, queues)


def render_markdown(delivery_limit: int, delays: tuple[float, ...]) -> str:
    lines = [
        "# Events and queues",
        "",
        "Generated from the code by `ferry topology --markdown > docs/events.md` (default",
        "settings); `tests/unit/test_layers.py` fails when this file is stale. Emitters are",
        "the services whose code constructs the event's class from `shared/contracts.py`;",
        "consumers are the entries of each service's `HANDLERS` (`services/<name>/handlers.py`).",
        "Every event is published to the topic exchange `ferry.events` under its routing key;",
        "`<dc>` is the event's `datacenter` field.",
        "",
        "| event | routing key | emitted by | consumed by |",
        "| --- | --- | --- | --- |",
    ]
    for route in event_routes():
        lines.append(f"| `{route.type}` | `{route.routing_key}` | {_emitted_by(route, True)} "
                     f"| {_consumed_by(route)} |")
    lines += ["", "## Queues", "", _queues_note(delivery_limit, delays, code="`"), "",
              "| service | queue | bound to |", "| --- | --- | --- |"]
    for q in service_queues():
        bound = " ".join(f"`{key}`" for key in q.bindings)
        lines.append(f"| {q.service} | `{q.queue}` | {bound} |")
    return "\n".join(lines) + "\n"
