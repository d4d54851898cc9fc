"""How a migration document's problems are reported: a JSON Pointer and a message each.

`structural_errors` turns pydantic's errors into DocumentErrors in one pass over them (a
document can be wrong in hundreds of thousands of places: that is linear, and only the
first `ERRORS_KEPT` are built; the count covers them all).
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, ValidationError
from pydantic_core import ErrorDetails

ERRORS_KEPT = 100  # problems a DocumentInvalidError carries; it counts them all


class DocumentError(BaseModel):
    """One problem in a submitted document: where (RFC 6901 JSON Pointer) and what."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    path: str
    message: str


def json_pointer(*parts: str | int) -> str:
    """The RFC 6901 pointer to `parts` ("" for the root), escaping "~" and "/"."""
    joined = "/".join(map(str, parts))
    if "~" not in joined and joined.count("/") == len(parts) - 1:
        return "/" + joined if parts else ""  # the usual case: nothing to escape
    return "".join("/" + str(part).replace("~", "~0").replace("/", "~1") for part in parts)


def show(value: object) -> str:
    """A submitted value as a reader should see it in a message: short, JSON-flavoured."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int) and abs(value) >= 10**20:
        return f"an integer of {len(str(abs(value)))} digits"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        return repr(value if len(value) <= 100 else value[:97] + "...")
    if isinstance(value, dict):
        return "an object"
    if isinstance(value, list | tuple):
        return "an array"
    return f"a {type(value).__name__}"


def _message(error: ErrorDetails) -> str:
    loc, kind, ctx = error["loc"], error["type"], error.get("ctx", {})
    got = show(error.get("input"))
    if kind == "missing":
        return f"required field {show(loc[-1])} is missing"
    if kind == "extra_forbidden":
        return f"unknown field {show(loc[-1])}"
    if kind == "value_error":
        return str(ctx["error"])
    if kind == "model_type":
        return f"expected an object, got {got}"
    if kind in ("tuple_type", "list_type"):
        return f"expected an array, got {got}"
    if kind == "too_short":
        return f"needs at least {ctx['min_length']} item(s), got {ctx['actual_length']}"
    if kind == "too_long":
        return f"may have at most {ctx['max_length']} item(s), got {ctx['actual_length']}"
    if kind == "less_than_equal":
        return f"must be at most {ctx['le']}, got {got}"
    if kind == "literal_error":
        return f"must be {ctx['expected']}, got {got}"
    return f"{error['msg']}, got {got}"  # plain enough: "Input should be greater than 0"


def structural_errors(exc: ValidationError) -> tuple[list[DocumentError], int]:
    """The first ERRORS_KEPT problems pydantic found in a document's shape, as
    DocumentErrors, and how many there are in all."""
    details = exc.errors(include_url=False)
    # pydantic counts only the items that validated, so a one-item array whose item is
    # wrong is also "too short"; the item's own error is the one worth reading. Every
    # error's ancestors, once: which arrays have an error inside.
    inside: set[tuple[int | str, ...]] = set()
    for detail in details:
        loc = detail["loc"]
        inside.update(loc[:end] for end in range(len(loc)))
    kept: list[DocumentError] = []
    total = 0
    for detail in details:
        if detail["type"] == "too_short" and detail["loc"] in inside:
            continue
        total += 1
        if len(kept) < ERRORS_KEPT:
            kept.append(DocumentError(path=json_pointer(*detail["loc"]), message=_message(detail)))
    return kept, total
