"""The archive statistics the field report gave, for one migration or all of them.

Counts by kind, the largest archive of each kind raw and compressed, the share of archives
under a size, transfer time and average MB/s, and wall time — read from intake's job view.
An archive reused by several requests counts once.
"""

from __future__ import annotations

from typing import Any

from rich.console import Group
from rich.table import Table
from sqlalchemy import Connection, func, select

from services.intake.tables import migration_jobs, migrations

KINDS = ("local_fs", "shared_fs", "database", "db_server_root")
KIND_NAMES = {"local_fs": "local filesystem", "shared_fs": "shared (GFS) filesystem",
              "database": "database", "db_server_root": "database server root"}
THRESHOLDS = (100 * 10**6, 20 * 10**9, 30 * 10**9)  # the report's 20 GB and 30 GB, and a small one


def migration_stats(connection: Connection, migration_id: str | None = None) -> dict[str, Any]:
    """Statistics for one migration, or every migration when `migration_id` is None."""
    j = migration_jobs
    query = select(j.c.migration_id, j.c.kind, j.c.label, j.c.archive, j.c.transfer)
    if migration_id is not None:
        query = query.where(j.c.migration_id == migration_id)
    archives: dict[str, dict[str, Any]] = {}
    transfers: list[dict[str, Any]] = []
    for row in connection.execute(query):
        if row.archive:
            key = str(row.archive.get("archive_id") or f"{row.migration_id}:{row.label}")
            archives.setdefault(key, {"kind": row.kind, "label": row.label, **row.archive})
        if row.transfer and row.transfer.get("duration_s") is not None:
            transfers.append({"label": row.label, **row.transfer})
    m = migrations
    window = select(func.min(m.c.created_at), func.max(m.c.updated_at), func.count()).where(
        m.c.status == "completed" if migration_id is None else m.c.id == migration_id)
    first, last, count = connection.execute(window).one()
    by_kind = {kind: [a for a in archives.values() if a["kind"] == kind] for kind in KINDS}
    return {
        "migration_id": migration_id,
        "migrations": int(count or 0),
        "archives": {"total": len(archives),
                     "by_kind": {kind: len(items) for kind, items in by_kind.items()}},
        "largest": {kind: _largest(items) for kind, items in by_kind.items() if items},
        "under": [{"kind": kind, "bytes": limit,
                   "share": sum(1 for a in items if a.get("raw_bytes", 0) < limit) / len(items)}
                  for kind, items in by_kind.items() if items for limit in THRESHOLDS],
        "transfer": _transfer(transfers),
        "wall_seconds": (last - first) if first is not None and last is not None else None,
    }


def _largest(items: list[dict[str, Any]]) -> dict[str, Any]:
    top = max(items, key=lambda a: int(a.get("raw_bytes") or 0))
    return {"label": top["label"], "raw_bytes": int(top.get("raw_bytes") or 0),
            "compressed_bytes": int(top.get("compressed_bytes") or 0)}


def _transfer(transfers: list[dict[str, Any]]) -> dict[str, Any]:
    seconds = sum(float(t["duration_s"]) for t in transfers)
    sent = sum(int(t.get("bytes") or 0) for t in transfers)
    longest = max(transfers, key=lambda t: float(t["duration_s"]), default=None)
    return {
        "count": len(transfers), "bytes": sent, "seconds": seconds,
        "mb_per_s": sent / seconds / 1e6 if seconds else None,
        "longest": None if longest is None else {
            "label": longest["label"], "seconds": float(longest["duration_s"]),
            "bytes": int(longest.get("bytes") or 0),
            "mb_per_s": float(longest.get("mb_per_s") or 0)},
    }


def _size(value: float) -> str:
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if value < 1000 or unit == "TB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1000
    return f"{value:.1f} TB"


def render_stats(stats: dict[str, Any], wall_seconds: float | None = None) -> Group:
    """The statistics as rich tables (what `ferry stats` and `ferry demo` print)."""
    title = stats.get("migration_id") or f"all {stats.get('migrations', 0)} completed migrations"
    counts = Table("archives", "count", title=f"archive statistics: {title}")
    counts.add_row("total", str(stats["archives"]["total"]))
    for kind, count in stats["archives"]["by_kind"].items():
        counts.add_row(KIND_NAMES[kind], str(count))
    largest = Table("largest", "source", "raw used", "compressed", "ratio")
    for kind, top in stats["largest"].items():
        ratio = top["raw_bytes"] / top["compressed_bytes"] if top["compressed_bytes"] else 0
        largest.add_row(KIND_NAMES[kind], top["label"], _size(top["raw_bytes"]),
                        _size(top["compressed_bytes"]), f"{ratio:.2f}x")
    limits = sorted({item["bytes"] for item in stats["under"]})
    under = Table("share of archives with raw size under", *(_size(b) for b in limits))
    for kind in KINDS:
        shares = {i["bytes"]: i["share"] for i in stats["under"] if i["kind"] == kind}
        if shares:
            under.add_row(KIND_NAMES[kind], *(f"{shares[b]:.0%}" for b in limits))
    transfer = stats["transfer"]
    moved = Table("transfers", "value")
    moved.add_row("count", str(transfer["count"]))
    moved.add_row("bytes", _size(transfer["bytes"]))
    moved.add_row("time (sum)", f"{transfer['seconds']:.1f} s")
    rate = transfer["mb_per_s"]
    moved.add_row("average", f"{rate:.1f} MB/s" if rate else "-")
    if transfer["longest"]:
        longest = transfer["longest"]
        moved.add_row("longest", f"{longest['label']}: {_size(longest['bytes'])} in "
                                 f"{longest['seconds']:.1f} s ({longest['mb_per_s']:.1f} MB/s)")
    wall = wall_seconds if wall_seconds is not None else stats.get("wall_seconds")
    if wall is not None:
        moved.add_row("wall time", f"{wall:.1f} s")
    return Group(counts, largest, under, moved)
