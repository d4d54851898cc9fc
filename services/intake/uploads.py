"""Reading a submitted body: a JSON content type, at most 1 MiB, UTF-8, plain JSON.

What is wrong with the request itself (type, size) is a `BodyRejectedError` with its HTTP
status; what is wrong with the text is a `DocumentInvalidError`, reported like any other
problem in the document.
"""

from __future__ import annotations

import json
from typing import NoReturn

from starlette.requests import Request

from shared.document import DocumentError, DocumentInvalidError
from shared.errors import PermanentError

MAX_BODY_BYTES = 1024 * 1024


class BodyRejectedError(PermanentError):
    """The request cannot carry a document: wrong content type, too large, bad length."""

    def __init__(self, status_code: int, message: str) -> None:
        self.status_code = status_code
        super().__init__(message)


async def read_document(request: Request) -> tuple[bytes, object]:
    """The body as received and its parsed JSON.

    Raises BodyRejectedError (415, 413, 400) or DocumentInvalidError (not UTF-8 or not JSON).
    """
    _check_content_type(request.headers.get("content-type"))
    declared = request.headers.get("content-length")
    if declared is not None:
        if not (declared.isascii() and declared.isdigit()):
            raise BodyRejectedError(400, f"Content-Length {declared!r} is not a number")
        if int(declared) > MAX_BODY_BYTES:
            raise _too_large(int(declared))
    # The header can be absent (chunked) or lie: count what actually arrives, and stop early.
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > MAX_BODY_BYTES:
            raise _too_large(len(body), at_least=True)
    return bytes(body), parse_json(bytes(body))


def parse_json(body: bytes) -> object:
    """Strict JSON from UTF-8 bytes (no NaN/Infinity, which JSON does not have; no object
    with the same key twice, which JSON parsers read differently: last one wins here, first
    one elsewhere).

    Raises DocumentInvalidError: one error at the root, or one per duplicated key at the
    object that has it.
    """
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as error:
        _invalid(f"the body is not UTF-8: byte {error.start} is {body[error.start]:#04x}")
    try:
        repeats: list[_Object] = []

        def hook(pairs: list[tuple[str, object]]) -> dict[str, object]:
            parsed = dict(pairs)
            if len(parsed) == len(pairs):
                return parsed  # the usual case: a plain dict, no Python work per key
            repeated = _Object(pairs)
            repeats.append(repeated)
            return repeated

        parsed = json.loads(text, parse_constant=_no_constant, object_pairs_hook=hook)
    except json.JSONDecodeError as error:
        _invalid(f"the body is not valid JSON: {error.msg} at line {error.lineno} "
                 f"column {error.colno}")
    except RecursionError:
        _invalid("the document nests arrays or objects too deeply")
    except ValueError as error:  # NaN, or an integer too long to convert
        _invalid(f"the body is not valid JSON: {error}")
    if repeats:  # rare: only then walk the document for where they are
        raise DocumentInvalidError([
            DocumentError(path=path, message=f"the key {key!r} appears more than once in "
                                             f"this object")
            for path, key in _duplicate_keys(parsed)])
    return parsed


class _Object(dict[str, object]):
    """A parsed JSON object that remembers the keys it was given twice."""

    def __init__(self, pairs: list[tuple[str, object]]) -> None:
        super().__init__(pairs)
        self.repeated: list[str] = []
        if len(self) != len(pairs):
            seen: set[str] = set()
            for key, _ in pairs:
                if key in seen and key not in self.repeated:
                    self.repeated.append(key)
                seen.add(key)


def _duplicate_keys(value: object) -> list[tuple[str, str]]:
    """(JSON Pointer of the object, key) for every repeated key, in document order; one walk
    over the document, without recursion (depth is bounded by the parser, not by us)."""
    found: list[tuple[str, str]] = []
    stack: list[tuple[str, object]] = [("", value)]
    while stack:
        path, node = stack.pop()
        if isinstance(node, dict):
            if isinstance(node, _Object):
                found.extend((path, key) for key in node.repeated)
            children = [(f"{path}/{_escape(k)}", v) for k, v in node.items()]
        elif isinstance(node, list):
            children = [(f"{path}/{i}", v) for i, v in enumerate(node)]
        else:
            continue
        stack.extend(reversed(children))
    return found


def _escape(key: str) -> str:
    return key.replace("~", "~0").replace("/", "~1")


def _check_content_type(header: str | None) -> None:
    media, _, parameters = (header or "").partition(";")
    media = media.strip().lower()
    if not (media == "application/json"
            or (media.startswith("application/") and media.endswith("+json"))):
        shown = repr(header) if header else "none"
        raise BodyRejectedError(415, f"Content-Type must be application/json, got {shown}")
    for parameter in parameters.split(";"):
        name, _, value = parameter.partition("=")
        if name.strip().lower() == "charset" and value.strip().strip('"').lower() not in (
                "utf-8", "utf8"):
            raise BodyRejectedError(415, f"a JSON body must be UTF-8, not {value.strip()!r}")


def _too_large(size: int, at_least: bool = False) -> BodyRejectedError:
    shown = f"more than {MAX_BODY_BYTES}" if at_least else str(size)
    return BodyRejectedError(413, f"the body is {shown} bytes; a migration document may be "
                                  f"at most {MAX_BODY_BYTES} bytes (1 MiB)")


def _no_constant(name: str) -> NoReturn:
    raise ValueError(f"{name} is not a JSON value")


def _invalid(message: str) -> NoReturn:
    raise DocumentInvalidError([DocumentError(path="", message=message)])
