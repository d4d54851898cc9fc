"""Log lines for the operator: text (the default) or JSON lines (`FERRY_LOG_FORMAT=json`).

What a line is about travels in context variables: the runtime sets the migration id while
it delivers a message (from its envelope), the job worker sets the migration id, the job id
and the datacenter while it runs a job. Both formats read them; the JSON one writes them as
fields (`migration_id`, `job_id`, `datacenter`) on lines where they are known, so one
migration's lines can be picked out of every service's log.
"""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import Iterator
from contextvars import ContextVar
from datetime import UTC, datetime

FORMATS = ("text", "json")
TEXT_FORMAT = "%(asctime)s %(levelname)s %(message)s"
FIELDS = ("migration_id", "job_id", "datacenter")

_context: dict[str, ContextVar[str | None]] = {
    name: ContextVar(f"ferry_{name}", default=None) for name in FIELDS}


@contextlib.contextmanager
def context(**values: str | None) -> Iterator[None]:
    """Within the block, log lines of this thread carry `values` (names from FIELDS; None
    leaves a field as it was). Raises ValueError for another name."""
    unknown = set(values) - set(FIELDS)
    if unknown:
        raise ValueError(f"log context has no field {', '.join(sorted(unknown))}; "
                         f"known: {', '.join(FIELDS)}")
    tokens = [(_context[name], _context[name].set(value))
              for name, value in values.items() if value is not None]
    try:
        yield
    finally:
        for variable, token in reversed(tokens):
            variable.reset(token)


def current() -> dict[str, str]:
    """The context fields set here now."""
    return {name: value for name, variable in _context.items()
            if (value := variable.get()) is not None}


class JsonFormatter(logging.Formatter):
    """One JSON object per record, on one line: time (UTC, ISO 8601), level, logger,
    message, the context fields that are set, and the traceback when there is one."""

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, object] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
            **current(),
        }
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        elif record.exc_text:
            line["exception"] = record.exc_text
        # json.dumps escapes newlines inside strings: a record is always one line
        return json.dumps(line, ensure_ascii=False, default=str)


def formatter(log_format: str) -> logging.Formatter:
    """The formatter for FERRY_LOG_FORMAT. Raises ValueError for a format not in FORMATS."""
    if log_format == "json":
        return JsonFormatter()
    if log_format == "text":
        return logging.Formatter(TEXT_FORMAT)
    raise ValueError(f"FERRY_LOG_FORMAT {log_format!r} is not one of {', '.join(FORMATS)}")


def configure(log_format: str = "text", level: int = logging.INFO) -> None:
    """Log to stderr in `log_format`, replacing the root logger's handlers (what
    `ferry run` does once at start). Raises ValueError for an unknown format."""
    handler = logging.StreamHandler()
    handler.setFormatter(formatter(log_format))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level)
