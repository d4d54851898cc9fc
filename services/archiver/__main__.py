"""python -m services.archiver: run the archiver service (same as `ferry run archiver`)."""

import sys

from shared.cli import main

sys.exit(main(["run", "archiver", *sys.argv[1:]]))
