"""Keeping ONNX Runtime's tools quiet during an export: their chatter goes to our debug log.

The float16 converter logs lists of node protobufs at INFO, and the quantizer
prints its calibration stages to stdout and logs advice through the root logger
at WARNING; none of it is for the operator, who gets the export's own numbered
stages. ``--log-level DEBUG`` still shows all of it, under ``diffusiond.export``.
"""

from __future__ import annotations

import contextlib
import io
import logging
from collections.abc import Iterator

log = logging.getLogger("diffusiond.export")
TOOL_LOGGER = "onnxruntime"


class _Demote(logging.Filter):
    """On the root logger: records that ONNX Runtime's modules log straight to it go to our debug log instead."""

    def filter(self, record: logging.LogRecord) -> bool:
        if f"{TOOL_LOGGER}/" in record.pathname.replace("\\", "/") or record.name.startswith(TOOL_LOGGER):
            log.debug("%s: %s", record.name, record.getMessage())
            return False
        return True


@contextlib.contextmanager
def quiet_tools(tool: str) -> Iterator[None]:
    tool_logger = logging.getLogger(TOOL_LOGGER)
    previous_level = tool_logger.level
    demote = _Demote()
    tool_logger.setLevel(logging.DEBUG if log.isEnabledFor(logging.DEBUG) else logging.WARNING)
    tool_logger.addFilter(demote)
    logging.root.addFilter(demote)
    printed = io.StringIO()
    try:
        with contextlib.redirect_stdout(printed):
            yield
    finally:
        logging.root.removeFilter(demote)
        tool_logger.removeFilter(demote)
        tool_logger.setLevel(previous_level)
        for line in printed.getvalue().splitlines():
            if line.strip():
                log.debug("%s: %s", tool, line.strip())
