"""No phantom migrations: intake believes an event only about a migration it accepted."""

from __future__ import annotations

from pathlib import Path

import pytest
from sqlalchemy import func, select

from ferry.dlq import DeadLetter, list_dead
from services.intake.bootstrap import bootstrap
from services.intake.handlers import HANDLERS
from services.intake.tables import migration_events, migrations
from shared import runtime
from shared.contracts import MigrationCompleted
from shared.envelope import Envelope
from shared.errors import UnknownMigrationError
from shared.settings import Settings
from tests.conftest import Backbone
from tests.integration.test_backbone import publish
from tests.support.helpers import wait_for


def rows(engine: object, table: object) -> int:
    with engine.connect() as connection:  # type: ignore[attr-defined]
        return int(connection.execute(select(func.count()).select_from(table)).scalar_one())  # type: ignore[arg-type]


def forged() -> Envelope:
    return Envelope.wrap(MigrationCompleted(archives=1, bytes=1), migration_id="mig-phantom")


def test_an_event_for_a_migration_never_accepted_changes_nothing(tmp_path: Path) -> None:
    service = bootstrap(Settings(broker_url="memory://", state_dir=tmp_path), serve_api=False)
    envelope = forged()
    with pytest.raises(UnknownMigrationError, match="mig-phantom"):
        runtime.deliver(HANDLERS[envelope.type], envelope.event(), envelope, service.units)
    assert (rows(service.engine, migrations), rows(service.engine, migration_events)) == (0, 0)
    service.engine.dispose()


def test_the_consumer_dead_letters_it_as_unknown(backbone: Backbone, tmp_path: Path) -> None:
    settings = Settings(broker_url=backbone.broker_url, intake_database_url=backbone.db_url,
                        state_dir=tmp_path, outbox_poll_seconds=0.1)
    service = bootstrap(settings, serve_api=False)
    service.start()
    try:
        envelope = forged()
        publish(backbone.broker_url, envelope)
        # (the embedded broker is one per process: other tests' letters may be there too)
        def ours() -> list[DeadLetter]:
            return [letter for letter in list_dead(backbone.broker_url, service.queue.name)
                    if letter.id == str(envelope.id)]

        wait_for(ours, what="the forged event dead-lettered")
        [letter] = ours()
        assert (letter.id, letter.reason) == (str(envelope.id), "unknown")
        assert "never accepted" in letter.error
        assert rows(service.engine, migrations) == 0
    finally:
        service.stop()
        service.engine.dispose()
