"""Running services in the foreground until SIGTERM or SIGINT: what `python -m
services.<name>` and `ferry run` both do once their services are built."""

from __future__ import annotations

import argparse
import logging
import signal
import threading
from collections.abc import Sequence

from shared import logs, metrics
from shared.runtime import Service
from shared.settings import Settings


def run_until_stopped(services: Sequence[Service], settings: Settings) -> int:
    """Start `services`, say so on stdout (`running <queues> on <broker>`), wait for SIGTERM
    or SIGINT, stop them in order. Logs in FERRY_LOG_FORMAT; serves the metrics of all of
    them on one port when one is set (shared.metrics.serve). Returns the exit status (0).
    Raises what start() raises, ConfigurationError for a metrics port taken."""
    logs.configure(settings.log_format, logging.INFO)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    started: list[Service] = []
    stop_metrics = None
    try:
        stop_metrics = metrics.serve(settings, [service.name for service in services])
        for service in services:
            service.start()
            started.append(service)
        print(f"running {', '.join(s.queue.name for s in services)} on "
              f"{settings.broker_url.split('@')[-1]}; Ctrl-C stops", flush=True)
        stop.wait()
    finally:
        for service in started:
            service.stop()
        if stop_metrics is not None:
            stop_metrics()
    return 0


def service_arguments(description: str, argv: Sequence[str] | None = None, *,
                      datacenter: bool = False, concurrency: bool = True) -> argparse.Namespace:
    """The options `python -m services.<name>` takes: --concurrency N (job workers) and,
    for the archiver and transfer, --datacenter DC."""
    parser = argparse.ArgumentParser(description=description)
    if datacenter:
        parser.add_argument("--datacenter", "-d", help="the datacenter whose queue to consume "
                                                       "(default: FERRY_DATACENTER)")
    if concurrency:
        parser.add_argument("--concurrency", type=int, help="job worker threads")
    options = parser.parse_args(argv)
    if concurrency and options.concurrency is not None and options.concurrency < 1:
        parser.error("--concurrency must be at least 1")
    return options
