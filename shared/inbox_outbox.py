"""Inbox and outbox in a service's own database, and the unit of work that holds both.

A handler claims the message id in the inbox, applies its change and adds its outgoing
events to the outbox in one transaction. A relay publishes the outbox afterwards, so a
crash between commit and publish loses nothing and a redelivery changes nothing.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from types import TracebackType

from sqlalchemy import (
    BigInteger,
    Column,
    Connection,
    Engine,
    Float,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    insert,
)

from shared.contracts import Event
from shared.db import insert_ignoring_conflicts
from shared.envelope import Envelope

metadata = MetaData()

inbox_table = Table(
    "inbox",
    metadata,
    Column("message_id", String(36), primary_key=True),
    Column("handler", String(100), primary_key=True),
    Column("received_at", Float, nullable=False),
)

outbox_table = Table(
    "outbox",
    metadata,
    Column("seq", BigInteger().with_variant(Integer, "sqlite"), primary_key=True,
           autoincrement=True),
    Column("message_id", String(36), nullable=False, unique=True),
    Column("routing_key", String(255), nullable=False),
    Column("body", Text, nullable=False),
    Column("created_at", Float, nullable=False),
    Column("published_at", Float, nullable=True),
    Index("ix_outbox_unpublished", "published_at", "seq"),
)


class Inbox:
    def __init__(self, connection: Connection) -> None:
        self._connection = connection

    def claim(self, message_id: object, handler: str) -> bool:
        """True the first time (message, handler) is seen; False for a duplicate or replay."""
        return insert_ignoring_conflicts(self._connection, inbox_table, {
            "message_id": str(message_id), "handler": handler, "received_at": time.time()})


class Outbox:
    def __init__(self, connection: Connection) -> None:
        self._connection = connection
        self.added: list[Envelope] = []

    def add(self, event: Event, *, migration_id: str, cause: Envelope | None = None) -> Envelope:
        """Queue `event` for publishing once the transaction commits."""
        envelope = Envelope.wrap(event, migration_id=migration_id, cause=cause)
        self._connection.execute(
            insert(outbox_table).values(
                message_id=str(envelope.id),
                routing_key=envelope.routing_key,
                body=envelope.model_dump_json(),
                created_at=time.time(),
            )
        )
        self.added.append(envelope)
        return envelope


class UnitOfWork:
    """One transaction on the service's database, with its inbox and outbox.

    `with uow:` opens it; `uow.commit()` commits and wakes the relay and the job workers;
    leaving the block without commit rolls back. Not reentrant; make one per message.
    """

    def __init__(self, engine: Engine, on_commit: Callable[[], None] | None = None) -> None:
        self._engine = engine
        self._on_commit = on_commit

    def __enter__(self) -> UnitOfWork:
        self.connection = self._engine.connect()
        self._transaction = self.connection.begin()
        self.inbox = Inbox(self.connection)
        self.outbox = Outbox(self.connection)
        self.committed = False
        return self

    def commit(self) -> None:
        self._transaction.commit()
        self.committed = True
        if self._on_commit is not None:
            self._on_commit()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        try:
            if not self.committed and self._transaction.is_active:
                self._transaction.rollback()
        finally:
            self.connection.close()


class Units:
    """Makes units of work on one service's database; after each commit it wakes whatever
    subscribed (the runtime subscribes the service's relay and job workers)."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self._subscribers: list[Callable[[], None]] = []

    def __call__(self) -> UnitOfWork:
        return UnitOfWork(self.engine, on_commit=self.wake)

    def subscribe(self, wake: Callable[[], None]) -> None:
        self._subscribers.append(wake)

    def wake(self) -> None:
        for wake in list(self._subscribers):
            wake()
