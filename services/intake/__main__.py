"""python -m services.intake: run the intake service (what `ferry run intake` runs)."""

import sys

from services.intake.bootstrap import bootstrap
from shared.runner import run_until_stopped, service_arguments
from shared.settings import Settings

options = service_arguments("Run Ferry's intake service until SIGTERM.", concurrency=False)
settings = Settings()
sys.exit(run_until_stopped([bootstrap(settings)], settings))
