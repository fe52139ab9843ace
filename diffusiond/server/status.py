"""The one table from exceptions to gRPC status codes, and from those to HTTP statuses.

Both front doors answer a failure through here: the gRPC interceptor with the
status code, the HTTP gateway with the code's name in its JSON error and the
HTTP status that matches it, so a client sees the same failure either way.
"""

from __future__ import annotations

import logging

import grpc

from diffusiond import errors

log = logging.getLogger(__name__)

MAX_MESSAGE_CHARS = 4000  # well under the 8 KB headers most gRPC clients accept

STATUS_FOR_EXCEPTION: dict[type[BaseException], grpc.StatusCode] = {
    errors.InvalidArgument: grpc.StatusCode.INVALID_ARGUMENT,
    errors.NotFound: grpc.StatusCode.NOT_FOUND,
    errors.ResourceExhausted: grpc.StatusCode.RESOURCE_EXHAUSTED,
    errors.FailedPrecondition: grpc.StatusCode.FAILED_PRECONDITION,
    errors.AdapterFileError: grpc.StatusCode.FAILED_PRECONDITION,
    errors.AdapterMismatch: grpc.StatusCode.FAILED_PRECONDITION,
    errors.Unavailable: grpc.StatusCode.UNAVAILABLE,
    errors.Unauthenticated: grpc.StatusCode.UNAUTHENTICATED,
    errors.Cancelled: grpc.StatusCode.CANCELLED,
    errors.DeadlineExceeded: grpc.StatusCode.DEADLINE_EXCEEDED,
    errors.MissingDependency: grpc.StatusCode.FAILED_PRECONDITION,
    MemoryError: grpc.StatusCode.RESOURCE_EXHAUSTED,
}

# gRPC code -> HTTP status, as Google's APIs and grpc-gateway map them (google/rpc/code.proto).
HTTP_STATUS_FOR_CODE: dict[grpc.StatusCode, int] = {
    grpc.StatusCode.OK: 200,
    grpc.StatusCode.CANCELLED: 499,
    grpc.StatusCode.UNKNOWN: 500,
    grpc.StatusCode.INVALID_ARGUMENT: 400,
    grpc.StatusCode.DEADLINE_EXCEEDED: 504,
    grpc.StatusCode.NOT_FOUND: 404,
    grpc.StatusCode.ALREADY_EXISTS: 409,
    grpc.StatusCode.PERMISSION_DENIED: 403,
    grpc.StatusCode.UNAUTHENTICATED: 401,
    grpc.StatusCode.RESOURCE_EXHAUSTED: 429,
    grpc.StatusCode.FAILED_PRECONDITION: 400,
    grpc.StatusCode.ABORTED: 409,
    grpc.StatusCode.OUT_OF_RANGE: 400,
    grpc.StatusCode.UNIMPLEMENTED: 501,
    grpc.StatusCode.INTERNAL: 500,
    grpc.StatusCode.UNAVAILABLE: 503,
    grpc.StatusCode.DATA_LOSS: 500,
}


def status_for(exc: BaseException) -> grpc.StatusCode:
    """The status code for ``exc``: its nearest class in the table, else INTERNAL (a bug)."""
    for cls in type(exc).__mro__:
        code = STATUS_FOR_EXCEPTION.get(cls)
        if code is not None:
            return code
    return grpc.StatusCode.INTERNAL


def http_status_for(code: grpc.StatusCode) -> int:
    return HTTP_STATUS_FOR_CODE.get(code, 500)


def describe_failure(exc: Exception, what: str, request_id: str) -> tuple[grpc.StatusCode, str]:
    """The status and the message a client gets for ``exc``, logged once: a bug with its traceback
    and a message that shows no internals, anything else as one line with its message (cut)."""
    code = status_for(exc)
    if code is grpc.StatusCode.INTERNAL:
        log.error("%s failed with an internal error", what, exc_info=exc)
        return code, f"internal error while serving request {request_id}; the server log has details"
    message = str(exc)
    if len(message) > MAX_MESSAGE_CHARS:
        message = message[:MAX_MESSAGE_CHARS] + "... (cut)"
    log.info("%s -> %s: %s", what, code.name, message)
    return code, message
