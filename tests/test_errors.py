"""Every client mistake gets a clear status naming the field and the allowed values."""

from __future__ import annotations

import grpc
import pytest

from diffusiond.api.v1 import diffusion_pb2 as pb
from diffusiond.client import ClientError, build_request
from diffusiond.errors import (
    Cancelled,
    DeadlineExceeded,
    FailedPrecondition,
    InvalidArgument,
    MissingDependency,
    NotFound,
    ResourceExhausted,
    Unavailable,
)
from diffusiond.server.status import status_for

INVALID = grpc.StatusCode.INVALID_ARGUMENT


def call(client, request: pb.GenerateRequest) -> ClientError:
    with pytest.raises(ClientError) as info:
        client.generate_request(request)
    return info.value


@pytest.mark.parametrize(
    ("fields", "expected"),
    [
        (dict(prompt=""), ["prompt", "must not be empty"]),
        (dict(prompt="   "), ["prompt", "must not be empty"]),
        (dict(width=65), ["width", "multiple of 4", "65"]),  # the built-in model's latent factor is 4
        (dict(height=62), ["height", "multiple of 4"]),
        (dict(width=8), ["width", "between 32 and 2048", "got 8"]),
        (dict(height=4096), ["height", "between 32 and 2048", "got 4096"]),
        (dict(width=-64), ["width", "between 32 and 2048"]),
        (dict(steps=-1), ["steps", "between 1 and 200", "got -1"]),
        (dict(steps=201), ["steps", "between 1 and 200", "got 201"]),
        (dict(num_images=9), ["num_images", "between 1 and 8", "got 9"]),
        (dict(num_images=-2), ["num_images", "between 1 and 8"]),
        (dict(guidance_scale=float("nan")), ["guidance_scale", "finite", "nan"]),
        (dict(guidance_scale=float("inf")), ["guidance_scale", "finite"]),
        (dict(guidance_scale=-1.0), ["guidance_scale", "between 0.0 and 30.0"]),
        (dict(guidance_scale=31.0), ["guidance_scale", "between 0.0 and 30.0"]),
        (dict(output_format=7), ["output_format", "unknown value 7"]),
        (dict(quality=101), ["quality", "between 1 and 100"]),
        (dict(preview_kind=9), ["preview.kind", "unknown value 9"]),
        (dict(preview_every=-1), ["preview.every_n_steps", "between 1 and 200"]),
        (dict(request_id="x" * 200), ["request_id", "1 to 128 printable ASCII", "got 200 characters"]),
        (dict(request_id="a b"), ["request_id", "without spaces"]),
    ],
)
def test_invalid_argument_names_the_field(client, fields, expected):
    request = build_request(fields.pop("prompt", "a fox"), steps=2)
    kind = fields.pop("preview_kind", None)
    every = fields.pop("preview_every", None)
    for name, value in fields.items():
        setattr(request, name, value)
    if kind is not None:
        request.preview.kind = kind
    if every is not None:
        request.preview.every_n_steps = every
    error = call(client, request)
    assert error.code is INVALID, error
    for text in expected:
        assert text in error.details


def test_invalid_argument_on_stream_too(client):
    with pytest.raises(ClientError) as info:
        list(client.stream("a fox", width=65))
    assert info.value.code is INVALID and "width" in info.value.details


@pytest.mark.parametrize(
    ("fields", "expected"),
    [
        (dict(model="no-such-model"), ["model 'no-such-model' is not loaded", "builtin"]),
        (dict(scheduler="warp_drive"), ["scheduler 'warp_drive'", "euler_a"]),
    ],
)
def test_not_found(client, fields, expected):
    error = call(client, build_request("a fox", steps=2, **fields))
    assert error.code is grpc.StatusCode.NOT_FOUND
    for text in expected:
        assert text in error.details


def test_scheduler_aliases_accepted(client):
    result = client.generate("a fox", steps=2, seed=1, scheduler="Euler_Ancestral")
    assert result.response.scheduler == "euler_a"


def test_server_survives_bad_requests(client):
    for _ in range(3):
        call(client, build_request("", steps=2))
    assert client.generate("a fox", steps=1, seed=1).images


@pytest.mark.parametrize(
    ("exc", "code"),
    [
        (InvalidArgument("width", "bad"), grpc.StatusCode.INVALID_ARGUMENT),
        (NotFound("x"), grpc.StatusCode.NOT_FOUND),
        (ResourceExhausted("x"), grpc.StatusCode.RESOURCE_EXHAUSTED),
        (FailedPrecondition("x"), grpc.StatusCode.FAILED_PRECONDITION),
        (Unavailable("x"), grpc.StatusCode.UNAVAILABLE),
        (Cancelled("x"), grpc.StatusCode.CANCELLED),
        (DeadlineExceeded("x"), grpc.StatusCode.DEADLINE_EXCEEDED),
        (MissingDependency("onnxruntime", "the onnxruntime backend", "onnx"), grpc.StatusCode.FAILED_PRECONDITION),
        (MemoryError(), grpc.StatusCode.RESOURCE_EXHAUSTED),
        (ZeroDivisionError(), grpc.StatusCode.INTERNAL),
    ],
)
def test_status_table(exc, code):
    assert status_for(exc) is code
