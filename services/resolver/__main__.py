"""python -m services.resolver: run the resolver service (same as `ferry run resolver`)."""

import sys

from shared.cli import main

sys.exit(main(["run", "resolver", *sys.argv[1:]]))
