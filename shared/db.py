"""Engines and Alembic for each service's own database (SQLite file or PostgreSQL)."""

from __future__ import annotations

import zlib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from alembic import command, context
from alembic.config import Config
from sqlalchemy import Connection, Engine, MetaData, Table, create_engine, event, exc, text
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import make_url

from shared.errors import ConfigurationError


def make_engine(url: str) -> Engine:
    """An engine for a service database. SQLite gets WAL, a busy timeout and BEGIN IMMEDIATE.

    Raises sqlalchemy.exc.ArgumentError for a URL SQLAlchemy cannot parse.
    """
    parsed = make_url(url)
    if parsed.get_backend_name() != "sqlite":
        return create_engine(url, pool_pre_ping=True, pool_size=10, max_overflow=10)
    if parsed.database and parsed.database != ":memory:":
        Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)
    engine = create_engine(url, connect_args={"check_same_thread": False, "timeout": 30})

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        # Let SQLAlchemy, not pysqlite, decide when transactions begin (so BEGIN IMMEDIATE works).
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA busy_timeout=30000")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.close()

    @event.listens_for(engine, "begin")
    def _on_begin(connection: Any) -> None:
        # Take the write lock up front: a deferred transaction that later writes can fail
        # with "database is locked" instead of waiting its turn.
        connection.exec_driver_sql("BEGIN IMMEDIATE")

    return engine


def dialect_insert(connection: Connection, table: Table) -> Any:
    """INSERT for this connection's database, with its ON CONFLICT clauses (PostgreSQL and
    SQLite spell them alike). Raises ConfigurationError for any other database."""
    dialect = connection.dialect.name
    if dialect == "postgresql":
        return postgresql.insert(table)
    if dialect == "sqlite":
        return sqlite.insert(table)
    raise ConfigurationError(f"Ferry runs on PostgreSQL or SQLite, not {dialect}")


def insert_ignoring_conflicts(connection: Connection, table: Table,
                              values: Mapping[str, Any]) -> bool:
    """INSERT, doing nothing when a unique key already exists (on PostgreSQL after waiting
    for a concurrent inserter to commit). True when the row was inserted."""
    statement = dialect_insert(connection, table).values(dict(values)).on_conflict_do_nothing()
    return bool(connection.execute(statement).rowcount == 1)


def is_unreachable(error: BaseException) -> bool:
    """True when `error` says the database could not be reached or the connection to it
    broke (an outage: no fault of the message being handled), not a failed statement.
    PostgreSQL reports a statement's failure with an SQLSTATE; a refused, reset or timed-out
    connection has none. SQLite is a local file: it has no outage."""
    if isinstance(error, exc.DBAPIError) and error.connection_invalidated:
        return True
    if not isinstance(error, exc.OperationalError | exc.InterfaceError):
        return False
    original = error.orig
    return (type(original).__module__.startswith("psycopg2")
            and getattr(original, "pgcode", None) is None)


def is_postgres(engine: Engine) -> bool:
    return engine.dialect.name == "postgresql"


@dataclass(frozen=True)
class Schema:
    """A service's database schema: its name (its version table is alembic_version_<name>)
    and the folder of its Alembic scripts, which the service itself names."""

    name: str
    migrations: Path


def upgrade(engine: Engine, schema: Schema) -> None:
    """Bring a service's database to its newest revision (own version table per service).

    Concurrent callers on PostgreSQL serialise on an advisory lock. Raises
    alembic.util.CommandError when the scripts are missing or inconsistent.
    """
    config = Config()
    service = schema.name
    config.set_main_option("script_location", str(schema.migrations))
    config.attributes["version_table"] = f"alembic_version_{service}"
    with engine.connect() as connection:
        if is_postgres(engine):
            key = zlib.crc32(f"ferry-migrate-{service}".encode())
            connection.execute(text("SELECT pg_advisory_lock(:k)"), {"k": key})
            connection.commit()
        try:
            config.attributes["connection"] = connection
            command.upgrade(config, "head")
            connection.commit()
        finally:
            if is_postgres(engine):
                connection.execute(text("SELECT pg_advisory_unlock(:k)"), {"k": key})
                connection.commit()


def run_migrations(target_metadata: MetaData | list[MetaData]) -> None:
    """Body of every service's migrations/env.py: online migrations on the given connection."""
    connection = context.config.attributes["connection"]
    context.configure(
        connection=connection,
        target_metadata=target_metadata,
        version_table=context.config.attributes["version_table"],
        render_as_batch=connection.dialect.name == "sqlite",
    )
    with context.begin_transaction():
        context.run_migrations()
