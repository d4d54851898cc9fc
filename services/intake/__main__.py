"""python -m services.intake: run the intake service (same as `ferry run intake`)."""

import sys

from shared.cli import main

sys.exit(main(["run", "intake", *sys.argv[1:]]))
