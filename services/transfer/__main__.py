"""python -m services.transfer: run the transfer service (what `ferry run transfer` runs)."""

import sys

from services.transfer.bootstrap import bootstrap
from shared.runner import run_until_stopped, service_arguments
from shared.settings import Settings

options = service_arguments("Run Ferry's transfer service until SIGTERM.", datacenter=True)
settings = Settings()
sys.exit(run_until_stopped([bootstrap(settings, datacenter=options.datacenter,
                                         concurrency=options.concurrency)], settings))
