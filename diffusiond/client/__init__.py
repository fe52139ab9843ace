"""Python client for diffusiond: sync (``DiffusionClient``) and asyncio (``AsyncDiffusionClient``).

Needs only grpcio, protobuf and pillow (numpy, for ``tensor_to_numpy``, when
present). Every call takes a ``timeout`` (seconds, sent as the gRPC deadline)
and ``metadata``; failures raise ``ClientError`` carrying the status code and
the server's message.

    with DiffusionClient("localhost:50051") as client:
        result = client.generate("a red fox in the snow", seed=7)
        result.images[0].save("fox.png")
"""

from diffusiond.client.client import (
    AsyncDiffusionClient,
    ClientError,
    DiffusionClient,
    GeneratedImage,
    GenerateResult,
    ProgressStream,
    auth_metadata,
    build_request,
    control_options,
    tls_credentials,
)
from diffusiond.client.tensors import tensor_to_numpy

__all__ = [
    "AsyncDiffusionClient",
    "ClientError",
    "DiffusionClient",
    "GenerateResult",
    "GeneratedImage",
    "ProgressStream",
    "auth_metadata",
    "build_request",
    "control_options",
    "tensor_to_numpy",
    "tls_credentials",
]
