"""Property-based fuzzing of a live server: whatever a client sends, the answer is a clear status.

Thousands of generated requests (field values of every type and range,
unicode and control characters, huge strings, unknown enum numbers) and
corrupt wire bytes go to a real server. None may end in INTERNAL or UNKNOWN;
every error message is non-empty and under 8 KB; the server still serves at
the end. Valid requests are kept cheap (small sizes, at most 2 steps) so the
default profile runs within a minute; DIFFUSIOND_FUZZ_EXAMPLES=20000 runs a
longer one.
"""

from __future__ import annotations

import os

import grpc
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from diffusiond.api.v1 import diffusion_pb2 as pb

EXAMPLES = int(os.environ.get("DIFFUSIOND_FUZZ_EXAMPLES", "2000"))
INT32 = st.integers(-(2**31), 2**31 - 1)
UINT64 = st.integers(0, 2**64 - 1)
MAX_STATUS_BYTES = 8 * 1024
BAD_CODES = (grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN)
FUZZ = settings(max_examples=EXAMPLES, deadline=None, database=None, derandomize=True,
                suppress_health_check=list(HealthCheck))


def text(max_size: int = 40) -> st.SearchStrategy[str]:
    return st.one_of(
        st.text(max_size=max_size),
        st.text(alphabet=st.characters(max_codepoint=0x1F), max_size=8),  # control characters
        st.sampled_from(["", " ", "a fox", "\n", "\x1b[31m", "req=forged", "\u202e", "x" * 50_000]),
    )


def cheap_or_wild(cheap: list[int]) -> st.SearchStrategy[int]:
    """Mostly values a valid request may take (kept cheap), sometimes anything an int32 holds."""
    return st.one_of(st.sampled_from(cheap), INT32)


requests = st.builds(
    pb.GenerateRequest,
    request_id=text(),
    model=st.one_of(st.just(""), st.just("builtin"), text()),
    prompt=st.one_of(st.just("a red circle"), text(200)),
    negative_prompt=text(),
    width=cheap_or_wild([0, 64, 72, 65, -64]),
    height=cheap_or_wild([0, 64, 80, 63]),
    steps=cheap_or_wild([1, 2, -1, 201]),
    guidance_scale=st.one_of(st.none(), st.floats(allow_nan=True, allow_infinity=True, width=32)),
    seed=st.one_of(st.none(), UINT64),
    num_images=cheap_or_wild([1, 2, -1, 9]),
    scheduler=st.one_of(st.sampled_from(["", "ddim", "euler_a", "dpm++_2m", "pndm", "nope"]), text()),
    output_format=st.integers(-3, 8),
    quality=cheap_or_wild([0, 1, 100, 101]),
    preview=st.builds(
        pb.PreviewOptions,
        kind=st.integers(-2, 7),
        every_n_steps=cheap_or_wild([0, 1, 3, -1]),
        max_size=cheap_or_wild([0, 16, 5000]),
    ),
)


def check(error: grpc.RpcError) -> None:
    assert error.code() not in BAD_CODES, f"{error.code()}: {error.details()}"
    details = error.details() or ""
    assert details and len(details.encode()) < MAX_STATUS_BYTES


@pytest.mark.filterwarnings("ignore:Generating overly large repr")  # the 50,000-character strings
@FUZZ
@given(request=requests, stream=st.booleans())
def test_generated_requests_get_clear_statuses(client, request, stream):
    try:
        if stream:
            for _ in client._stub.StreamProgress(request, timeout=60):
                pass
        else:
            client._stub.Generate(request, timeout=60)
    except grpc.RpcError as error:
        check(error)


@FUZZ
@given(payload=st.binary(max_size=256), method=st.sampled_from(["Generate", "StreamProgress", "ListModels"]))
def test_corrupt_wire_bytes_get_clear_statuses(raw_channel, payload, method):
    path = f"/diffusiond.v1.Diffusion/{method}"
    try:
        if method == "StreamProgress":
            list(raw_channel.unary_stream(path)(payload, timeout=60))
        else:
            raw_channel.unary_unary(path)(payload, timeout=60)
    except grpc.RpcError as error:
        check(error)


def test_the_server_still_serves_after_the_fuzzing(client):
    assert client.generate("a red circle", steps=1, seed=1).images
    assert client.list_models()
