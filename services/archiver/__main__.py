"""python -m services.archiver: run the archiver service (what `ferry run archiver` runs)."""

import sys

from services.archiver.bootstrap import bootstrap
from shared.runner import run_until_stopped, service_arguments
from shared.settings import Settings

options = service_arguments("Run Ferry's archiver service until SIGTERM.", datacenter=True)
settings = Settings()
sys.exit(run_until_stopped([bootstrap(settings, datacenter=options.datacenter,
                                         concurrency=options.concurrency)], settings))
