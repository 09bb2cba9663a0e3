"""Log formatting and the request id that follows an inbound batch.

Log calls name an event and pass their context as `extra` fields:

    logger.info("delivery.attempt", extra={"connection_id": 3, "delivery_id": "…", "status_code": 200})

`JsonFormatter` writes each record as one JSON object per line, for log
collectors (the default in production); `ConsoleFormatter` writes
`time level logger event key=value …` for people. Both print every extra
field. A field whose name suggests a secret is printed as `[redacted]`: a
last guard, since callers must never pass a secret, an Authorization value
or a full POST URL.

`bound_request_id` binds a request id to the current context (a thread or
a Celery task). `RequestIdFilter`, on the handler, adds it to every record
logged meanwhile.
"""

import json
import logging
import re
import uuid
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from contextvars import ContextVar
from datetime import UTC, datetime
from typing import Any

# Attributes every LogRecord has; any other attribute came from `extra`.
_RECORD_ATTRIBUTES = frozenset(vars(logging.LogRecord("", 0, "", 0, "", (), None))) | {"message", "asctime"}
_SECRET_NAME = re.compile(r"authorization|secret|password|token|post_url|api_key", re.IGNORECASE)
REDACTED = "[redacted]"
# Accepted inbound X-Request-Id values: enough for UUIDs and tracing ids, and
# nothing that could break a log line.
_REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")
# Console values printed without quotes.
_PLAIN = re.compile(r"[^\s\"'=]+")

_request_id: ContextVar[str | None] = ContextVar("portal_request_id", default=None)


def inbound_request_id(header: str | None) -> str:
    """Return the caller's X-Request-Id when it is a plain token of at most 128 characters, else a new id."""
    if header and _REQUEST_ID.fullmatch(header):
        return header
    return uuid.uuid4().hex


@contextmanager
def bound_request_id(request_id: str | None) -> Iterator[None]:
    """Tag the records logged in this context during the block with `request_id` (None tags nothing)."""
    token = _request_id.set(request_id)
    try:
        yield
    finally:
        _request_id.reset(token)


def current_request_id() -> str | None:
    return _request_id.get()


class RequestIdFilter(logging.Filter):
    """Add the bound request id to records that do not carry one; lets every record through."""

    def filter(self, record: logging.LogRecord) -> bool:
        request_id = _request_id.get()
        if request_id is not None and not hasattr(record, "request_id"):
            record.request_id = request_id
        return True


def extra_fields(record: logging.LogRecord) -> dict[str, Any]:
    """Return the record's `extra` fields in the order given, secrets replaced."""
    return {
        name: REDACTED if _SECRET_NAME.search(name) else value
        for name, value in vars(record).items()
        if name not in _RECORD_ATTRIBUTES and not name.startswith("_")
    }


class JsonFormatter(logging.Formatter):
    """One JSON object per record: time (UTC, ISO 8601), level, logger, message, the extra fields, exception."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        for name, value in extra_fields(record).items():
            entry.setdefault(name, value)
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        if record.stack_info:
            entry["stack"] = self.formatStack(record.stack_info)
        return json.dumps(entry, default=str, ensure_ascii=False)


class ConsoleFormatter(logging.Formatter):
    """`time level logger message key=value …`, with the traceback on the following lines."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s %(message)s")

    def formatMessage(self, record: logging.LogRecord) -> str:
        line = super().formatMessage(record)
        fields = extra_fields(record)
        return f"{line} {_key_values(fields)}" if fields else line


def _key_values(fields: Mapping[str, Any]) -> str:
    return " ".join(f"{name}={_console_value(value)}" for name, value in fields.items())


def _console_value(value: Any) -> str:
    if isinstance(value, str):
        return value if _PLAIN.fullmatch(value) else json.dumps(value, ensure_ascii=False)
    return json.dumps(value, default=str, ensure_ascii=False, separators=(",", ":"))
