"""The crash matrix: for each named crash point (shared.failpoints), one migration of the
small sample site in which the process that reaches the point is SIGKILLed there by the
failpoint and restarted without it; the migration must then complete as if nothing had
happened: one archive per source, one transfer per archive, nothing dead-lettered, no
snapshot or mount left, every archive at the destination identical to its source.

CASES is the table (point, service to arm, why there); MODES the ways of running Ferry
(`rabbitmq`: every service its own process on RabbitMQ + PostgreSQL; `embedded`: the
default, `ferry run all` in one process on the embedded SQLite broker, one SQLite database
per service). A mode is a function that makes a `Deployment`: how to start the processes
(one of them armed), find the armed one, restart it, and read what the checks need.
`run_case` runs one case on any deployment. A point every service reaches (SCOPED) is armed
for the case's service only (`resolver:runtime.after_commit=kill`), so that a case means the
same in both modes. `test_every_point_has_a_case` fails when the code has a point no case
covers.
"""

from __future__ import annotations

import ast
import signal
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import httpx
import pytest
from sqlalchemy import create_engine, func, select

from ferry.demo_site import build_site, drop_database
from ferry.dlq import list_dead
from services.transfer.tables import transfers
from shared.embedded_broker import embedded_url
from shared.failpoints import ENV, POINTS, SCOPED
from shared.settings import SERVICES
from shared.topology import DATACENTER_SERVICES, FIXED_QUEUES
from tests.e2e.checks import (
    assert_once,
    check_destination,
    jobs_of,
    snapshots_left,
)
from tests.e2e.harness import READY, Pipeline, pipeline_env
from tests.support.helpers import wait_for
from tests.support.processes import ROOT, ChildProcess

ARCHIVES = 7  # the small site: 4 VM roots, the replica's root, the shared /data, a database


@dataclass(frozen=True)
class Case:
    """Arm `point` in `service`'s process (with `env`, for that process only, until it
    died); `why`: what a crash there could lose or repeat."""

    point: str
    service: str
    why: str
    env: Mapping[str, str] = field(default_factory=dict)

    @property
    def id(self) -> str:
        return f"{self.point}@{self.service}"

    @property
    def armed(self) -> str:
        """The FERRY_FAILPOINTS value: scoped to the service where every service reaches it."""
        return (f"{self.service}:" if self.point in SCOPED else "") + f"{self.point}=kill"


# Generic points (runtime, relay, jobs) are reached in every service: each is armed where a
# crash there would do the most harm.
CASES: tuple[Case, ...] = (
    Case("runtime.after_commit", "resolver",
         "migration.submitted's handler allocates names and IPs and plans every job: "
         "redelivered after its commit, it must plan nothing twice"),
    Case("runtime.after_commit", "transfer",
         "archive.completed makes a transfer job: redelivered, no second transfer"),
    Case("relay.before_publish", "archiver",
         "archive.completed and the progress events are committed but not yet published: "
         "lost there, the transfer never starts"),
    Case("relay.after_publish", "resolver",
         "the fan-out (snapshot and archive requests for every source) published but not "
         "marked: all of it is published again, every consumer must drop the copies"),
    Case("jobs.after_claim", "archiver",
         "a claimed archive held by a dead worker's lease: taken over once it expires"),
    Case("jobs.after_claim", "transfer",
         "a dead claim holds one of the destination's transfer slots until its lease "
         "expires"),
    Case("snapshotter.after_create", "snapshotter",
         "a snapshot exists that no row says is active: the next claim makes it anew"),
    Case("snapshotter.after_release", "snapshotter",
         "a snapshot torn down, its release not recorded: released again, said once"),
    Case("archiver.mid_stream", "archiver",
         "a partial file in staging: swept, the archive made again from the start"),
    Case("archiver.after_seal", "archiver",
         "a sealed archive no row records: made and sealed again, announced once"),
    # throttled until the kill, so that rsync reports progress before the file is all there
    Case("transfer.mid_rsync", "transfer",
         "part of the archive at the destination: the next rsync appends the rest and "
         "verifies the whole", env={"FERRY_TRANSFER_BWLIMIT_KBPS": "2000"}),
    Case("transfer.after_verify", "transfer",
         "a verified copy no row records: sent again (a no-op), verified, recorded once"),
)


@dataclass
class Site:
    """The small sample site (its trees and MariaDB database), shared by every case."""

    workdir: Path
    database: str

    @property
    def inventory(self) -> Path:
        return self.workdir / "inventory.yaml"

    @property
    def document(self) -> bytes:
        return (self.workdir / "migration.json").read_bytes()


class Deployment(Protocol):
    """What run_case needs of a mode."""

    database_urls: dict[str, str]  # service -> its database
    staging: Path
    destination: Path

    def start(self, armed: str, env: Mapping[str, str]) -> None:
        """Start every process, and wait until they serve; the one running `armed` (a
        service) with `env` added."""

    def process(self, service: str) -> ChildProcess:
        """The process running `service`."""

    def restart(self, service: str) -> None:
        """Start `service`'s process again (it died) without the case's env; wait until
        it serves."""

    def client(self) -> httpx.Client: ...

    def status(self, client: httpx.Client, migration_id: str) -> dict[str, Any] | None: ...

    def dead_letters(self) -> dict[str, list[Any]]:
        """Every dead-letter queue's letters, by work queue."""

    def tail(self) -> str: ...

    def stop(self) -> None: ...


class OnPipeline:
    """What both modes read the same way from their processes (a Pipeline) and broker."""

    pipeline: Pipeline
    broker_url: str

    def client(self) -> httpx.Client:
        return self.pipeline.client()

    def status(self, client: httpx.Client, migration_id: str) -> dict[str, Any] | None:
        return self.pipeline.status(client, migration_id)

    def dead_letters(self) -> dict[str, list[Any]]:
        queues = [*FIXED_QUEUES, *(f"{s}.{self.pipeline.datacenter}" for s in DATACENTER_SERVICES)]
        return {queue: list_dead(self.broker_url, queue) for queue in queues}

    def tail(self) -> str:
        return self.pipeline.tail()

    def stop(self) -> None:
        self.pipeline.stop_all()


class ScaleOut(OnPipeline):
    """Mode `rabbitmq`: every service its own `ferry run` process on RabbitMQ + PostgreSQL,
    one archiver (so the armed one does all the archiving)."""

    def __init__(self, site: Site, workdir: Path, broker_url: str,
                 database_urls: dict[str, str]) -> None:
        self.broker_url = broker_url
        self.database_urls = database_urls
        self.staging = workdir / "staging"
        self.destination = workdir / "destination"
        self.pipeline = Pipeline(pipeline_env(workdir, site.inventory, broker_url,
                                              database_urls), archivers=1)

    @staticmethod
    def _name(service: str) -> str:
        return "archiver-1" if service == "archiver" else service

    def start(self, armed: str, env: Mapping[str, str]) -> None:
        self.pipeline.start_all_with(self._name(armed), env)

    def process(self, service: str) -> ChildProcess:
        return self.pipeline.processes[self._name(service)]

    def restart(self, service: str) -> None:
        started = self.process(service).log().count(READY)  # its log has the earlier run's
        self.pipeline.spawn(self._name(service))
        _wait_started(self.process(service), started)
        if service == "intake":
            self.pipeline.wait_for_api()


def _wait_started(process: ChildProcess, earlier: int) -> None:
    """Wait for this start's ready line, after the `earlier` ones of its log."""
    process.wait_ready(lambda: process.log().count(READY) > earlier)


def scale_out(request: pytest.FixtureRequest, site: Site, workdir: Path) -> Deployment:
    make_pg_database: Callable[[], str] = request.getfixturevalue("make_pg_database")
    urls = {service: make_pg_database() for service in SERVICES}
    return ScaleOut(site, workdir, request.getfixturevalue("rabbit_url"), urls)


class Embedded(OnPipeline):
    """Mode `embedded`: `ferry run all` (every service, one process) on the default broker,
    the SQLite one in FERRY_STATE_DIR, each service with its SQLite database there. Every
    service is that process: the armed one, the one that dies and the one restarted."""

    def __init__(self, site: Site, workdir: Path) -> None:
        state = workdir / "state"
        self.database_urls = {service: f"sqlite:///{state}/{service}.sqlite3"
                              for service in SERVICES}
        self.staging = workdir / "staging"
        self.destination = workdir / "destination"
        env = pipeline_env(workdir, site.inventory, "", {})
        env.pop("FERRY_BROKER_URL")  # the default: the embedded broker in the state dir
        self.broker_url = embedded_url(state)
        self.pipeline = Pipeline(env, archivers=0)

    def start(self, armed: str, env: Mapping[str, str]) -> None:
        self.pipeline.spawn("all", env)
        self.pipeline.processes["all"].wait_ready(READY)
        self.pipeline.wait_for_api()

    def process(self, service: str) -> ChildProcess:
        return self.pipeline.processes["all"]

    def restart(self, service: str) -> None:
        started = self.process(service).log().count(READY)
        self.pipeline.spawn("all")  # the same command, without the case's env
        _wait_started(self.process(service), started)
        self.pipeline.wait_for_api()


def embedded(request: pytest.FixtureRequest, site: Site, workdir: Path) -> Deployment:
    return Embedded(site, workdir)


MODES: dict[str, Callable[[pytest.FixtureRequest, Site, Path], Deployment]] = {
    "rabbitmq": scale_out,
    "embedded": embedded,
}


# -- one case -------------------------------------------------------------------------------

def run_case(case: Case, deployment: Deployment, site: Site, scratch: Path) -> None:
    """Given every process started, `case.service`'s armed with `case.point=kill`; when a
    migration is submitted, that process dies by SIGKILL at the point and is restarted
    without it; then the migration completes with every check of a clean run."""
    try:
        deployment.start(case.service, {ENV: case.armed, **case.env})  # stopped if it fails
        with deployment.client() as client:
            migration_id = _submit(client, site)
            _crashed_at_the_point(case, deployment, client, migration_id)
            deployment.restart(case.service)
            status = _finished(deployment, client, migration_id, timeout=240)
            assert status and status["status"] == "completed", (status, deployment.tail())
        check_migration(deployment, site, migration_id, scratch)
    finally:
        deployment.stop()


def _submit(client: httpx.Client, site: Site) -> str:
    response = client.post("/migrations", content=site.document,
                           headers={"Content-Type": "application/json"})
    assert response.status_code == 202, response.text
    return str(response.json()["id"])


def _crashed_at_the_point(case: Case, deployment: Deployment, client: httpx.Client,
                          migration_id: str, timeout: float = 120) -> None:
    """Wait until the armed process died; it must have died by SIGKILL at the point (its
    log says so), before the migration could finish without it."""
    process = deployment.process(case.service)
    deadline = time.monotonic() + timeout
    status = None
    while process.running and time.monotonic() < deadline:
        status = deployment.status(client, migration_id) or status
        assert not (status and status["status"] in {"completed", "failed"}), (
            f"{case.point} was never reached in {case.service}: the migration ended "
            f"{status['status']} with it armed\n{deployment.tail()}")
        time.sleep(0.1)
    assert not process.running, f"{case.service} did not reach {case.point} in {timeout}s"
    assert process.returncode == -signal.SIGKILL, (process.returncode, process.tail())
    # in the case's service: a point every service reaches says where it fired
    said = f"failpoint {case.point}: kill (hit 1" + (
        f" in {case.service})" if case.point in SCOPED else ")")
    assert said in process.log(), (said, process.tail())


def _finished(deployment: Deployment, client: httpx.Client, migration_id: str,
              timeout: float) -> dict[str, Any] | None:
    deadline = time.monotonic() + timeout
    status = None
    while time.monotonic() < deadline:
        status = deployment.status(client, migration_id) or status
        if status and status["status"] in {"completed", "failed"}:
            break
        time.sleep(0.25)
    return status


def check_migration(deployment: Deployment, site: Site, migration_id: str,
                    scratch: Path) -> None:
    """What a clean run leaves: every archive at the destination equal to its source, each
    made and sent once, nothing half-done, nothing dead, no snapshot or mount left."""
    urls = deployment.database_urls
    jobs = jobs_of(urls["intake"], migration_id)
    destination = deployment.destination / migration_id
    assert check_destination(destination, jobs, site.database, scratch) == ARCHIVES
    # each archive and its manifest
    assert len([p for p in destination.iterdir()]) == 2 * ARCHIVES, sorted(destination.iterdir())
    assert_once(urls, ARCHIVES)
    staged = sorted(p.name for p in deployment.staging.rglob("*") if p.is_file())
    assert len(staged) == 2 * ARCHIVES and not [n for n in staged if "partial" in n], staged
    dead = {queue: letters for queue, letters in deployment.dead_letters().items() if letters}
    assert not dead, dead
    # a release is not on the migration's path: one cut short is redone once its lease
    # expires, after the migration completed
    try:
        wait_for(lambda: not snapshots_left(urls["snapshotter"])[1], timeout=60,
                 what="every snapshot released")
    except AssertionError:
        raise AssertionError(f"snapshots left: {snapshots_left(urls['snapshotter'])[1]}\n"
                             f"{deployment.tail()}") from None
    # one snapshot per VM filesystem archived (driver `none` on this site: nothing to mount)
    assert snapshots_left(urls["snapshotter"])[0] == sum(j.kind == "local_fs" for j in jobs)
    mounts = Path("/proc/self/mounts").read_text()
    assert str(deployment.staging.parent) not in mounts, "a mount is left"


# -- the matrix -----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Site]:
    workdir = tmp_path_factory.mktemp("crash-site")
    built, why = build_site(workdir, "small", "127.0.0.1:3306")
    assert why is None and built.database, f"the sample database could not be made: {why}"
    yield Site(workdir, built.database)
    drop_database("127.0.0.1:3306", built.database)


@pytest.mark.parametrize(("mode", "case"), [(mode, case) for mode in MODES for case in CASES],
                         ids=[f"{mode}-{case.id}" for mode in MODES for case in CASES])
def test_a_crash_at_a_named_point_changes_nothing(
    mode: str, case: Case, site: Site, tmp_path: Path, request: pytest.FixtureRequest,
) -> None:
    deployment = MODES[mode](request, site, tmp_path / "run")
    run_case(case, deployment, site, tmp_path / "scratch")


def test_unscoped_in_one_process_a_generic_point_fires_in_another_service(
    site: Site, tmp_path: Path,
) -> None:
    # Given `ferry run all` armed with the transfer's claim case, but without its scope
    deployment = Embedded(site, tmp_path / "run")
    try:
        deployment.start("transfer", {ENV: "jobs.after_claim=kill"})
        # When a migration is submitted, the process dies at a job's claim
        with deployment.client() as client:
            _submit(client, site)
        process = deployment.process("transfer")
        wait_for(lambda: not process.running, timeout=60, what="run all to die")
        assert process.returncode == -signal.SIGKILL, process.tail()
        assert "failpoint jobs.after_claim: kill (hit 1)" in process.log()
        # Then it was another service's claim (the snapshotter's, the first job there is):
        # the transfer had not a job yet, so the case would not test what it says
        engine = create_engine(deployment.database_urls["transfer"])
        with engine.connect() as connection:
            assert connection.execute(select(func.count()).select_from(transfers)).scalar() == 0
        engine.dispose()
    finally:
        deployment.stop()


def failpoint_calls(root: Path) -> dict[str, list[str]]:
    """Every `failpoint("name")` call in shared/, services/ and ferry/: name -> where (with
    " scope=" after it where the call passes a scope). A call whose name is not a string
    literal fails the test (it could not be checked)."""
    found: dict[str, list[str]] = {}
    for path in sorted(p for d in ("shared", "services", "ferry")
                       for p in (root / d).rglob("*.py")):
        tree = ast.parse(path.read_text(), str(path))
        for node in ast.walk(tree):
            if not isinstance(node, ast.Call):
                continue
            func = node.func
            name = func.id if isinstance(func, ast.Name) else (
                func.attr if isinstance(func, ast.Attribute) else None)
            if name != "failpoint":
                continue
            where = f"{path.relative_to(root)}:{node.lineno}"
            argument = node.args[0] if node.args else None
            assert isinstance(argument, ast.Constant) and isinstance(argument.value, str), (
                f"{where}: failpoint() needs its name as a string literal")
            scoped = any(keyword.arg == "scope" for keyword in node.keywords)
            found.setdefault(argument.value, []).append(where + (" scope=" if scoped else ""))
    return found


def test_the_scan_finds_every_call_and_refuses_a_name_it_cannot_read(tmp_path: Path) -> None:
    # Given a tree with a failpoint called directly, through its module, and by a variable
    (tmp_path / "shared").mkdir()
    (tmp_path / "services" / "x").mkdir(parents=True)
    (tmp_path / "ferry").mkdir()
    (tmp_path / "shared" / "a.py").write_text('failpoint("a.one")\n')
    (tmp_path / "services" / "x" / "b.py").write_text(
        'failpoints.failpoint("b.two", scope=self.name)\n')
    assert failpoint_calls(tmp_path) == {"a.one": ["shared/a.py:1"],
                                         "b.two": ["services/x/b.py:1 scope="]}
    (tmp_path / "ferry" / "c.py").write_text('name = "c"\nfailpoint(name)\n')
    with pytest.raises(AssertionError, match="ferry/c.py:2"):
        failpoint_calls(tmp_path)


def test_every_point_has_a_case() -> None:
    # Given the points declared, and those the code reaches
    calls = failpoint_calls(ROOT)
    # Then they are the same: none declared and never placed, none placed undeclared
    assert set(calls) == set(POINTS), {"declared, not in the code": set(POINTS) - set(calls),
                                       "in the code, not declared": set(calls) - set(POINTS)}
    # And each is placed once, and every one has a case in the matrix (and no case a point
    # that does not exist)
    assert all(len(places) == 1 for places in calls.values()), calls
    # And exactly the points every service reaches pass the service they run for
    scoped = {name for name, places in calls.items() if places[0].endswith(" scope=")}
    assert scoped == SCOPED, {"scoped, not in SCOPED": scoped - SCOPED,
                              "in SCOPED, called without scope=": SCOPED - scoped}
    covered = {case.point for case in CASES}
    assert covered == set(POINTS), {"no case": set(POINTS) - covered,
                                    "no such point": covered - set(POINTS)}
    assert len({case.id for case in CASES}) == len(CASES)
