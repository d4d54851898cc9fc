"""Intake's HTTP API: submit a migration document, follow its status.

`create_app(settings)` builds the app; nothing is built at import time. The document body
is read raw (not through a FastAPI model) so that it is stored byte for byte as received
and its errors come out in one format: `{errors: [{path, message}]}`.
"""

from __future__ import annotations

import hmac
from collections.abc import Callable
from typing import Annotated, Any, cast

from anyio import Semaphore
from fastapi import Depends, FastAPI, Header, HTTPException, Path, Query, Request, Response
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from sqlalchemy import text
from sqlalchemy.exc import OperationalError
from starlette.concurrency import run_in_threadpool

from services.intake import SCHEMA
from services.intake.collector import collector_paused
from services.intake.stats import migration_stats
from services.intake.submissions import IdempotencyConflictError, accept_document
from services.intake.uploads import MAX_BODY_BYTES, BodyRejectedError, read_document
from services.intake.views import (
    Accepted,
    ErrorDetail,
    MigrationList,
    MigrationStatus,
    ProblemList,
    list_migrations,
    migration_exists,
    migration_status,
    status_url,
    stored_document,
)
from shared.document import (
    DocumentError,
    DocumentInvalidError,
    MigrationDocument,
    document_json_schema,
    json_pointer,
    validate_document,
)
from shared.inbox_outbox import Units
from shared.metrics import REGISTRY
from shared.runtime import open_database
from shared.settings import Settings

MAX_PROBLEMS = 100  # problems listed in a 422; `total` counts them all
# Documents over this size (or of no declared size) are read, parsed and validated one at a
# time: 40 documents of 1 MiB at once then wait their turn, unread, instead of taking the
# event loop, every worker thread and the GIL from ordinary submissions and /healthz. The
# 100-VM document is 65 KiB.
LARGE_DOCUMENT_BYTES = 256 * 1024
ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$"
KEY_PATTERN = r"^[!-~]{1,200}$"  # visible ASCII: stored, compared, never interpreted
_DOCUMENT_REF = {"$ref": "#/components/schemas/MigrationDocument"}
# Module level: FastAPI resolves the dependency's (postponed) annotations in this module.
_BEARER = HTTPBearer(auto_error=False, description="FERRY_API_TOKEN")


def _responses(*codes: int) -> dict[int | str, dict[str, Any]]:
    described: dict[int, dict[str, Any]] = {
        400: {"model": ErrorDetail, "description": "Malformed request headers"},
        401: {"model": ErrorDetail, "description": "Missing or wrong bearer token"},
        404: {"model": ErrorDetail, "description": "No such migration"},
        409: {"model": ErrorDetail, "description": "Idempotency-Key used for another body"},
        413: {"model": ErrorDetail, "description": f"Body over {MAX_BODY_BYTES} bytes"},
        415: {"model": ErrorDetail, "description": "Body is not JSON"},
        422: {"model": ProblemList, "description": "Every problem, by JSON Pointer"},
        503: {"model": ErrorDetail, "description": "Database unavailable"},
    }
    return {code: described[code] for code in codes}


def create_app(settings: Settings, *, units: Units | None = None) -> FastAPI:
    """The API on intake's database (`units`, else opened and upgraded from `settings`).

    A submission commits through `units`, which wakes the service's outbox relay.
    """
    units = units if units is not None else open_database(settings, SCHEMA)
    engine = units.engine
    app = FastAPI(title="Ferry intake", version="1",
                  description="Submit migration documents; follow each migration's status.")
    app.state.engine = engine
    one_at_a_time: list[Semaphore] = []  # made on first use, inside the event loop
    guarded = [Depends(_token_check(settings.api_token))] if settings.api_token else []
    strict = [*guarded, Depends(_only_query())]

    @app.post("/migrations", status_code=202, response_model=Accepted, dependencies=strict,
              responses=_responses(400, 401, 409, 413, 415, 422, 503),
              openapi_extra={"requestBody": {"required": True, "content": {
                  "application/json": {"schema": _DOCUMENT_REF}}}})
    async def submit_migration(
        request: Request,
        idempotency_key: Annotated[str | None, Header(
            alias="Idempotency-Key", pattern=KEY_PATTERN,
            description="Retry safely: the same key and body give the same migration")] = None,
    ) -> Response:
        """Validate a migration document, store it exactly as received and announce it."""
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) <= LARGE_DOCUMENT_BYTES:
            return await submit(request, idempotency_key)
        if not one_at_a_time:
            one_at_a_time.append(Semaphore(1))
        async with one_at_a_time[0]:
            with collector_paused():  # one large document at a time: a bounded pause
                return await submit(request, idempotency_key)

    async def submit(request: Request, idempotency_key: str | None) -> Response:
        try:
            body, raw = await read_document(request)
        except BodyRejectedError as rejected:
            return JSONResponse({"detail": str(rejected)}, status_code=rejected.status_code)
        except DocumentInvalidError as invalid:
            return _problems(invalid)

        def accept() -> str:
            document = validate_document(raw)  # so `raw` is a JSON object
            return accept_document(body, document, uow=units(), idempotency_key=idempotency_key,
                                   parsed=cast(dict[str, Any], raw))

        try:
            migration_id = await run_in_threadpool(accept)
        except DocumentInvalidError as invalid:
            return _problems(invalid)
        except RecursionError:
            return _problems(DocumentInvalidError([_nested()]))
        except IdempotencyConflictError as conflict:
            return JSONResponse({"detail": str(conflict)}, status_code=409)
        url = status_url(migration_id)
        return JSONResponse(Accepted(id=migration_id, status_url=url).model_dump(),
                            status_code=202, headers={"Location": url})

    @app.get("/migrations", response_model=MigrationList,
             dependencies=[*guarded, Depends(_only_query("limit", "customer_id"))],
             responses=_responses(401, 422, 503))
    def get_migrations(
        limit: Annotated[int, Query(ge=1, le=500)] = 50,
        customer_id: Annotated[str | None, Query(pattern=ID_PATTERN)] = None,
    ) -> MigrationList:
        """Migrations, newest first."""
        with engine.connect() as connection:
            return list_migrations(connection, limit=limit, customer_id=customer_id)

    @app.get("/migrations/{migration_id}", response_model=MigrationStatus,
             dependencies=strict, responses=_responses(401, 404, 422, 503))
    def get_migration(
        migration_id: Annotated[str, Path(pattern=ID_PATTERN)],
    ) -> MigrationStatus:
        """One migration: status, allocations once resolved, each job, and its history."""
        with engine.connect() as connection:
            found = migration_status(connection, migration_id)
        if found is None:
            raise HTTPException(404, detail=f"no migration {migration_id!r}")
        return found

    @app.get("/migrations/{migration_id}/document", dependencies=strict,
             responses={200: {"content": {"application/json": {"schema": _DOCUMENT_REF}},
                              "description": "The document exactly as submitted"},
                        **_responses(401, 404, 422, 503)})
    def get_document(migration_id: Annotated[str, Path(pattern=ID_PATTERN)]) -> Response:
        """The migration document byte for byte as it was submitted."""
        with engine.connect() as connection:
            document = stored_document(connection, migration_id)
        if document is None:
            raise HTTPException(404, detail=f"no document for migration {migration_id!r}")
        return Response(document.encode("utf-8"), media_type="application/json")

    @app.get("/migrations/{migration_id}/stats", dependencies=strict,
             responses=_responses(401, 404, 422, 503))
    def get_migration_stats(
        migration_id: Annotated[str, Path(pattern=ID_PATTERN)],
    ) -> dict[str, Any]:
        """The field report's archive statistics for one migration."""
        with engine.connect() as connection:
            if not migration_exists(connection, migration_id):
                raise HTTPException(404, detail=f"no migration {migration_id!r}")
            return migration_stats(connection, migration_id)

    @app.get("/stats", dependencies=strict, responses=_responses(401, 422, 503))
    def get_stats() -> dict[str, Any]:
        """The archive statistics over every migration."""
        with engine.connect() as connection:
            return migration_stats(connection)

    @app.get("/schema/migration-document", dependencies=[Depends(_only_query())],
             responses=_responses(422))
    def get_document_schema() -> dict[str, Any]:
        """The migration document's JSON Schema (structure only; the cross-reference rules
        are checked on submission)."""
        return document_json_schema()

    @app.get("/healthz", dependencies=[Depends(_only_query())], responses=_responses(422, 503))
    def healthz() -> dict[str, str]:
        """Ready when intake's database answers."""
        with engine.connect() as connection:
            connection.execute(text("SELECT 1"))
        return {"status": "ok"}

    # Prometheus scrapes usually carry no token, and these carry no ids, names or
    # documents (shared/metrics.py): open unless FERRY_METRICS_REQUIRE_TOKEN. Not in the
    # OpenAPI document: it is the Prometheus text format, not the API.
    @app.get("/metrics", include_in_schema=False, dependencies=[
        *(guarded if settings.metrics_require_token else []), Depends(_only_query())])
    def get_metrics() -> Response:
        """This process's metrics, in the Prometheus text format."""
        return Response(generate_latest(REGISTRY), media_type=CONTENT_TYPE_LATEST)

    @app.exception_handler(RequestValidationError)
    async def _invalid_request(_: Request, error: RequestValidationError) -> Response:
        problems = [{"path": json_pointer(*item["loc"]), "message": item["msg"]}
                    for item in error.errors()]
        return JSONResponse(jsonable_encoder({"errors": problems}), status_code=422)

    @app.exception_handler(OperationalError)
    async def _database_down(_: Request, error: OperationalError) -> Response:
        return JSONResponse({"detail": "intake's database is unavailable; try again later"},
                            status_code=503)

    app.openapi = lambda: _openapi(app)  # type: ignore[method-assign]
    return app


def _token_check(token: str) -> Callable[..., None]:
    expected = token.encode("utf-8")

    def require_token(
        credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_BEARER)],
    ) -> None:
        given = credentials.credentials.encode("utf-8") if credentials else b""
        if not hmac.compare_digest(given, expected):
            raise HTTPException(401, detail="missing or wrong bearer token "
                                            "(Authorization: Bearer $FERRY_API_TOKEN)",
                                headers={"WWW-Authenticate": "Bearer"})

    return require_token


def _only_query(*known: str) -> Callable[[Request], None]:
    """A dependency refusing query parameters the operation does not have: a mistyped
    `?limt=5` is an error, not silently ignored."""

    def refuse_unknown(request: Request) -> None:
        unknown = sorted(set(request.query_params) - set(known))
        if unknown:
            raise RequestValidationError([
                {"loc": ("query", name), "msg": f"unknown query parameter {name!r}",
                 "type": "extra_forbidden"} for name in unknown])

    return refuse_unknown


def _problems(invalid: DocumentInvalidError) -> JSONResponse:
    # A document can be wrong in a million places: the first MAX_PROBLEMS say enough.
    shown = invalid.errors[:MAX_PROBLEMS]
    return JSONResponse({"errors": [e.model_dump() for e in shown],
                         "total": invalid.total,
                         "truncated": invalid.total > len(shown)}, status_code=422)


def _nested() -> DocumentError:
    return DocumentError(path="", message="the document nests arrays or objects too deeply")


def _openapi(app: FastAPI) -> dict[str, Any]:
    """FastAPI's schema plus the migration document's, which the body is read raw for."""
    if app.openapi_schema is None:
        schema = get_openapi(title=app.title, version=app.version,
                             description=app.description, routes=app.routes)
        document = MigrationDocument.model_json_schema(
            ref_template="#/components/schemas/{model}")
        components = schema.setdefault("components", {}).setdefault("schemas", {})
        parts = {**document.pop("$defs", {}), "MigrationDocument": document}
        clash = sorted(set(parts) & set(components))
        if clash:
            raise RuntimeError(f"OpenAPI component names used twice: {', '.join(clash)}")
        components.update(parts)
        for operation in (op for path in schema["paths"].values() for op in path.values()):
            for parameter in operation.get("parameters", []):
                parameter["schema"] = _without_null(parameter["schema"])
        app.openapi_schema = schema
    return app.openapi_schema


def _without_null(schema: dict[str, Any]) -> dict[str, Any]:
    """An optional parameter's schema without its `null` branch: a query parameter or
    header is absent or a string on the wire, never JSON null (and a generator taking the
    branch literally sends the string "null", or "false", as if it broke the schema)."""
    branches = schema.get("anyOf", [])
    rest = [branch for branch in branches if branch != {"type": "null"}]
    if len(branches) == 2 and len(rest) == 1:
        return {**{k: v for k, v in schema.items() if k != "anyOf"}, **rest[0]}
    return schema
