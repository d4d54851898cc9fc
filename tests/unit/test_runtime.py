"""The lifecycle the runtime owns, on SQLite: the one retry policy, the delivery of a message
to a handler (`shared.runtime.deliver`), and how the job worker applies an outcome
(`shared.jobs.JobWorker.settle`)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, ClassVar

import pytest
from sqlalchemy import Column, Engine, Integer, MetaData, String, Table, func, insert, select

from shared.contracts import Event
from shared.db import make_engine
from shared.envelope import Envelope
from shared.errors import (
    LeaseLostError,
    PermanentError,
    ServiceStoppingError,
    TransientError,
)
from shared.inbox_outbox import UnitOfWork, Units, inbox_table, outbox_table
from shared.inbox_outbox import metadata as messaging
from shared.jobs import (
    DONE,
    FAILED,
    PENDING,
    RUNNING,
    Done,
    Failed,
    JobWorker,
    Lease,
    Leases,
    Outcome,
    RetryIn,
    job_table,
    new_job_values,
    outcome_of,
)
from shared.retry import RetryPolicy
from shared.runtime import Context, deliver, deliver_failure, handler_name
from shared.settings import Settings


class Noted(Event):
    TYPE: ClassVar[str] = "test.noted"
    text: str


metadata = MetaData()
notes = Table("notes", metadata, Column("id", Integer, primary_key=True, autoincrement=True),
              Column("text", String(100), nullable=False))
jobs = job_table("runtime_jobs", metadata)


@pytest.fixture
def engine(tmp_path: Path) -> Iterator[Engine]:
    made = make_engine(f"sqlite:///{tmp_path}/runtime.sqlite3")
    messaging.create_all(made)
    metadata.create_all(made)
    yield made
    made.dispose()


@pytest.fixture
def units(engine: Engine) -> Units:
    return Units(engine)


def count(engine: Engine, table: Table, *where: Any) -> int:
    with engine.connect() as connection:
        return int(connection.execute(select(func.count()).select_from(table).where(*where))
                   .scalar_one())


def note(connection: Any, text: str) -> None:
    connection.execute(insert(notes).values(text=text))


# -- the retry policy ---------------------------------------------------------------------


def test_policy_tiers_step_through_the_delays_and_stay_on_the_last() -> None:
    policy = RetryPolicy((1.0, 5.0, 30.0), max_attempts=5)
    assert [policy.tier(n) for n in range(0, 7)] == [1.0, 1.0, 5.0, 30.0, 30.0, 30.0, 30.0]


class _Fixed:
    def __init__(self, value: float) -> None:
        self.value = value

    def random(self) -> float:
        return self.value


@pytest.mark.parametrize("attempts, tier", [(1, 1.0), (2, 5.0), (9, 30.0)])
def test_policy_delay_is_the_tier_with_equal_jitter(monkeypatch: pytest.MonkeyPatch,
                                                    attempts: int, tier: float) -> None:
    policy = RetryPolicy((1.0, 5.0, 30.0), max_attempts=5)
    # The bounds: half the tier fixed, the other half random
    for randomness, expected in [(0.0, tier / 2), (0.5, tier * 0.75), (0.999999, tier)]:
        monkeypatch.setattr("shared.retry.secrets.SystemRandom", lambda r=randomness: _Fixed(r))
        assert policy.delay(attempts) == pytest.approx(expected, rel=1e-5)
    monkeypatch.undo()
    # And for real: always inside them, and not all the same (jobs failing together spread)
    samples = [policy.delay(attempts) for _ in range(200)]
    assert all(tier / 2 <= s <= tier for s in samples)
    assert len(set(samples)) > 100


def test_policy_is_exhausted_at_max_attempts() -> None:
    policy = RetryPolicy((1.0,), max_attempts=3)
    assert [policy.exhausted(n) for n in range(5)] == [False, False, False, True, True]


def test_exponential_policy_doubles_up_to_its_cap() -> None:
    policy = RetryPolicy.exponential(base=1.0, cap=10.0, max_attempts=6)
    assert policy.delays == (1.0, 2.0, 4.0, 8.0, 10.0, 10.0) and policy.max_attempts == 6
    assert policy.tier(4) == 8.0 and policy.tier(20) == 10.0


def test_policy_from_settings_serves_the_bus_and_the_jobs() -> None:
    policy = RetryPolicy.from_settings(Settings(retry_delays=(0.5, 2.0), max_attempts=4))
    assert policy == RetryPolicy((0.5, 2.0), 4)


@pytest.mark.parametrize("delays, max_attempts, words", [
    ((), 3, "non-empty"), ((1.0, -1.0), 3, "non-empty"), ((1.0,), 0, "at least 1")])
def test_unusable_policy_is_refused(delays: tuple[float, ...], max_attempts: int,
                                    words: str) -> None:
    with pytest.raises(ValueError, match=words):
        RetryPolicy(delays, max_attempts)


# -- delivering a message to a handler ---------------------------------------------------


calls: list[str] = []


def record_note(event: Noted, ctx: Context[None]) -> None:
    calls.append(event.text)
    note(ctx.connection, event.text)
    ctx.emit(Noted(text=f"{event.text}, noted"))


def record_then_fail(event: Noted, ctx: Context[None]) -> None:
    calls.append(event.text)
    note(ctx.connection, event.text)
    ctx.emit(Noted(text="never"))
    raise TransientError("the host went away mid-way")


def also_record(event: Noted, ctx: Context[None]) -> None:
    note(ctx.connection, f"also {event.text}")


def note_failure(event: Noted, ctx: Context[list[BaseException]],
                 error: BaseException) -> None:
    ctx.deps.append(error)
    note(ctx.connection, f"failed: {error}")


@pytest.fixture(autouse=True)
def no_calls() -> Iterator[None]:
    calls.clear()
    yield
    calls.clear()


def noted(text: str) -> Envelope:
    return Envelope.wrap(Noted(text=text), migration_id="m-1")


def test_delivered_twice_the_handler_runs_once_under_its_qualified_name(
    engine: Engine, units: Units,
) -> None:
    envelope = noted("hello")
    # When one message is delivered twice
    assert deliver(record_note, envelope.event(), envelope, units) is True
    assert deliver(record_note, envelope.event(), envelope, units) is False
    # Then the handler ran once (the duplicate skipped before it was called), its change
    # and its event committed once, and the claim is recorded under module.qualname
    assert calls == ["hello"]
    assert count(engine, notes) == 1 and count(engine, outbox_table) == 1
    with engine.connect() as connection:
        claimed = connection.execute(select(inbox_table.c.message_id,
                                            inbox_table.c.handler)).all()
    assert [tuple(row) for row in claimed] == [(str(envelope.id),
                                                "tests.unit.test_runtime.record_note")]
    assert handler_name(record_note) == "tests.unit.test_runtime.record_note"


def test_emitted_event_is_caused_by_the_message_and_belongs_to_its_migration(
    engine: Engine, units: Units,
) -> None:
    envelope = noted("cause")
    deliver(record_note, envelope.event(), envelope, units)
    with engine.connect() as connection:
        [body] = connection.execute(select(outbox_table.c.body)).scalars().all()
    emitted = Envelope.from_json(body)
    assert (emitted.causation_id, emitted.migration_id) == (envelope.id, "m-1")
    assert emitted.event() == Noted(text="cause, noted")


def test_the_same_event_in_two_envelopes_is_two_messages(units: Units) -> None:
    # The inbox keys on the envelope's id: a new envelope (a replay) is handled again
    first, second = noted("same"), noted("same")
    assert first.id != second.id
    assert [deliver(record_note, e.event(), e, units) for e in (first, second, first)] == [
        True, True, False]
    assert calls == ["same", "same"]


def test_each_handler_of_a_message_gets_it_once(engine: Engine, units: Units) -> None:
    envelope = noted("both")
    results = [deliver(h, envelope.event(), envelope, units)
               for h in (record_note, also_record, record_note, also_record)]
    assert results == [True, True, False, False]
    assert count(engine, inbox_table) == 2 and count(engine, notes) == 2


def test_a_raising_handler_rolls_back_and_its_claim_is_not_kept(engine: Engine,
                                                                 units: Units) -> None:
    envelope = noted("flaky")
    woken: list[str] = []
    units.subscribe(lambda: woken.append("woken"))
    # When the handler raises after writing and emitting
    with pytest.raises(TransientError, match="went away"):
        deliver(record_then_fail, envelope.event(), envelope, units)
    # Then nothing of it is kept: no change, no event, no inbox claim, nobody woken
    assert (count(engine, notes), count(engine, outbox_table), count(engine, inbox_table)) == (
        0, 0, 0)
    assert woken == []
    # And the redelivery runs the handler again
    with pytest.raises(TransientError):
        deliver(record_then_fail, envelope.event(), envelope, units)
    assert calls == ["flaky", "flaky"]


def test_a_commit_wakes_the_subscribers_a_duplicate_does_not(units: Units) -> None:
    woken: list[str] = []
    units.subscribe(lambda: woken.append("relay"))
    units.subscribe(lambda: woken.append("worker"))
    envelope = noted("wake")
    deliver(record_note, envelope.event(), envelope, units)
    assert woken == ["relay", "worker"]
    deliver(record_note, envelope.event(), envelope, units)
    assert woken == ["relay", "worker"]


def test_failure_hook_runs_once_with_the_error(engine: Engine, units: Units) -> None:
    envelope = noted("hopeless")
    errors: list[BaseException] = []
    error = PermanentError("never")
    assert [deliver_failure(note_failure, envelope.event(), envelope, error, units, errors)
            for _ in range(2)] == [True, False]
    assert errors == [error] and count(engine, notes, notes.c.text == "failed: never") == 1


# -- applying a job's outcome ---------------------------------------------------------------


class Jobs:
    """One job table, a worker on it (policy: 1 s then 5 s, three attempts) and a failure
    hook that records what it was called with."""

    def __init__(self, engine: Engine, units: Units) -> None:
        self.engine = engine
        self.units = units
        self.leases = Leases(engine, jobs, lease_seconds=30)
        self.hooked: list[tuple[str, str, str]] = []
        self.hook_answer: Failed | RetryIn | None = None
        self.worker = JobWorker(self.leases, self.work, units=units,
                                policy=RetryPolicy((1.0, 5.0), max_attempts=3),
                                name="test-jobs", fail=self.hook)
        self.outcome: Outcome | BaseException = Done()

    def work(self, lease: Lease) -> Outcome:
        if isinstance(self.outcome, BaseException):
            raise self.outcome
        return self.outcome

    def hook(self, lease: Lease, error: BaseException, uow: UnitOfWork) -> Failed | RetryIn | None:
        # In the failing transaction: the row is still the running job's
        state = uow.connection.execute(select(jobs.c.state).where(jobs.c.id == lease.job_id)
                                       ).scalar_one()
        self.hooked.append((lease.job_id, str(error), state))
        note(uow.connection, f"hook: {error}")
        uow.outbox.add(Noted(text="job failed"), migration_id=lease.job.migration_id)
        return self.hook_answer

    def add(self, job_id: str = "j-1") -> None:
        with self.engine.begin() as connection:
            connection.execute(insert(jobs).values(new_job_values(job_id, "m-1", "k", {})))

    def claim(self, owner: str = "worker-a") -> Lease:
        row = self.leases.claim(owner)
        assert row is not None, "no job to claim"
        return Lease(self.leases, row, owner, self.units)

    def row(self, job_id: str = "j-1") -> Any:
        with self.engine.connect() as connection:
            return connection.execute(select(jobs).where(jobs.c.id == job_id)).one()


@pytest.fixture
def table(engine: Engine, units: Units) -> Jobs:
    made = Jobs(engine, units)
    made.add()
    return made


def record_note_of(text: str) -> Any:
    return lambda uow: note(uow.connection, text)


def test_done_writes_result_and_values_and_runs_record_in_one_transaction(
    table: Jobs, engine: Engine,
) -> None:
    woken: list[str] = []
    table.units.subscribe(lambda: woken.append("woken"))
    lease = table.claim()
    table.worker.settle(lease, Done({"archive": "a-1"}, values={"bytes_done": 42},
                                    record=record_note_of("archived")))
    job = table.row()
    assert (job.state, job.result, job.bytes_done, job.lease_owner, job.attempts) == (
        DONE, {"archive": "a-1"}, 42, None, 1)
    assert count(engine, notes, notes.c.text == "archived") == 1
    assert woken == ["woken"] and table.hooked == []


def test_a_failing_record_leaves_the_job_as_it_was(table: Jobs, engine: Engine) -> None:
    def broken(uow: UnitOfWork) -> None:
        note(uow.connection, "half")
        raise RuntimeError("disk full")

    lease = table.claim()
    with pytest.raises(RuntimeError, match="disk full"):
        table.worker.settle(lease, Done(record=broken))
    assert (table.row().state, table.row().lease_owner) == (RUNNING, "worker-a")
    assert count(engine, notes) == 0


def test_retry_in_gives_the_job_back_with_the_policys_jittered_backoff(table: Jobs) -> None:
    lease = table.claim()
    before = time.time()
    table.worker.settle(lease, RetryIn(None, "host unreachable", values={"bytes_done": 7}))
    job = table.row()
    assert (job.state, job.attempts, job.lease_owner, job.error, job.bytes_done) == (
        PENDING, 1, None, "host unreachable", 7)
    assert before + 0.5 <= job.next_run_at <= time.time() + 1.0  # tier 1 s, equal jitter


def test_retry_in_seconds_is_exact(table: Jobs) -> None:
    lease = table.claim()
    before = time.time()
    table.worker.settle(lease, RetryIn(20.0, "later"))
    assert before + 20.0 <= table.row().next_run_at <= time.time() + 20.0


def test_a_wait_that_is_no_attempt_keeps_the_count(table: Jobs) -> None:
    # Given a job at its last allowed attempt
    for _ in range(2):
        table.worker.settle(table.claim(), RetryIn(0.0, "failed"))
    lease = table.claim()
    assert lease.job.attempts == 3
    # When it waits for a slot (no failed try)
    table.worker.settle(lease, RetryIn(0.0, "host full", counts_as_attempt=False))
    # Then it is not failed, and it has spent only the attempts that failed
    job = table.row()
    assert (job.state, job.attempts, job.error) == (PENDING, 2, "host full")
    assert table.hooked == []
    assert table.claim().job.attempts == 3  # the next claim is its last try again


def test_a_restart_counts_attempts_afresh_even_when_exhausted(table: Jobs) -> None:
    for _ in range(2):
        table.worker.settle(table.claim(), RetryIn(0.0, "failed"))
    lease = table.claim()
    table.worker.settle(lease, RetryIn(0.0, "new snapshot", restart=True))
    job = table.row()
    assert (job.state, job.attempts) == (PENDING, 0) and table.hooked == []


def test_the_last_counted_retry_fails_the_job_and_still_runs_its_record(
    table: Jobs, engine: Engine,
) -> None:
    for _ in range(2):
        table.worker.settle(table.claim(), RetryIn(0.0, "failed"))
    # When the third (last) attempt asks for another
    lease = table.claim()
    table.worker.settle(lease, RetryIn(None, "still unreachable",
                                       record=record_note_of("progress event")))
    # Then the job failed, saying why, its hook ran in the failing transaction (the row
    # still running there), and what the attempt recorded is kept
    job = table.row()
    assert job.state == FAILED and job.lease_owner is None and job.attempts == 3
    assert job.error == "gave up after 3 attempts; the last: still unreachable"
    assert table.hooked == [("j-1", job.error, RUNNING)]
    assert count(engine, notes, notes.c.text == "progress event") == 1
    assert count(engine, notes, notes.c.text.like("hook: %")) == 1
    assert count(engine, outbox_table) == 1


def test_failed_calls_the_hook_in_the_same_transaction_and_writes_its_columns(
    table: Jobs, engine: Engine,
) -> None:
    table.hook_answer = Failed("ignored", values={"bytes_total": 99})
    lease = table.claim()
    table.worker.settle(lease, Failed(PermanentError("bad origin"), values={"bytes_done": 3},
                                      record=record_note_of("recorded")))
    job = table.row()
    assert (job.state, job.error, job.bytes_done, job.bytes_total) == (
        FAILED, "bad origin", 3, 99)
    assert table.hooked == [("j-1", "bad origin", RUNNING)]
    assert count(engine, notes) == 2 and count(engine, outbox_table) == 1


def test_a_hook_may_turn_a_failure_into_another_run(table: Jobs, engine: Engine) -> None:
    table.hook_answer = RetryIn(0.0, "COW too small: again with a larger one", restart=True)
    lease = table.claim()
    table.worker.settle(lease, Failed("COW filled up"))
    job = table.row()
    assert (job.state, job.attempts, job.error) == (
        PENDING, 0, "COW too small: again with a larger one")
    assert count(engine, outbox_table) == 1  # what the hook said is kept


def test_a_lost_lease_writes_nothing(table: Jobs, engine: Engine) -> None:
    lease = table.claim()
    with engine.begin() as connection:  # another worker took the job over meanwhile
        table.leases.update(connection, "j-1", "worker-a", lease_owner="worker-b")
    table.worker.settle(lease, Done({"x": 1}, record=record_note_of("never")))
    job = table.row()
    assert (job.state, job.lease_owner, job.result) == (RUNNING, "worker-b", None)
    assert count(engine, notes) == 0


@pytest.mark.parametrize("error, expected", [
    (ServiceStoppingError("stopping"), RetryIn(0.0, "stopping", counts_as_attempt=False)),
    (PermanentError("bad input"), Failed(PermanentError("bad input"))),
    (TransientError("lost"), RetryIn(None, "shared.errors.TransientError: lost")),
    (KeyError("bug"), RetryIn(None, "KeyError: 'bug'")),
])
def test_what_a_raised_error_means_for_a_job(error: BaseException, expected: Outcome) -> None:
    outcome = outcome_of(error)
    assert type(outcome) is type(expected)
    if isinstance(outcome, RetryIn):
        assert isinstance(expected, RetryIn)
        assert (outcome.seconds, outcome.reason, outcome.counts_as_attempt, outcome.restart) == (
            expected.seconds, expected.reason, expected.counts_as_attempt, expected.restart)
    else:
        assert isinstance(outcome, Failed) and outcome.error is error


def test_a_job_that_raises_is_retried_and_one_that_lost_its_lease_is_left_alone(
    table: Jobs,
) -> None:
    table.outcome = TransientError("cut link")
    assert table.worker.run_one("worker-a") is True
    job = table.row()
    assert (job.state, job.attempts) == (PENDING, 1) and "cut link" in job.error
    with table.engine.begin() as connection:
        connection.execute(jobs.update().values(next_run_at=0.0))
    table.outcome = LeaseLostError("taken over")
    assert table.worker.run_one("worker-a") is True
    assert (table.row().state, table.row().lease_owner) == (RUNNING, "worker-a")


def test_an_error_raised_on_the_last_attempt_is_what_the_job_fails_with(table: Jobs) -> None:
    for _ in range(2):
        table.worker.settle(table.claim(), RetryIn(0.0, "failed"))
    with table.engine.begin() as connection:
        connection.execute(jobs.update().values(next_run_at=0.0))
    table.outcome = TransientError("host unreachable")
    assert table.worker.run_one("worker-a") is True
    job = table.row()
    assert (job.state, job.attempts, job.error) == (FAILED, 3, "host unreachable")
    assert table.hooked == [("j-1", "host unreachable", RUNNING)]
