"""The layers and the event map: what `lint-imports` enforces, plus what a contract cannot say.

import-linter (pyproject.toml, run by scripts/test.sh) keeps ferry above services above
shared and the services apart; these tests add that no module takes part in an import
cycle, and that docs/events.md is what `ferry topology --markdown` prints today.
"""

from __future__ import annotations

import re
from pathlib import Path

import grimp

from ferry.builders import BUILDERS
from ferry.event_map import HANDLER_MODULES, constructed_events, event_routes, render_markdown
from shared.contracts import EVENTS
from shared.settings import SERVICES, Settings

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("ferry", "services", "shared")


def test_no_module_is_imported_back_by_what_it_imports() -> None:
    # Given the import graph of the application, the services and shared (lazy imports too)
    graph = grimp.build_graph(*PACKAGES)
    # When every direct import a -> b is followed back from b
    cycles = sorted({
        " -> ".join(chain)
        for module in graph.modules
        for imported in graph.find_modules_directly_imported_by(module)
        if (chain := graph.find_shortest_chain(importer=imported, imported=module))
    })
    # Then nothing leads back: shared.document / document_rules and the resolver's
    # inventory / inventory_http were the last two cycles
    assert cycles == []


def test_docs_events_md_is_what_ferry_topology_prints() -> None:
    # Given the defaults, not this machine's FERRY_* variables
    defaults = Settings.model_construct()
    # When the event map is generated from the code
    expected = render_markdown(defaults.delivery_limit, tuple(defaults.retry_delays))
    # Then the committed document is the same
    assert (ROOT / "docs/events.md").read_text() == expected, (
        "docs/events.md is stale: run `ferry topology --markdown > docs/events.md`")


def test_every_event_has_an_emitter_and_the_status_consumer() -> None:
    routes = {route.type: route for route in event_routes()}
    assert list(routes) == [t for t, m in EVENTS.items() if m.__module__ == "shared.contracts"]
    assert [t for t, route in routes.items() if not route.emitters] == []
    assert [t for t, route in routes.items() if "intake" not in route.consumers] == []


def test_an_emitter_is_code_that_calls_the_contract_class() -> None:
    source = """
from shared import contracts
from shared.contracts import ArchiveFailed as Failed, MigrationFailed, SnapshotRequested

def handle(event: SnapshotRequested, ctx) -> None:
    ctx.emit(MigrationFailed(stage="x", reason="y"))
    ctx.emit(Failed(datacenter="ey04", request_id="r", kind="database", reason="z"))
    ctx.emit(contracts.TransferFailed(request_id="r", archive_id="a", reason="z", attempts=1))
    SnapshotRequested.model_validate({})  # reading one is not emitting it
"""
    assert constructed_events(source) == {"migration.failed", "archive.failed",
                                           "transfer.failed"}


def test_the_application_knows_every_service_in_pipeline_order() -> None:
    assert tuple(BUILDERS) == SERVICES
    assert tuple(HANDLER_MODULES) == SERVICES


def test_the_readme_and_docs_name_only_documents_the_repository_has() -> None:
    # Given every `name.md` and `dir/file.ext` the README and docs/ quote
    quoted = {(page.name, name)
              for page in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
              for name in re.findall(r"`([\w./-]+\.md|[\w.-]+/[\w./-]+\.\w+)`",
                                     page.read_text())}
    # Then each is a file here (a bare document name: in docs/ or at the top)
    missing = [(page, name) for page, name in sorted(quoted)
               if not any((ROOT / where / name).exists() for where in ("", "docs"))]
    assert missing == []
