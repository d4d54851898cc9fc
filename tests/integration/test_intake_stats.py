"""The field report's statistics table, from the status read model, over the API."""

from __future__ import annotations

from pathlib import Path

from rich.console import Console

from services.intake.stats import render_stats
from shared.contracts import MigrationCompleted, MigrationResolved, TransferCompleted
from tests.integration.test_intake_api import AUTH, open_intake
from tests.integration.test_intake_status import (
    DATABASE,
    LOCAL,
    SHA,
    SHARED,
    archive_done,
    at,
    deliver,
    planned,
)

GB = 10**9


def transferred(request_id: str, size: int, seconds: float) -> TransferCompleted:
    return TransferCompleted(request_id=request_id, archive_id=f"arc-{request_id}",
                             destination=f"/dest/{request_id}", bytes=size, duration_s=seconds,
                             mb_per_s=size / seconds / 1e6, sha256=SHA)


def test_stats_count_kinds_find_largest_and_average_transfer_rate(tmp_path: Path) -> None:
    for intake in open_intake(f"sqlite:///{tmp_path}/intake.sqlite3"):
        # Given a completed migration with two local filesystems, a GFS and a database
        jobs = (planned("l1", "local_fs", LOCAL), planned("l2", "local_fs", LOCAL),
                planned("g1", "shared_fs", SHARED), planned("d1", "database", DATABASE))
        deliver(intake,
                at(1, MigrationResolved(customer_id="c", allocations={}, resolved_document={},
                                        jobs=jobs), "m1"),
                at(2, archive_done("l1", "local_fs", raw=185 * GB, packed=154 * GB), "m1"),
                at(3, archive_done("l2", "local_fs", raw=5 * GB, packed=3 * GB), "m1"),
                at(4, archive_done("g1", "shared_fs", raw=318 * GB, packed=287 * GB), "m1"),
                at(5, archive_done("d1", "database", raw=170 * GB, packed=16 * GB), "m1"),
                at(6, transferred("l1", 154 * GB, 20_000), "m1"),
                at(7, transferred("l2", 3 * GB, 1_000), "m1"),
                at(8, transferred("g1", 287 * GB, 41_000), "m1"),
                at(9, transferred("d1", 16 * GB, 3_000), "m1"),
                at(10, MigrationCompleted(archives=4, bytes=460 * GB), "m1"))
        # When ops ask for its statistics
        response = intake.client.get("/migrations/m1/stats", headers=AUTH)
        # Then the counts, the largest of each kind and the transfer rate are the report's
        assert response.status_code == 200, response.text
        stats = response.json()
        assert stats["archives"] == {"total": 4, "by_kind": {
            "local_fs": 2, "shared_fs": 1, "database": 1, "db_server_root": 0}}
        assert stats["largest"]["shared_fs"] == {"label": SHARED.label, "raw_bytes": 318 * GB,
                                                 "compressed_bytes": 287 * GB}
        assert stats["largest"]["local_fs"]["raw_bytes"] == 185 * GB
        local_under_20gb = [u for u in stats["under"]
                            if u["kind"] == "local_fs" and u["bytes"] == 20 * GB]
        assert local_under_20gb[0]["share"] == 0.5
        assert stats["transfer"]["count"] == 4
        assert abs(stats["transfer"]["mb_per_s"] - 460_000 / 65_000) < 1e-6
        assert stats["transfer"]["longest"]["label"] == SHARED.label
        # And the table renders, and an unknown migration is a 404
        console = Console(width=200, record=True)
        console.print(render_stats(stats))
        table = console.export_text()
        assert "318.0 GB" in table and "287.0 GB" in table and "7.1 MB/s" in table
        assert intake.client.get("/migrations/nope/stats", headers=AUTH).status_code == 404
        assert intake.client.get("/stats", headers=AUTH).json()["archives"]["total"] == 4
