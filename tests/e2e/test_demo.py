"""`ferry demo` end to end: what arrives at the destination is what the old site holds."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from ferry.demo_site import drop_database
from tests.e2e.checks import check_destination, jobs_of

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("hosts", ["local", "ssh"])
def test_demo_moves_every_source_intact(tmp_path: Path, hosts: str) -> None:
    workdir = tmp_path / "demo"
    # When a new user runs the demo on the embedded default (hosts reached locally, or
    # through an sshd on 127.0.0.1 with `--ssh`)
    done = subprocess.run(
        [sys.executable, "-m", "ferry", "demo", "--size", "small", "--workdir",
         str(workdir), "--keep-source-database", *(["--ssh"] if hosts == "ssh" else [])],
        cwd=ROOT, capture_output=True, text=True, timeout=900,
        env={**os.environ, "COLUMNS": "200"})
    output = done.stdout + done.stderr
    database = re.search(r"source database (ferry_demo_[0-9a-f]+) kept", output)
    try:
        # Then it exits 0, and shows the allocations and the statistics
        assert done.returncode == 0, output[-5000:]
        assert "tm21-s00101" in output and "archive statistics" in output
        migration_id = re.search(r"submitted (mig-[0-9a-f]+)", output)
        assert migration_id and database, output[-3000:]
        # And every archive at the destination extracts to its source, byte for byte
        jobs = jobs_of(f"sqlite:///{workdir}/state/intake.sqlite3", migration_id[1])
        assert {job.kind for job in jobs} == {"local_fs", "shared_fs", "database",
                                              "db_server_root"}
        checked = check_destination(workdir / "destination" / migration_id[1], jobs,
                                    database[1], tmp_path / "scratch")
        assert checked == 7
    finally:
        if database:
            drop_database("127.0.0.1:3306", database[1])
