"""The exceptions diffusiond raises for conditions a client or operator can cause.

Each class corresponds to one gRPC status code; the single mapping from class to
code lives in ``diffusiond.server.status``. Code that detects a problem raises
one of these with a message that names the field or thing at fault; it never
chooses a status code itself. Any other exception reaching the servicer is a bug
and becomes INTERNAL.
"""

from __future__ import annotations

SHOWN_CHARS = 100


def shown(value: object, limit: int = SHOWN_CHARS) -> str:
    """A client-supplied value as it may appear in a message or a log line: quoted, with control
    characters escaped, and cut to ``limit`` characters with an ellipsis, so that no input can
    forge a log line or swell a status message past gRPC's header limit."""
    text = str(value)
    cut = len(text) > limit
    escaped = repr(text[:limit])
    return f"{escaped}... ({len(text)} characters)" if cut else escaped



class DiffusiondError(Exception):
    """Base class: a failure with a message meant for the client."""


class InvalidArgument(DiffusiondError):
    """A request field is malformed or out of range."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field


class NotFound(DiffusiondError):
    """A named model, scheduler, adapter or file does not exist."""


class ResourceExhausted(DiffusiondError):
    """The queue is full, or the work does not fit in memory."""


class OutOfMemory(MemoryError):
    """A network call did not fit in device (or host) memory.

    The one out-of-memory exception: every backend raises it, whatever its
    runtime reports (``torch.OutOfMemoryError``, an ONNX Runtime allocation
    failure, a TensorRT allocation failure), so the pipeline can retry the call
    with fewer rows. It is a ``MemoryError``, which maps to RESOURCE_EXHAUSTED
    when it reaches a client.
    """


class FailedPrecondition(DiffusiondError):
    """The request is valid, but this model or machine cannot serve it
    (e.g. an engine built for another GPU, a shape outside its profile)."""


class AdapterFileError(FailedPrecondition):
    """An adapter file cannot be used: not a LoRA format diffusiond reads, unreadable, or made for
    another base model. The message names the file."""


class AdapterMismatch(FailedPrecondition):
    """The request asks for adapters this model cannot apply (an export with other adapters fused
    into its weights, or a backend that applies none). The message says what the model holds."""


class Unavailable(DiffusiondError):
    """The server is loading or draining; retrying later may succeed."""


class Unauthenticated(DiffusiondError):
    """The call carries no valid credentials (a missing or unknown bearer token)."""


class Cancelled(DiffusiondError):
    """The client cancelled the call."""


class DeadlineExceeded(DiffusiondError):
    """The call's deadline passed before its work finished."""


class MissingDependency(DiffusiondError):
    """An optional dependency (onnxruntime, tensorrt, CUDA...) is not installed.

    Raised instead of a bare ImportError so the operator is told which extra to
    install.
    """

    def __init__(self, package: str, needed_for: str, extra: str | None = None) -> None:
        hint = f" (pip install 'diffusiond[{extra}]')" if extra else ""
        super().__init__(f"{needed_for} needs the '{package}' package, which is not installed{hint}")
        self.package = package
