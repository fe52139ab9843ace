"""The one table from exceptions to gRPC status codes."""

from __future__ import annotations

import grpc

from diffusiond import errors

STATUS_FOR_EXCEPTION: dict[type[BaseException], grpc.StatusCode] = {
    errors.InvalidArgument: grpc.StatusCode.INVALID_ARGUMENT,
    errors.NotFound: grpc.StatusCode.NOT_FOUND,
    errors.ResourceExhausted: grpc.StatusCode.RESOURCE_EXHAUSTED,
    errors.FailedPrecondition: grpc.StatusCode.FAILED_PRECONDITION,
    errors.Unavailable: grpc.StatusCode.UNAVAILABLE,
    errors.Unauthenticated: grpc.StatusCode.UNAUTHENTICATED,
    errors.Cancelled: grpc.StatusCode.CANCELLED,
    errors.DeadlineExceeded: grpc.StatusCode.DEADLINE_EXCEEDED,
    errors.MissingDependency: grpc.StatusCode.FAILED_PRECONDITION,
    MemoryError: grpc.StatusCode.RESOURCE_EXHAUSTED,
}


def status_for(exc: BaseException) -> grpc.StatusCode:
    """The status code for ``exc``: its nearest class in the table, else INTERNAL (a bug)."""
    for cls in type(exc).__mro__:
        code = STATUS_FOR_EXCEPTION.get(cls)
        if code is not None:
            return code
    return grpc.StatusCode.INTERNAL
