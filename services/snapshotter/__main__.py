"""python -m services.snapshotter: run the snapshotter service (as `ferry run snapshotter`)."""

import sys

from services.snapshotter.bootstrap import bootstrap
from shared.runner import run_until_stopped, service_arguments
from shared.settings import Settings

options = service_arguments("Run Ferry's snapshotter service until SIGTERM.")
settings = Settings()
sys.exit(run_until_stopped([bootstrap(settings, concurrency=options.concurrency)], settings))
