"""Processes the lab tests SIGKILL at the worst moment (run with python -m tests.lab.hold).

`snapshotter`: the snapshotter service (settings from FERRY_* variables) whose create stops
right after it suspended the origin. `mount ADDRESS EXPORT PORT RUN_DIR`: an archiver that
mounted a snapshot through shared.nbd and holds it.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

from services.snapshotter.bootstrap import bootstrap
from shared.addresses import host_pool
from shared.nbd import attach_export
from shared.settings import Settings


def hang_after_suspend(step: str) -> None:
    if step == "suspended":
        print("SUSPENDED", flush=True)
        time.sleep(3600)


def main() -> None:
    settings = Settings()
    if sys.argv[1] == "snapshotter":
        service = bootstrap(settings, on_step=hang_after_suspend, concurrency=1)
        service.start()
        time.sleep(3600)
    else:
        address, export, port, run_dir = sys.argv[2:6]
        host = host_pool(settings).get(address)
        with attach_export(host, export, int(port), fs_type="ext4",  # type: ignore[arg-type]
                           run_dir=Path(run_dir)) as mounted:
            print(f"MOUNTED {mounted}", flush=True)
            time.sleep(3600)


if __name__ == "__main__":
    main()
