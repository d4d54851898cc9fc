"""The HTTP inventory adapter against a real HTTP server on 127.0.0.1 that implements the
documented API (docs/inventory-api.md) over examples/inventory.yaml."""

from __future__ import annotations

import logging
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import uvicorn
import yaml
from fastapi import FastAPI, Header
from fastapi.responses import JSONResponse, PlainTextResponse, Response

from services.resolver.bootstrap import bootstrap
from services.resolver.inventory import (
    DatabaseServer,
    Datacenter,
    Environment,
    FileInventory,
    InventoryInvalidError,
    PublicIp,
    UnknownEntityError,
    Vm,
    XenHost,
)
from services.resolver.inventory_http import HttpInventory
from services.resolver.planning import plan_archives
from shared.document import validate_document
from shared.errors import ConfigurationError, TransientError
from tests.integration.test_resolver_backbone import (
    Watch,
    held_by,
    publish_all,
    resolver_settings,
    submitted,
)
from tests.support.helpers import wait_for
from tests.unit.resolver.documents import INVENTORY, example_document

COLLECTIONS = {"datacenters": "datacenters", "xen-hosts": "xen_hosts", "vms": "vms",
               "environments": "environments", "database-servers": "database_servers",
               "public-ips": "public_ips"}
TOKEN = "s3cret"


def inventory_app(path: Path, state: dict[str, str]) -> FastAPI:
    """The documented API: GET /api/<collection>/<name>, bearer token, 404 when unknown.
    `state["mode"]` makes it misbehave: down (503), slow, garbage, wrong-shape, no-owner
    (every entity without its `customer`), no-public-ips (an inventory that does not serve
    that collection: 404 for every address)."""
    data = yaml.safe_load(path.read_text())
    app = FastAPI()

    @app.get("/api/{collection}/{name}")
    def entity(collection: str, name: str,
               authorization: str | None = Header(default=None)) -> Response:
        if authorization != f"Bearer {TOKEN}":
            return JSONResponse({"detail": "unauthorized"}, status_code=401)
        mode = state.get("mode", "ok")
        if mode == "down":
            return JSONResponse({"detail": "maintenance"}, status_code=503)
        if mode == "slow":
            time.sleep(1.0)
        if mode == "garbage":
            return PlainTextResponse("<html>proxy error</html>")
        if mode == "wrong-shape":
            return JSONResponse({"datacenter": "ey04", "ssh": "local"})
        if mode == "no-public-ips" and collection == "public-ips":
            return JSONResponse({"detail": "Not Found"}, status_code=404)
        found = data.get(COLLECTIONS.get(collection, ""), {}).get(name)
        if found is None:
            return JSONResponse({"detail": f"no {collection} named {name}"}, status_code=404)
        if mode == "no-owner":
            return JSONResponse(without_owners(found))
        return JSONResponse(found)

    return app


def without_owners(entity: Any) -> Any:
    """The entity with every `customer` left out, its nested ones too."""
    if isinstance(entity, dict):
        return {k: without_owners(v) for k, v in entity.items() if k != "customer"}
    if isinstance(entity, list):
        return [without_owners(v) for v in entity]
    return entity


class InventoryServer:
    """uvicorn in a thread on a socket bound before it starts (connections are refused until
    then: an unreachable inventory)."""

    def __init__(self) -> None:
        self.socket = socket.socket()
        self.socket.bind(("127.0.0.1", 0))
        self.port = self.socket.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}/api"
        self.state: dict[str, str] = {"mode": "ok"}
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        config = uvicorn.Config(inventory_app(INVENTORY, self.state), log_level="warning")
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._server.run,
                                        kwargs={"sockets": [self.socket]}, daemon=True)
        self._thread.start()
        server = self._server
        wait_for(lambda: server.started, timeout=10, what="the inventory server to start")

    def stop(self) -> None:
        if self._server is not None and self._thread is not None:
            self._server.should_exit = True
            self._thread.join(timeout=10)
        self.socket.close()


@pytest.fixture
def server() -> Iterator[InventoryServer]:
    made = InventoryServer()
    made.start()
    yield made
    made.stop()


@pytest.fixture
def http(server: InventoryServer) -> Iterator[HttpInventory]:
    adapter = HttpInventory(server.url, timeout=0.5, token=TOKEN)
    yield adapter
    adapter.close()


def test_http_adapter_answers_what_the_file_says(http: HttpInventory) -> None:
    # Given the same inventory as a file and behind the HTTP API
    file = FileInventory(INVENTORY)
    document = file.document()
    # Then every entity reads the same through both adapters
    kinds: list[tuple[type[Any], dict[str, Any]]] = [
        (Datacenter, document.datacenters), (XenHost, document.xen_hosts), (Vm, document.vms),
        (Environment, document.environments), (DatabaseServer, document.database_servers),
        (PublicIp, document.public_ips)]  # 2001:db8:20::77 travels percent-encoded
    for model, entities in kinds:
        for name in entities:
            assert http.lookup(model, name) == file.lookup(model, name)
    # And the example plans the same jobs through both
    parsed = validate_document(example_document())
    assert plan_archives(parsed, http, "m") == plan_archives(parsed, file, "m")


def test_404_for_a_vm_is_a_permanent_error_naming_it(http: HttpInventory) -> None:
    with pytest.raises(UnknownEntityError, match="old VM 'ey04-s59999' is not in the inventory"):
        http.lookup(Vm, "ey04-s59999")


def test_inventory_that_does_not_serve_public_ips_refuses_every_old_ip(
        server: InventoryServer, http: HttpInventory) -> None:
    # Given an HTTP inventory without the public-ips collection (404 for every address)
    server.state["mode"] = "no-public-ips"
    parsed = validate_document(example_document())
    # Then a document mapping an old IP is refused, naming it: an address nobody is known
    # to own is never moved on the document's word
    with pytest.raises(UnknownEntityError) as caught:
        plan_archives(parsed, http, "m")
    assert str(caught.value).startswith("old public IP '203.0.113.10' is not in the "
                                        f"inventory ({server.url}: 404)")
    # And (the control) one mapping no old IP plans, as does the same one once it is served
    assert len(plan_archives(validate_document(example_document(public_ips=0)), http,
                             "m").jobs) == 7
    server.state["mode"] = "ok"
    assert len(plan_archives(parsed, http, "m").jobs) == 7


def test_unreachable_down_or_slow_inventory_is_transient(server: InventoryServer,
                                                         http: HttpInventory) -> None:
    closed = InventoryServer()  # bound, never listening: connection refused
    try:
        with pytest.raises(TransientError, match="unreachable"):
            HttpInventory(closed.url, timeout=0.5).lookup(Vm, "ey04-s50000")
    finally:
        closed.stop()
    server.state["mode"] = "down"
    with pytest.raises(TransientError, match="answered 503"):
        http.lookup(Vm, "ey04-s50000")
    server.state["mode"] = "slow"
    with pytest.raises(TransientError, match="timed out"):
        http.lookup(Vm, "ey04-s50000")


def test_answer_that_breaks_the_schema_or_refuses_us_is_permanent(server: InventoryServer,
                                                                  http: HttpInventory) -> None:
    server.state["mode"] = "garbage"
    with pytest.raises(InventoryInvalidError, match="did not answer JSON"):
        http.lookup(Vm, "ey04-s50000")
    server.state["mode"] = "wrong-shape"
    with pytest.raises(InventoryInvalidError,
                       match="invalid old VM 'ey04-s50000': xen_host: Field required"):
        http.lookup(Vm, "ey04-s50000")
    server.state["mode"] = "ok"
    with pytest.raises(ConfigurationError, match="refused us \\(401\\)"):
        HttpInventory(server.url, timeout=0.5, token="wrong").lookup(Vm, "ey04-s50000")


def test_resolver_retries_an_unreachable_inventory_then_resolves(
    tmp_path: Path, caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, logger="shared.bus")
    # Given a resolver whose HTTP inventory is not up yet (embedded broker and database)
    inventory = InventoryServer()
    settings = resolver_settings("memory://", f"sqlite:///{tmp_path}/resolver.sqlite3", tmp_path,
                                 inventory=inventory.url, inventory_token=TOKEN,
                                 retry_delays=(0.3,), max_attempts=20)
    service = bootstrap(settings)
    service.start()
    watch = Watch("memory://")
    try:
        # When a migration arrives, fails to reach the inventory, and the inventory comes up
        publish_all("memory://", [submitted(example_document(), "m-http")])
        wait_for(lambda: any("attempt 2 failed, retrying" in r.getMessage()
                             for r in caplog.records), what="two failed attempts")
        assert watch.of("migration.resolved") == [] and watch.of("migration.failed") == []
        inventory.start()
        # Then a retry resolves it, with the jobs the inventory describes
        resolved = watch.wait("migration.resolved", 1, timeout=30)[0]["payload"]
        assert len(resolved["jobs"]) == 7
        assert resolved["allocations"]["vms"]["vm_1"]["name"] == "tm21-s00101"
        # And a document naming a VM the inventory does not have fails, naming it
        unknown = example_document(local_filesystems=[{"old_vm": "ey04-s59999",
                                                       "new_vm": "vm_1"}])
        publish_all("memory://", [submitted(unknown, "m-unknown")])
        failed = watch.wait("migration.failed", 1, timeout=30)[0]
        assert failed["migration_id"] == "m-unknown"
        assert failed["payload"]["reason"].startswith(
            "old VM 'ey04-s59999' is not in the inventory")
        assert held_by(service.engine, "m-unknown") == 0
    finally:
        service.stop()
        service.engine.dispose()
        watch.close()
        inventory.stop()


@pytest.mark.parametrize("model, name, named", [
    (Vm, "ey04-s50000", "invalid old VM 'ey04-s50000': customer: no owner"),
    (Environment, "ey04-e00075", "invalid old environment 'ey04-e00075': "
                                 "shared_filesystems.0.customer: no owner"),
    (DatabaseServer, "mysql-mega-2-replica",
     "invalid database server 'mysql-mega-2-replica': databases.foobar_production.customer: "
     "no owner"),
    (PublicIp, "203.0.113.10", "invalid old public IP '203.0.113.10': customer: no owner"),
])
def test_entity_answered_without_an_owner_is_an_inventory_error_naming_it(
        server: InventoryServer, http: HttpInventory, model: type[Any], name: str,
        named: str) -> None:
    # Given an inventory that answers its entities without their owners
    server.state["mode"] = "no-owner"
    # Then each is an inventory error naming the entity and what lacks an owner
    with pytest.raises(InventoryInvalidError) as caught:
        http.lookup(model, name)
    assert named in str(caught.value)
    assert "`customer` is required" in str(caught.value)
    # And (the control) the same entity with its owner is read
    server.state["mode"] = "ok"
    assert http.lookup(model, name).customer in ("cust-1042", "shared")
