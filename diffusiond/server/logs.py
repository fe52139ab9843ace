"""Log formatting that no client input can subvert.

Values from clients are escaped where they are logged (``errors.shown``); this
formatter is the safety net under every log line the server writes: control
characters in a message (newlines, carriage returns, ANSI escapes) are shown
as escapes, so one line stays one line, and an overlong message is cut.
Tracebacks, which the formatter adds after the message, keep their lines.
``--log-format json`` writes one JSON object per line instead, for log
collectors: every character outside printable ASCII is escaped, so a record is
always exactly one line, its traceback included.
"""

from __future__ import annotations

import json
import logging
import re
import sys
from datetime import datetime, timezone

MAX_MESSAGE_CHARS = 2000
FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")
_REQUEST_ID = re.compile(r"\breq=(\S+)")


def escape_controls(text: str) -> str:
    return _CONTROL.sub(lambda m: f"\\x{ord(m.group()):02x}", text)


class SafeFormatter(logging.Formatter):
    def formatMessage(self, record: logging.LogRecord) -> str:
        message = escape_controls(record.message)
        if len(message) > MAX_MESSAGE_CHARS:
            message = f"{message[:MAX_MESSAGE_CHARS]}... ({len(message)} characters)"
        record.message = message
        return super().formatMessage(record)


class JsonFormatter(logging.Formatter):
    """One JSON object per record: time (UTC, ISO 8601), level, logger, message, the request id a
    ``req=<id>`` in the message names, and the traceback as one string."""

    def format(self, record: logging.LogRecord) -> str:
        message = record.getMessage()
        if len(message) > MAX_MESSAGE_CHARS:
            message = f"{message[:MAX_MESSAGE_CHARS]}... ({len(message)} characters)"
        entry: dict[str, object] = {
            "time": datetime.fromtimestamp(record.created, tz=timezone.utc).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": message,
        }
        if match := _REQUEST_ID.search(message):
            entry["request_id"] = match.group(1)
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=True)


def configure_logging(level: str, log_format: str = "text") -> None:
    """Log to stderr through ``SafeFormatter`` (``text``) or ``JsonFormatter`` (``json``)."""
    if log_format not in ("text", "json"):
        raise ValueError(f"log format must be text or json, got {log_format!r}")
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if log_format == "json" else SafeFormatter(FORMAT))
    logging.basicConfig(level=level, handlers=[handler])
    logging.captureWarnings(True)  # Python warnings become records too, so every line has the chosen format
