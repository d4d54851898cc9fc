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
    """Strict JSON from UTF-8 bytes (no NaN/Infinity, which JSON does not have).

    Raises DocumentInvalidError with one error at the root.
    """
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as error:
        _invalid(f"the body is not UTF-8: byte {error.start} is {body[error.start]:#04x}")
    try:
        return json.loads(text, parse_constant=_no_constant)
    except json.JSONDecodeError as error:
        _invalid(f"the body is not valid JSON: {error.msg} at line {error.lineno} "
                 f"column {error.colno}")
    except RecursionError:
        _invalid("the document nests arrays or objects too deeply")
    except ValueError as error:  # NaN, or an integer too long to convert
        _invalid(f"the body is not valid JSON: {error}")


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
