"""python -m services.resolver: run the resolver service (what `ferry run resolver` runs)."""

import sys

from services.resolver.bootstrap import bootstrap
from shared.runner import run_until_stopped, service_arguments
from shared.settings import Settings

options = service_arguments("Run Ferry's resolver service until SIGTERM.", concurrency=False)
settings = Settings()
sys.exit(run_until_stopped([bootstrap(settings)], settings))
