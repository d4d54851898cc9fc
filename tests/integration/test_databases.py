"""Alembic: every service's schema upgrades on SQLite and PostgreSQL and matches its tables."""

from __future__ import annotations

import importlib
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import inspect

from shared.db import make_engine, upgrade
from shared.inbox_outbox import metadata as messaging
from shared.settings import SERVICES

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("service", SERVICES)
@pytest.mark.parametrize("database", ["sqlite", "postgres"])
def test_service_schema_upgrades_and_matches_its_tables(
    service: str, database: str, tmp_path: Path, make_pg_database: Callable[[], str],
) -> None:
    url = make_pg_database() if database == "postgres" else f"sqlite:///{tmp_path}/s.sqlite3"
    engine = make_engine(url)
    # When the schema is upgraded twice (the second is a no-op)
    schema = importlib.import_module(f"services.{service}").SCHEMA
    upgrade(engine, schema)
    upgrade(engine, schema)
    # Then its own version table exists and the tables equal what the code declares
    tables = set(inspect(engine).get_table_names())
    assert f"alembic_version_{service}" in tables and {"inbox", "outbox"} <= tables
    metadata = importlib.import_module(f"services.{service}.tables").metadata
    with engine.connect() as connection:
        context = MigrationContext.configure(connection)
        differences = compare_metadata(context, [messaging, metadata])
    differences = [d for d in differences
                   if not (d[0] == "remove_table" and str(d[1].name).startswith("alembic_version"))]
    assert differences == []
    engine.dispose()


def test_ferry_db_upgrade_creates_every_service_database(tmp_path: Path) -> None:
    env = {**os.environ, "FERRY_STATE_DIR": str(tmp_path)}
    done = subprocess.run([sys.executable, "-m", "ferry", "db", "upgrade"], env=env,
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    for service in SERVICES:
        assert f"{service}: up to date" in done.stdout
        assert (tmp_path / f"{service}.sqlite3").exists()
