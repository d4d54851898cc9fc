"""A small HTTP client for intake's API, used by `ferry submit` and `ferry status`."""

from __future__ import annotations

from types import TracebackType
from typing import Any

import httpx

from shared.errors import FerryError, TransientError
from shared.settings import Settings


class IntakeRequestError(FerryError):
    """The API refused a request; `problems` lists a rejected document's errors."""

    def __init__(self, status_code: int, message: str,
                 problems: list[dict[str, str]] | None = None) -> None:
        self.status_code = status_code
        self.problems = problems or []
        super().__init__(f"HTTP {status_code}: {message}")


class IntakeUnreachableError(TransientError):
    """No answer from the API (not listening, timed out)."""


def default_url(settings: Settings) -> str:
    """The API's URL from FERRY_INTAKE_BIND, a wildcard address read as this host."""
    host, _, port = settings.intake_bind.rpartition(":")
    if host in ("0.0.0.0", "", "[::]"):  # noqa: S104 - read as "this host", never bound here
        host = "127.0.0.1"
    return f"http://{host}:{port}"


class IntakeClient:
    def __init__(self, url: str, token: str | None, *, timeout: float = 30.0) -> None:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self._http = httpx.Client(base_url=url.rstrip("/"), headers=headers, timeout=timeout)

    def __enter__(self) -> IntakeClient:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self._http.close()

    def submit(self, body: bytes, idempotency_key: str | None = None) -> dict[str, Any]:
        """POST a document as it is; returns {id, status_url}.

        Raises IntakeRequestError when refused, IntakeUnreachableError without an answer.
        """
        headers = {"Content-Type": "application/json"}
        if idempotency_key:
            headers["Idempotency-Key"] = idempotency_key
        return self._call("POST", "/migrations", content=body, headers=headers)

    def status(self, migration_id: str) -> dict[str, Any]:
        """GET /migrations/{id}. Raises IntakeRequestError, IntakeUnreachableError."""
        return self._call("GET", f"/migrations/{migration_id}")

    def stats(self, migration_id: str | None = None) -> dict[str, Any]:
        """Archive statistics of one migration, or of all. Raises as status() does."""
        path = f"/migrations/{migration_id}/stats" if migration_id else "/stats"
        return self._call("GET", path)

    def _call(self, method: str, path: str, **kwargs: Any) -> dict[str, Any]:
        try:
            response = self._http.request(method, path, **kwargs)
        except httpx.TransportError as error:
            raise IntakeUnreachableError(
                f"no answer from intake at {self._http.base_url}: {error}") from error
        try:
            answer = response.json()
        except ValueError:
            answer = {"detail": response.text[:500]}
        if response.is_success and isinstance(answer, dict):
            return answer
        if isinstance(answer, dict) and isinstance(answer.get("errors"), list):
            raise IntakeRequestError(response.status_code,
                                     f"{len(answer['errors'])} problem(s)", answer["errors"])
        detail = answer.get("detail") if isinstance(answer, dict) else answer
        raise IntakeRequestError(response.status_code, str(detail))
