"""What the services' own databases say right now, read directly (never through a test's
proxy): the moments end-to-end tests act on, instead of sleeping and hoping."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from sqlalchemy import Engine, create_engine, func, select
from sqlalchemy.exc import DBAPIError

from services.archiver.tables import archive_jobs
from services.transfer.tables import transfer_attempts, transfers
from shared.inbox_outbox import inbox_table

T = TypeVar("T")

Probe = Callable[[], object]  # truthy once the moment has come


def not_yet(probe: Callable[[], T]) -> Callable[[], T | None]:
    """`probe`, None while the service has not made its tables yet (or its database is
    unreachable for the moment)."""
    def guarded() -> T | None:
        try:
            return probe()
        except DBAPIError:
            return None
    return guarded


class Databases:
    """One engine per service database (direct URLs), made on first use, disposed at close."""

    def __init__(self, urls: dict[str, str]) -> None:
        self.urls = urls
        self._engines: dict[str, Engine] = {}

    def engine(self, service: str) -> Engine:
        if service not in self._engines:
            self._engines[service] = create_engine(self.urls[service], pool_size=1,
                                                   max_overflow=0)
        return self._engines[service]

    def close(self) -> None:
        for engine in self._engines.values():
            engine.dispose()

    def handled(self, service: str) -> int:
        """How many (message, handler) pairs the service has handled (its inbox)."""
        with self.engine(service).connect() as connection:
            return int(connection.execute(
                select(func.count()).select_from(inbox_table)).scalar_one())

    def archives(self, state: str) -> list[str]:
        """The archive jobs in `state`, as their lease owners (host:pid:…) or ids."""
        t = archive_jobs
        with self.engine("archiver").connect() as connection:
            rows = connection.execute(select(t.c.id, t.c.lease_owner)
                                      .where(t.c.state == state)).all()
        return [row.lease_owner or row.id for row in rows]

    def streaming_archive(self, staging: Path) -> str | None:
        """The lease owner of an archive job `running` whose partial file in staging already
        holds bytes (mid-stream), or None."""
        t = archive_jobs
        with self.engine("archiver").connect() as connection:
            rows = connection.execute(select(t.c.id, t.c.lease_owner)
                                      .where(t.c.state == "running")).all()
        for row in rows:
            partials = staging.rglob(f"{row.id}.*.partial")  # staging/<datacenter>/
            if row.lease_owner and any(_size(p) > 0 for p in partials):
                return str(row.lease_owner)
        return None

    def archives_done(self, count: int) -> bool:
        return len(self.archives("done")) >= count

    def transfer_mid_rsync(self) -> str | None:
        """The owner of a transfer attempt started and not finished (rsync running), or None."""
        a = transfer_attempts
        with self.engine("transfer").connect() as connection:
            row = connection.execute(select(a.c.owner).where(a.c.finished_at.is_(None))
                                     .limit(1)).first()
        return None if row is None else str(row.owner)

    def transfers(self, state: str) -> int:
        with self.engine("transfer").connect() as connection:
            return int(connection.execute(select(func.count()).select_from(transfers)
                                          .where(transfers.c.state == state)).scalar_one())


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0  # renamed into place meanwhile


def pid_of(owner: str) -> int:
    """The PID in a lease owner `host:pid:random`."""
    return int(owner.split(":")[1])
