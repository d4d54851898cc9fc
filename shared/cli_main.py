"""python -m shared.cli_main: the `ferry` command without the console script."""

import sys

from shared.cli import main

sys.exit(main())
