"""What "arrived intact" means: every archive at the destination, extracted, equals its
source tree; every database dump, restored, equals its source rows."""

from __future__ import annotations

import json
import subprocess
import uuid
from pathlib import Path
from typing import Any

import pymysql
from sqlalchemy import create_engine, func, select

from services.archiver.sources import ROOT_EXCLUDES, excluded_by, server_root_excludes
from services.archiver.tables import archive_jobs
from services.intake.tables import migration_jobs
from services.snapshotter.tables import snapshot_jobs
from services.transfer.tables import transfers
from shared.contracts import ArchiveSource
from shared.digests import file_sha256
from tests.support.trees import describe


def rows(url: str, query: Any) -> list[Any]:
    """The rows `query` selects from the database at `url` (its own engine, disposed)."""
    engine = create_engine(url)
    try:
        with engine.connect() as connection:
            return list(connection.execute(query))
    finally:
        engine.dispose()


def jobs_of(intake_db_url: str, migration_id: str) -> list[Any]:
    return rows(intake_db_url, select(migration_jobs).where(
        migration_jobs.c.migration_id == migration_id))


def _decompress(path: Path) -> list[str]:
    return ["zstd", "-dcq", str(path)] if path.suffix == ".zst" else ["gzip", "-dc", str(path)]


def _excluded(rel: str, excludes: list[str], contents_of: list[str]) -> bool:
    return (any(rel == e or rel.startswith(e + "/") for e in excludes)
            or any(rel.startswith(e + "/") for e in contents_of))


def check_tree(archive: Path, source: Path, excludes: list[str], scratch: Path,
               contents_of: tuple[str, ...] = (), patterns: list[str] | None = None) -> None:
    """Extract `archive` and compare it entry by entry with `source`, less `excludes`, the
    contents (not the directories) of `contents_of` and what tar `patterns` leave out."""
    out = scratch / uuid.uuid4().hex
    out.mkdir(parents=True)
    decompress = subprocess.Popen(_decompress(archive), stdout=subprocess.PIPE)
    subprocess.run(["tar", "-xpf", "-", "-C", str(out), "--numeric-owner"],
                   stdin=decompress.stdout, check=True)
    assert decompress.wait() == 0
    wanted = [e.strip("/").removeprefix("./") for e in excludes]
    emptied = [e.strip("/") for e in contents_of]
    expected = {rel: entry for rel, entry in describe(source).items()
                if rel != "." and not _excluded(rel, wanted, emptied)
                and not excluded_by(f"./{rel}", patterns or [])}
    got = {rel: entry for rel, entry in describe(out).items() if rel != "."}
    missing = sorted(set(expected) - set(got))[:5]
    extra = sorted(set(got) - set(expected))[:5]
    assert not missing and not extra, f"{archive.name}: missing {missing}, extra {extra}"
    different = [rel for rel in expected if expected[rel] != got[rel]][:5]
    assert not different, f"{archive.name}: differs at {different}"


def dump_rows(database: str, mysql_host: str = "127.0.0.1") -> dict[str, list[Any]]:
    connection = pymysql.connect(host=mysql_host, user="root", database=database)
    with connection.cursor() as cursor:
        cursor.execute("SHOW TABLES")
        tables = [row[0] for row in cursor.fetchall()]
        rows = {}
        for table in tables:
            cursor.execute(f"SELECT * FROM `{table}` ORDER BY 1")  # noqa: S608 - SHOW TABLES names
            rows[table] = list(cursor.fetchall())
    connection.close()
    return rows


def check_database(archive: Path, source_database: str) -> None:
    """Restore the dump into a fresh database and compare every row with the source's."""
    restored = f"ferry_restore_{uuid.uuid4().hex[:8]}"
    connection = pymysql.connect(host="127.0.0.1", user="root", autocommit=True)
    with connection.cursor() as cursor:
        cursor.execute(f"CREATE DATABASE `{restored}`")
    try:
        decompress = subprocess.Popen(_decompress(archive), stdout=subprocess.PIPE)
        subprocess.run(["mysql", "-h", "127.0.0.1", "-u", "root", restored],
                       stdin=decompress.stdout, check=True)
        assert decompress.wait() == 0
        source_rows = dump_rows(source_database)
        assert source_rows and all(source_rows.values())
        assert dump_rows(restored) == source_rows
    finally:
        with connection.cursor() as cursor:
            cursor.execute(f"DROP DATABASE IF EXISTS `{restored}`")
        connection.close()


def check_destination(destination: Path, jobs: list[Any], source_database: str | None,
                      scratch: Path) -> int:
    """Every job's archive is in `destination` with its sha256 and its source's content.
    Returns how many archives were checked."""
    checked: set[str] = set()
    for job in jobs:
        assert job.state == "transferred", f"{job.label}: {job.state} {job.errors}"
        archive = job.archive or {}
        path = destination / archive["file_name"]
        assert path.is_file(), f"{job.label}: {path} missing"
        if path.name in checked:
            continue
        checked.add(path.name)
        assert file_sha256(path) == archive["sha256"], f"{job.label}: sha256 differs"
        source = job.source if isinstance(job.source, dict) else json.loads(job.source)
        if job.kind == "database":
            assert source_database, "a database archive without a source database"
            check_database(path, source_database)
        else:
            # a database server's root keeps /proc, /sys … as empty mount points, and is
            # without its scrub list (services.archiver.sources.server_root_excludes)
            emptied = ROOT_EXCLUDES if job.kind == "db_server_root" else ()
            scrub = server_root_excludes(ArchiveSource(
                host="-", excludes=tuple(source.get("excludes") or ()))) if (
                job.kind == "db_server_root") else []
            check_tree(path, Path(source["path"]), list(source.get("excludes") or []), scratch,
                       emptied, scrub)
    return len(checked)


def assert_once(urls: dict[str, str], archives: int) -> None:
    """One archive job per source and one transfer per archive, each done once (`urls`:
    each service's database)."""
    archiver = create_engine(urls["archiver"])
    with archiver.connect() as connection:
        made = connection.execute(
            select(archive_jobs.c.reuse_key, func.count(), func.min(archive_jobs.c.state))
            .group_by(archive_jobs.c.reuse_key)).all()
    archiver.dispose()
    assert len(made) == archives and all(n == 1 and state == "done" for _, n, state in made), (
        made)
    transfer = create_engine(urls["transfer"])
    with transfer.connect() as connection:
        sent = connection.execute(
            select(transfers.c.archive_id, func.count(), func.min(transfers.c.state))
            .group_by(transfers.c.archive_id)).all()
    transfer.dispose()
    assert len(sent) == archives and all(n == 1 and state == "done" for _, n, state in sent), (
        sent)


def snapshots_left(snapshotter_url: str) -> tuple[int, list[Any]]:
    """How many snapshot jobs there are, and those not released yet (active, being created
    or released, failed): each may still hold a snapshot or an export on its host."""
    engine = create_engine(snapshotter_url)
    with engine.connect() as connection:
        rows = connection.execute(select(snapshot_jobs.c.request_id, snapshot_jobs.c.state,
                                         snapshot_jobs.c.phase)).all()
    engine.dispose()
    return len(rows), [row for row in rows if (row.state, row.phase) != ("done", "released")]
