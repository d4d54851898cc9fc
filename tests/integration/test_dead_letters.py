"""Dead letters that ops can trust: a forged attempt count is dead-lettered once as
malformed (and never breaks the tools for the other letters), and `replay --all` replays
exactly the letters that were there when it started, once each."""

from __future__ import annotations

import pytest

from ferry.dlq import list_dead, replay_dead
from shared.bus import Publisher
from shared.runtime import Service
from shared.topology import ATTEMPTS_HEADER, DEFAULT_EXCHANGE
from tests.integration.test_backbone import (  # noqa: F401 - `running` is the fixture
    count,
    echo_envelope,
    publish,
    running,
)
from tests.support import echo
from tests.support.helpers import wait_for


@pytest.fixture
def service(running: Service) -> Service:  # noqa: F811 - the imported fixture
    """The echo service on a queue of its own, on each backbone (test_backbone's)."""
    return running


def send_with_attempts(service: Service, value: object, text: str) -> str:
    envelope = echo_envelope(text)
    publisher = Publisher(service.settings.broker_url)
    try:
        publisher.publish(envelope.to_json(), exchange=DEFAULT_EXCHANGE,
                          routing_key=service.queue.name, headers={ATTEMPTS_HEADER: value})
    finally:
        publisher.close()
    return str(envelope.id)


@pytest.mark.parametrize("forged", ["abc", 10**12, -1, 2.5])
def test_a_forged_attempt_count_is_dead_lettered_once_and_the_tools_keep_working(
        service: Service, forged: object) -> None:
    url = service.settings.broker_url
    # Given a letter that died honestly (control: a real attempt count) ...
    honest = echo_envelope("honest", fail="permanent")
    publish(url, honest)
    wait_for(lambda: len(list_dead(url, service.queue.name)) == 1, what="the honest letter")
    # When a message arrives whose attempt header is not a count
    bad = send_with_attempts(service, forged, "forged")
    # Then it is dead-lettered at once as malformed, never handled, and only once
    wait_for(lambda: len(list_dead(url, service.queue.name)) == 2, what="the forged letter")
    letters = {letter.id: letter for letter in list_dead(url, service.queue.name)}
    assert letters[bad].reason == "malformed" and ATTEMPTS_HEADER in letters[bad].error
    assert letters[str(honest.id)].reason == "permanent"
    assert count(service, echo.effects) == 0
    # And listing and replaying go on working for every other letter
    replayed = replay_dead(url, service.queue.name, {str(honest.id)})
    assert [letter.id for letter in replayed] == [str(honest.id)]
    wait_for(lambda: len(list_dead(url, service.queue.name)) == 2, what="honest one dead again")


def test_replay_all_replays_each_letter_that_was_there_once(service: Service) -> None:
    url = service.settings.broker_url
    # Given 30 letters that will die again whenever they are replayed
    sent = [echo_envelope(f"doomed-{i}", fail="permanent") for i in range(30)]
    for envelope in sent:
        publish(url, envelope)
    wait_for(lambda: len(list_dead(url, service.queue.name)) == 30, what="30 dead letters")
    # When all are replayed while the consumer runs (and kills each copy again)
    replayed = replay_dead(url, service.queue.name)
    # Then each was replayed exactly once, though its copy came back while the replay ran
    assert sorted(letter.id for letter in replayed) == sorted(str(e.id) for e in sent)
    wait_for(lambda: len(list_dead(url, service.queue.name)) == 30, what="30 dead again")
    assert sorted(letter.id for letter in list_dead(url, service.queue.name)) == sorted(
        str(e.id) for e in sent)
