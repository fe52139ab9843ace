"""Log formatting that no client input can subvert.

Values from clients are escaped where they are logged (``errors.shown``); this
formatter is the safety net under every log line the server writes: control
characters in a message (newlines, carriage returns, ANSI escapes) are shown
as escapes, so one line stays one line, and an overlong message is cut.
Tracebacks, which the formatter adds after the message, keep their lines.
"""

from __future__ import annotations

import logging
import re
import sys

MAX_MESSAGE_CHARS = 2000
FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")


def escape_controls(text: str) -> str:
    return _CONTROL.sub(lambda m: f"\\x{ord(m.group()):02x}", text)


class SafeFormatter(logging.Formatter):
    def formatMessage(self, record: logging.LogRecord) -> str:
        message = escape_controls(record.message)
        if len(message) > MAX_MESSAGE_CHARS:
            message = f"{message[:MAX_MESSAGE_CHARS]}... ({len(message)} characters)"
        record.message = message
        return super().formatMessage(record)


def configure_logging(level: str) -> None:
    """Log to stderr through ``SafeFormatter``."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(SafeFormatter(FORMAT))
    logging.basicConfig(level=level, handlers=[handler])
