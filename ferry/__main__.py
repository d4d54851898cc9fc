"""python -m ferry: the `ferry` command without the console script."""

import sys

from ferry.cli import main

sys.exit(main())
