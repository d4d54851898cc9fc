"""Handlers and jobs hold no lifecycle code: the runtime (shared/runtime.py) owns the inbox
claim and the commit of every message, the job worker (shared/jobs.py) owns a job's attempt
counter, the retry policy (shared/retry.py) owns the tiers.

Checked on the syntax tree of the code, not by grep, so a comment or a docstring naming
`inbox.claim` is no finding, and a savepoint released inside a handler is no commit. The
checker is tried on offending snippets first, so these tests can fail.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
# Everything that is not a test: the library, the services, the application, the benchmarks.
CODE = sorted(p for top in ("shared", "services", "ferry", "bench", "scripts")
              for p in (ROOT / top).rglob("*.py"))
WRITES = {"update", "values", "finish"}  # calls that write columns (and dict.update)


@dataclass(frozen=True)
class Finding:
    path: str
    line: int
    what: str

    def __str__(self) -> str:
        return f"{self.path}:{self.line}: {self.what}"


def _name(node: ast.AST) -> str:
    """The last name of `a.b.c`, `a.b.c()`, or ''."""
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        return node.attr
    if isinstance(node, ast.Call):
        return _name(node.func)
    return ""


def _is_attempts_key(node: ast.AST | None) -> bool:
    return isinstance(node, ast.Constant) and node.value == "attempts"


def _is_zero(node: ast.AST) -> bool:
    return isinstance(node, ast.Constant) and node.value == 0 and not isinstance(
        node.value, bool)


def inbox_uses(tree: ast.AST, path: str) -> list[Finding]:
    """Every `<…>inbox.claim(…)`, every `Inbox(…)` and every `Inbox.<…>`."""
    found = []
    for node in ast.walk(tree):
        if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                and node.func.attr == "claim" and _name(node.func.value).lower() == "inbox"):
            found.append(Finding(path, node.lineno, "claims the inbox"))
        elif isinstance(node, ast.Call) and _name(node.func) == "Inbox":
            found.append(Finding(path, node.lineno, "makes an Inbox"))
        elif (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name)
              and node.value.id == "Inbox"):
            found.append(Finding(path, node.lineno, f"uses Inbox.{node.attr}"))
    return found


def inbox_claims(tree: ast.AST, path: str) -> list[Finding]:
    return [f for f in inbox_uses(tree, path) if f.what == "claims the inbox"]


def _savepoints(tree: ast.AST) -> set[str]:
    """Names bound to `….begin_nested()`: releasing a savepoint is no commit of the unit."""
    names: set[str] = set()
    for node in ast.walk(tree):
        if (isinstance(node, ast.Assign) and isinstance(node.value, ast.Call)
                and _name(node.value.func) == "begin_nested"):
            names.update(t.id for t in node.targets if isinstance(t, ast.Name))
        elif isinstance(node, ast.withitem) and _name(node.context_expr) == "begin_nested" \
                and isinstance(node.optional_vars, ast.Name):
            names.add(node.optional_vars.id)
    return names


def _is_unit_of_work(node: ast.AST) -> bool:
    name = _name(node)
    return "uow" in name.lower() or name in {"units", "UnitOfWork"}


def own_commits(tree: ast.AST, path: str) -> list[Finding]:
    """`.commit()` (but of a savepoint) and `with uow` / `with ….uow()` / `with units()`."""
    savepoints = _savepoints(tree)
    found = []
    for node in ast.walk(tree):
        if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                and node.func.attr == "commit"
                and not (isinstance(node.func.value, ast.Name)
                         and node.func.value.id in savepoints)):
            found.append(Finding(path, node.lineno, "commits"))
        elif isinstance(node, ast.With | ast.AsyncWith):
            found += [Finding(path, node.lineno, f"opens a unit of work "
                                                 f"({ast.unparse(item.context_expr)})")
                      for item in node.items if _is_unit_of_work(item.context_expr)]
    return found


def attempt_writes(tree: ast.AST, path: str) -> list[Finding]:
    """Writes of a job's attempt counter: `attempts` as a column of an update / values /
    finish call or of an outcome's `values=`, `attempts - …`, `attempts -= …`,
    `attempts=0` (but to an event's constructor: events may report a count) and
    `{"attempts": 0}`."""
    found = []

    def add(node: ast.AST, what: str) -> None:
        found.append(Finding(path, getattr(node, "lineno", 0), what))

    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            called = _name(node.func)
            for keyword in node.keywords:
                if keyword.arg == "attempts" and called in WRITES:
                    add(node, f"writes attempts in {called}()")
                elif keyword.arg == "attempts" and _is_zero(keyword.value) and not (
                        called[:1].isupper()):
                    add(node, f"resets attempts in {called}()")
            dicts = [a for a in node.args if isinstance(a, ast.Dict)] if called in WRITES else []
            dicts += [k.value for k in node.keywords
                      if isinstance(k.value, ast.Dict) and (k.arg is None or k.arg == "values")
                      and (called in WRITES or k.arg == "values")]
            if any(_is_attempts_key(key) for d in dicts for key in d.keys):
                add(node, f"writes attempts in {called}()")
        elif (isinstance(node, ast.BinOp) and isinstance(node.op, ast.Sub)
              and _name(node.left) == "attempts"):
            add(node, "counts an attempt back (attempts - …)")
        elif (isinstance(node, ast.AugAssign) and isinstance(node.op, ast.Sub)
              and _name(node.target) == "attempts"):
            add(node, "counts an attempt back (attempts -= …)")
        elif isinstance(node, ast.Dict):
            found += [Finding(path, node.lineno, "resets attempts in a dict")
                      for key, value in zip(node.keys, node.values, strict=True)
                      if _is_attempts_key(key) and _is_zero(value)]
    return sorted(set(found), key=lambda f: f.line)


def retry_tiers(tree: ast.AST, path: str) -> list[Finding]:
    """Indexing a list of delays: `delays[min(…)]`, `settings.retry_delays[…]`."""
    return [Finding(path, node.lineno, f"picks a retry tier ({ast.unparse(node)})")
            for node in ast.walk(tree)
            if isinstance(node, ast.Subscript) and _name(node.value).endswith("delays")]


def check_service(source: str, path: str) -> list[Finding]:
    """What a service module must not do; `path` relative to the repository."""
    tree = ast.parse(source)
    found = inbox_uses(tree, path) + attempt_writes(tree, path)
    if path.startswith("services/") and path.endswith("/handlers.py"):
        found += own_commits(tree, path)
    return found


def _parsed() -> list[tuple[str, ast.AST]]:
    return [(str(p.relative_to(ROOT)), ast.parse(p.read_text(), str(p))) for p in CODE]


# -- the checker finds what it is meant to (negative controls) ------------------------------

OFFENDING_HANDLER = '''
def record_archive(event, envelope, *, uow):
    with uow:
        if not uow.inbox.claim(envelope.id, "record_archive"):
            return
        uow.commit()


def also(event, ctx, service):
    with service.uow() as uow:
        uow.commit()
    Inbox(ctx.connection).claim(ctx.envelope.id, "also")
'''

OFFENDING_JOB = '''
def run(lease, leases, connection, job, t):
    leases.finish(connection, job.id, lease.owner, attempts=job.attempts - 1)
    lease.update(connection, state="pending", attempts=0)
    connection.execute(update(t).values({"attempts": 0, "state": "pending"}))
    values = {"next_run_at": 0.0}
    values.update(attempts=0)
    attempts = job.attempts
    attempts -= 1
    return RetryIn(0, "slot", values={"attempts": attempts})
'''

ALLOWED = '''
def resolve_migration(event, ctx):
    allocating = ctx.connection.begin_nested()
    allocating.commit()  # a savepoint, released inside the runtime's transaction
    with ctx.connection.begin_nested() as inner:
        inner.commit()
    ctx.emit(TransferFailed(request_id="r", archive_id="a", reason="x", attempts=0))
    ctx.connection.execute(update(t).values(rearm_values(error=None)))
    show(attempts=job.attempts, error=job.error)
'''


def test_checker_finds_a_handler_that_claims_the_inbox_and_commits() -> None:
    found = check_service(OFFENDING_HANDLER, "services/archiver/handlers.py")
    assert sorted((f.line, f.what) for f in found if "inbox" in f.what.lower()) == [
        (4, "claims the inbox"), (12, "claims the inbox"), (12, "makes an Inbox")]
    assert sorted((f.line, f.what) for f in own_commits(ast.parse(OFFENDING_HANDLER), "h")) == [
        (3, "opens a unit of work (uow)"), (6, "commits"),
        (10, "opens a unit of work (service.uow())"), (11, "commits")]
    # Outside handlers.py a job may commit what it records while it runs (its progress)
    assert [f for f in check_service(OFFENDING_HANDLER, "services/archiver/jobs.py")
            if "inbox" not in f.what.lower()] == []


def test_checker_finds_every_write_of_the_attempt_counter() -> None:
    found = attempt_writes(ast.parse(OFFENDING_JOB), "services/x/jobs.py")
    assert sorted({f.line for f in found}) == [3, 4, 5, 7, 9, 10], "\n".join(map(str, found))


def test_checker_leaves_savepoints_events_and_reports_alone() -> None:
    assert check_service(ALLOWED, "services/resolver/handlers.py") == []


def test_checker_finds_a_second_tier_formula() -> None:
    tree = ast.parse("delay = self.settings.retry_delays[min(n - 1, len(delays) - 1)]\n"
                     "later = delays[min(attempts, 3)]\n")
    assert [f.line for f in retry_tiers(tree, "services/transfer/jobs.py")] == [1, 2]


# -- the code ---------------------------------------------------------------------------


@pytest.mark.parametrize("path", [p for p in CODE if p.is_relative_to(ROOT / "services")],
                         ids=lambda p: str(p.relative_to(ROOT / "services")))
def test_service_code_holds_no_lifecycle(path: Path) -> None:
    found = check_service(path.read_text(), str(path.relative_to(ROOT)))
    assert found == [], "the runtime owns these:\n" + "\n".join(map(str, found))


def test_one_place_claims_the_inbox() -> None:
    claims = [f for path, tree in _parsed() for f in inbox_claims(tree, path)]
    assert [f.path for f in claims] == ["shared/runtime.py"], "\n".join(map(str, claims))


def test_one_place_picks_the_retry_tier() -> None:
    tiers = [f for path, tree in _parsed() for f in retry_tiers(tree, path)]
    assert [f.path for f in tiers] == ["shared/retry.py"], "\n".join(map(str, tiers))


def test_only_the_job_worker_writes_the_attempt_counter() -> None:
    writes = [f for path, tree in _parsed() for f in attempt_writes(tree, path)]
    assert writes and {f.path for f in writes} == {"shared/jobs.py"}, "\n".join(map(str, writes))
