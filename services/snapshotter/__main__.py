"""python -m services.snapshotter: run the snapshotter service (same as `ferry run snapshotter`)."""

import sys

from shared.cli import main

sys.exit(main(["run", "snapshotter", *sys.argv[1:]]))
