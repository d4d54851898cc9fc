"""The inventory over HTTP: `GET <base>/<collection>/<name>` answers one entity as JSON.

The API is documented in docs/inventory-api.md. What a response means for a migration:
200 → the entity (checked against the same models as the file adapter); 404 → it does not
exist (UnknownEntityError: the migration fails naming it); 401/403 → a configuration error;
connection errors, timeouts, 429 and 5xx → TransientError (the bus retries later).
"""

from __future__ import annotations

from typing import Any
from urllib.parse import quote

import httpx
from pydantic import ValidationError

from services.resolver.inventory_model import (
    KINDS,
    InventoryInvalidError,
    M,
    UnknownEntityError,
    validation_summary,
)
from shared.errors import ConfigurationError, TransientError


class HttpInventory:
    def __init__(self, base_url: str, *, timeout: float = 10.0, token: str | None = None,
                 transport: httpx.BaseTransport | None = None) -> None:
        self.base_url = base_url.rstrip("/")
        headers = {"Accept": "application/json"}
        if token:
            headers["Authorization"] = f"Bearer {token}"
        self._client = httpx.Client(timeout=timeout, headers=headers, transport=transport)

    def lookup(self, model: type[M], name: str) -> M:
        what, _, path = KINDS[model]
        url = f"{self.base_url}/{path}/{quote(name, safe='')}"
        try:
            response = self._client.get(url)
        except httpx.TimeoutException as error:
            raise TransientError(f"inventory {url} timed out: {error}") from error
        except httpx.TransportError as error:
            raise TransientError(f"inventory {url} unreachable: {error}") from error
        status = response.status_code
        if status == 404:
            raise UnknownEntityError(f"{what} {name!r} is not in the inventory "
                                     f"({self.base_url}: 404)")
        if status in (401, 403):
            raise ConfigurationError(f"inventory {url} refused us ({status}): check "
                                     "FERRY_INVENTORY_TOKEN")
        if status == 429 or status >= 500:
            raise TransientError(f"inventory {url} answered {status}: {_tail(response)}")
        if status != 200:
            raise InventoryInvalidError(f"inventory {url} answered {status}: "
                                        f"{_tail(response)}")
        return _parse(model, what, name, url, response)

    def close(self) -> None:
        self._client.close()


def _parse(model: type[M], what: str, name: str, url: str, response: httpx.Response) -> M:
    try:
        data: Any = response.json()
    except ValueError:
        raise InventoryInvalidError(f"inventory {url} did not answer JSON: "
                                    f"{_tail(response)}") from None
    try:
        return model.model_validate(data)
    except ValidationError as error:
        raise InventoryInvalidError(f"inventory answered an invalid {what} {name!r}: "
                                    f"{validation_summary(error)}") from None


def _tail(response: httpx.Response) -> str:
    return response.text.strip()[-300:] or response.reason_phrase
