"""Every service of the pipeline, built with only the arguments its own bootstrap takes.

`ferry run` and `ferry demo` say what they want once (`Options`); each builder passes a
service the part it understands. The application imports the services directly: a missing
one is an ImportError at start, not a string that fails later.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

from services import archiver as archiver_package
from services import intake as intake_package
from services import resolver as resolver_package
from services import snapshotter as snapshotter_package
from services import transfer as transfer_package
from services.archiver import bootstrap as archiver
from services.intake import bootstrap as intake
from services.resolver import bootstrap as resolver
from services.snapshotter import bootstrap as snapshotter
from services.transfer import bootstrap as transfer
from shared.db import Schema
from shared.runtime import Service
from shared.settings import Settings


@dataclass(frozen=True)
class Options:
    """What the caller asks of the services it starts."""

    # one archiver and one transfer per datacenter; none without any
    datacenters: tuple[str, ...] = ()
    concurrency: int | None = None  # job worker threads (services with job workers)
    generate_token: bool = False  # intake: make up an API token when none is set


def _intake(settings: Settings, options: Options) -> list[Service]:
    return [intake.bootstrap(settings, generate_token=options.generate_token)]


def _resolver(settings: Settings, options: Options) -> list[Service]:
    return [resolver.bootstrap(settings)]


def _snapshotter(settings: Settings, options: Options) -> list[Service]:
    return [snapshotter.bootstrap(settings, concurrency=options.concurrency)]


def _archiver(settings: Settings, options: Options) -> list[Service]:
    return [archiver.bootstrap(settings, datacenter=dc, concurrency=options.concurrency)
            for dc in options.datacenters]


def _transfer(settings: Settings, options: Options) -> list[Service]:
    return [transfer.bootstrap(settings, datacenter=dc, concurrency=options.concurrency)
            for dc in options.datacenters]


BUILDERS: dict[str, Callable[[Settings, Options], list[Service]]] = {
    "intake": _intake,
    "resolver": _resolver,
    "snapshotter": _snapshotter,
    "archiver": _archiver,
    "transfer": _transfer,
}


# Each service's database schema, by service name (`ferry db upgrade`).
SCHEMAS: dict[str, Schema] = {package.SCHEMA.name: package.SCHEMA for package in (
    intake_package, resolver_package, snapshotter_package, archiver_package, transfer_package)}


def build(names: Iterable[str], settings: Settings, options: Options) -> list[Service]:
    """The services `names` (in that order), not started. Raises what their bootstraps
    raise (ConfigurationError, ValueError) and KeyError for an unknown name."""
    return [service for name in names for service in BUILDERS[name](settings, options)]
