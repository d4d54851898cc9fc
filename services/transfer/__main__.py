"""python -m services.transfer: run the transfer service (same as `ferry run transfer`)."""

import sys

from shared.cli import main

sys.exit(main(["run", "transfer", *sys.argv[1:]]))
