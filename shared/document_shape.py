"""A cheap first pass over a submitted document's containers, before pydantic.

pydantic builds an error object for every wrong item, and its error list costs more than
the validation: 500,000 `0`s where objects belong take it ~0.4 s to find and ~0.8-1.8 s
to list. This pass walks only the objects and arrays, as the document's JSON Schema
describes them, and finds in a few milliseconds what makes pydantic slow: an array longer
than its bound (pydantic would validate every item first), and items or fields that must
be objects or arrays but are not. When it finds an array over its bound, or more problems
than pydantic lists cheaply, they are the answer (the first ERRORS_KEPT and their count);
otherwise pydantic checks everything, and its full list is the answer.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache
from typing import Any

from shared.document_errors import ERRORS_KEPT, DocumentError, json_pointer, show
from shared.document_schema import MigrationDocument

MANY = 1000  # shape problems above which pydantic's list of them is not worth its cost

Node = dict[str, Any]


@dataclass(frozen=True)
class Shape:
    """One container of the schema, compiled once: an object and its fields that are
    containers, or an array with its bound and the shape of its items (None: scalars)."""

    kind: str  # "object" or "array"
    fields: tuple[tuple[str, Shape], ...] = ()
    bound: int | None = None
    items: Shape | None = None


def _resolve(node: Node, defs: Node) -> Node | None:
    """The node a `$ref` or an Optional (`anyOf` with null) stands for; None when it is a
    choice this pass does not judge."""
    while True:
        if "$ref" in node:
            node = defs[node["$ref"].rsplit("/", 1)[-1]]
        elif "anyOf" in node:
            choices = [c for c in node["anyOf"] if c.get("type") != "null"]
            if len(choices) != 1:
                return None
            node = choices[0]
        else:
            return node


def _compile(node: Node | None, defs: Node) -> Shape | None:
    if node is None:
        return None
    if node.get("type") == "object" and "properties" in node:
        fields = tuple((key, shape) for key, sub in node["properties"].items()
                       if (shape := _compile(_resolve(sub, defs), defs)) is not None)
        return Shape("object", fields=fields)
    if node.get("type") == "array":
        return Shape("array", bound=node.get("maxItems"),
                     items=_compile(_resolve(node.get("items", {}), defs), defs))
    return None


@cache
def _document_shape() -> Shape | None:
    schema = MigrationDocument.model_json_schema()
    return _compile(_resolve(schema, schema["$defs"]), schema["$defs"])


class _Walk:
    def __init__(self) -> None:
        self.kept: list[DocumentError] = []
        self.total = 0
        self.too_long = False

    def report(self, path: tuple[str | int, ...], message: str) -> None:
        self.total += 1
        if len(self.kept) < ERRORS_KEPT:
            self.kept.append(DocumentError(path=json_pointer(*path), message=message))

    def visit(self, path: tuple[str | int, ...], value: Any, shape: Shape) -> None:
        if shape.kind == "object":
            if not isinstance(value, dict):
                self.report(path, f"expected an object, got {show(value)}")
                return
            for key, field in shape.fields:
                if key in value:
                    self.visit((*path, key), value[key], field)
            return
        if not isinstance(value, list):
            self.report(path, f"expected an array, got {show(value)}")
            return
        if shape.bound is not None and len(value) > shape.bound:
            self.too_long = True
            self.report(path, f"may have at most {shape.bound} item(s), got {len(value)}")
            return
        items = shape.items
        if items is None:
            return
        if items.kind == "object" and not items.fields:  # objects of scalars: only their kind
            for index, item in enumerate(value):
                if not isinstance(item, dict):
                    self.report((*path, index), f"expected an object, got {show(item)}")
            return
        for index, item in enumerate(value):
            self.visit((*path, index), item, items)


def shape_errors(raw: object) -> tuple[list[DocumentError], int] | None:
    """The problems of `raw`'s containers when they are the answer (an array over its
    bound, or more than MANY problems): the first ERRORS_KEPT and their count. None when
    pydantic should judge the document in full. Linear in the number of containers."""
    walk = _Walk()
    shape = _document_shape()
    if shape is not None:
        walk.visit((), raw, shape)
    if walk.too_long or walk.total > MANY:
        return walk.kept, walk.total
    return None
