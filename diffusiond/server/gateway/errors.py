"""Failures as JSON: the gRPC code's name, the message, and the HTTP status that matches the code.

The body has the shape OpenAI's clients read (``{"error": {"message", "type",
"param", "code"}}``), with ``code`` the gRPC status name a gRPC client would
see for the same failure and ``status`` the HTTP status.
"""

from __future__ import annotations

from typing import Any

import grpc
from starlette.responses import JSONResponse

from diffusiond.errors import InvalidArgument
from diffusiond.server.status import describe_failure, http_status_for

_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
          404: "not_found_error", 429: "rate_limit_error"}


def error_body(code: grpc.StatusCode, message: str, request_id: str = "-", param: str | None = None) -> dict[str, Any]:
    status = http_status_for(code)
    return {
        "error": {
            "code": code.name,
            "message": message,
            "status": status,
            "type": _TYPES.get(status, "server_error" if status >= 500 else "request_error"),
            "param": param,
            "request_id": request_id,
        }
    }


def error_response(code: grpc.StatusCode, message: str, request_id: str = "-", param: str | None = None) -> JSONResponse:
    headers = {"x-request-id": request_id} if request_id != "-" else None
    return JSONResponse(error_body(code, message, request_id, param), status_code=http_status_for(code), headers=headers)


def failure(exc: Exception, what: str, request_id: str) -> tuple[grpc.StatusCode, dict[str, Any]]:
    """The code and JSON body for ``exc``, logged as the interceptor logs a failed RPC."""
    code, message = describe_failure(exc, what, request_id)
    param = exc.field if isinstance(exc, InvalidArgument) else None
    return code, error_body(code, message, request_id, param)
