"""The migration document: what a customer moves from the old site and how the new one looks.

`validate_document` is the one entry point: it parses the structure
(`shared.document_schema`: the models, their field types and what the top-level shape is)
and then checks the rules that need the whole document (`shared.document_rules`). The
models are importable from here too, so callers need one module.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from pydantic import ValidationError

from shared.document_errors import ERRORS_KEPT
from shared.document_rules import semantic_errors
from shared.document_schema import (
    DATABASE_NAME_PATTERN,
    DUID_PATTERN,
    HOST_NAME_PATTERN,
    LABEL_MAX_LENGTH,
    MAX_DISKS,
    MAX_ENTITIES,
    MAX_FILESYSTEMS,
    MAX_MEMORY_MIB,
    MAX_MOVES,
    MAX_PORT_MAPPINGS,
    MAX_REPLICAS,
    MAX_SIZE_GIB,
    MAX_VCPUS,
    MOUNTPOINT_MAX_LENGTH,
    MOUNTPOINT_PATTERN,
    VERSION_PATTERN,
    Customer,
    DatabaseGroup,
    DatabaseMove,
    DatabaseName,
    Disk,
    DocumentError,
    DocumentModel,
    Duid,
    EngineVersion,
    Environment,
    Filesystem,
    FsType,
    HostName,
    IpEquivalence,
    Label,
    LocalFilesystemMove,
    Migration,
    MigrationDocument,
    Mountpoint,
    Port,
    PortMapping,
    PositiveInt,
    PublicAddress,
    PublicIp,
    SharedFilesystemMove,
    Vm,
    VmRole,
    json_pointer,
    structural_errors,
)
from shared.document_shape import shape_errors
from shared.errors import PermanentError

__all__ = [
    "canonical_json",
    "Customer",
    "DATABASE_NAME_PATTERN",
    "DatabaseGroup",
    "DatabaseMove",
    "DatabaseName",
    "Disk",
    "document_json_schema",
    "DocumentError",
    "DocumentInvalidError",
    "DocumentModel",
    "Duid",
    "DUID_PATTERN",
    "EngineVersion",
    "ERRORS_KEPT",
    "Environment",
    "Filesystem",
    "FsType",
    "HOST_NAME_PATTERN",
    "HostName",
    "IpEquivalence",
    "json_pointer",
    "Label",
    "LABEL_MAX_LENGTH",
    "LocalFilesystemMove",
    "MAX_DISKS",
    "MAX_ENTITIES",
    "MAX_FILESYSTEMS",
    "MAX_MEMORY_MIB",
    "MAX_MOVES",
    "MAX_PORT_MAPPINGS",
    "MAX_REPLICAS",
    "MAX_SIZE_GIB",
    "MAX_VCPUS",
    "Migration",
    "MigrationDocument",
    "Mountpoint",
    "MOUNTPOINT_MAX_LENGTH",
    "MOUNTPOINT_PATTERN",
    "Port",
    "PortMapping",
    "PositiveInt",
    "PublicAddress",
    "PublicIp",
    "SharedFilesystemMove",
    "structural_errors",
    "validate_document",
    "VERSION_PATTERN",
    "Vm",
    "VmRole",
]


class DocumentInvalidError(PermanentError):
    """A migration document breaks its schema or its rules: `errors` lists the first
    ERRORS_KEPT problems, `total` counts them all."""

    def __init__(self, errors: Sequence[DocumentError], total: int | None = None) -> None:
        self.errors = list(errors[:ERRORS_KEPT])
        self.total = max(total or 0, len(errors))
        shown = "; ".join(f"{e.path or '(root)'}: {e.message}" for e in self.errors[:5])
        more = f"; and {self.total - 5} more" if self.total > 5 else ""
        super().__init__(f"migration document has {self.total} error(s): {shown}{more}")


def validate_document(raw: object) -> MigrationDocument:
    """Parse a submitted document (as from `json.loads`) and check every rule.

    Raises DocumentInvalidError with the problems: the structural ones when the shape is
    wrong, otherwise the semantic ones (see `shared.document_rules`); the first ERRORS_KEPT
    of them and their count. Its cost is linear in the document's size.
    """
    shape = shape_errors(raw)  # what would make pydantic slow, found cheaply first
    if shape is not None:
        raise DocumentInvalidError(*shape)
    try:
        document = MigrationDocument.model_validate(raw)
    except ValidationError as exc:
        raise DocumentInvalidError(*structural_errors(exc)) from exc
    errors, total = semantic_errors(document)
    if total:
        raise DocumentInvalidError(errors, total)
    return document


def document_json_schema() -> dict[str, Any]:
    """The JSON Schema of a migration document (served at GET /schema/migration-document).

    It describes the structure; the cross-reference rules are only in `validate_document`.
    """
    return MigrationDocument.model_json_schema()


def canonical_json(document: MigrationDocument) -> str:
    """One byte-stable JSON text per document: sorted keys, no spaces, ASCII only."""
    return json.dumps(
        document.model_dump(mode="json"), sort_keys=True, separators=(",", ":"), ensure_ascii=True
    )
