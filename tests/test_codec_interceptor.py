"""The codec's two directions, and the interceptor every RPC passes through."""

from __future__ import annotations

import logging

import grpc
import pytest

from diffusiond.api.v1 import diffusion_pb2 as pb
from diffusiond.client import ClientError
from diffusiond.errors import InvalidArgument
from diffusiond.pipeline.request import ImageFormat, PreviewKind, Upscaler
from diffusiond.server import codec
from diffusiond.service.image_inputs import HiresParams
from diffusiond.service.resolver import GenerationParams, PreviewParams


@pytest.mark.parametrize(
    "params",
    [
        GenerationParams(prompt="a fox"),
        GenerationParams(
            prompt="a fox", negative_prompt="blurry", model="m", width=128, height=64, steps=12,
            guidance_scale=0.0, seed=0, num_images=3, scheduler="euler_a", output_format=ImageFormat.WEBP,
            quality=70, preview=PreviewParams(PreviewKind.APPROX_RGB, 2, 32), request_id="r-1",
        ),
        GenerationParams(prompt="x", seed=2**64 - 1, guidance_scale=7.5, output_format=ImageFormat.JPEG,
                         preview=PreviewParams(PreviewKind.LATENT)),
        GenerationParams(prompt="x", init_image=b"\x89PNG...", strength=0.0, mask_image=b"mask", mask_blur=4,
                         keep_unmasked=True),
        GenerationParams(prompt="x", init_image=b"jpeg", strength=0.75,
                         hires=HiresParams(scale=1.5, steps=7, strength=0.25, upscaler=Upscaler.LANCZOS)),
        GenerationParams(prompt="x", hires=HiresParams(width=1024, height=768)),
        GenerationParams(prompt="x", hires=HiresParams()),
    ],
)
def test_request_params_survive_the_round_trip(params):
    wire = pb.GenerateRequest.FromString(codec.params_to_proto(params).SerializeToString())
    assert codec.params_from_proto(wire) == params


def test_unset_optional_fields_stay_unset_and_zero_guidance_stays_zero():
    assert codec.params_from_proto(pb.GenerateRequest(prompt="p")).guidance_scale is None
    assert codec.params_from_proto(pb.GenerateRequest(prompt="p", guidance_scale=0.0)).guidance_scale == 0.0
    assert codec.params_from_proto(pb.GenerateRequest(prompt="p", seed=0)).seed == 0


def test_unset_strengths_and_hires_stay_unset():
    params = codec.params_from_proto(pb.GenerateRequest(prompt="p", init_image=b"x"))
    assert params.strength is None and params.hires is None
    params = codec.params_from_proto(pb.GenerateRequest(prompt="p", strength=0.0, hires=pb.HiresOptions()))
    assert params.strength == 0.0 and params.hires == HiresParams()  # present but empty: every default


@pytest.mark.parametrize(("msg", "field"), [
    (pb.GenerateRequest(prompt="p", output_format=9), "output_format"),
    (pb.GenerateRequest(prompt="p", preview=pb.PreviewOptions(kind=5)), "preview.kind"),
    (pb.GenerateRequest(prompt="p", hires=pb.HiresOptions(upscaler=7)), "hires.upscaler"),
])
def test_enum_values_this_server_does_not_know_are_refused(msg, field):
    with pytest.raises(InvalidArgument) as info:
        codec.params_from_proto(msg)
    assert info.value.field == field


def test_request_id_comes_from_the_field_then_the_metadata():
    assert codec.request_id_of(pb.GenerateRequest(request_id="a"), [("x-request-id", "b")]) == "a"
    assert codec.request_id_of(pb.GenerateRequest(), [("x-request-id", "b")]) == "b"
    assert len(codec.request_id_of(pb.GenerateRequest())) == 32
    with pytest.raises(InvalidArgument, match="metadata x-request-id"):
        codec.request_id_of(pb.GenerateRequest(), [("x-request-id", "\n")])


def requests_total(server, method: str, code: str) -> float:
    value = server.server.metrics.registry.get_sample_value(
        "diffusiond_requests_total", {"method": method, "code": code, "client": "-"}
    )
    return value or 0.0


def test_a_bug_is_internal_with_its_traceback_logged_and_no_internals_sent(server, client, counting, caplog):
    before = requests_total(server, "Generate", "INTERNAL")

    def crash(call_number: int) -> None:
        raise RuntimeError("secret internal detail")

    counting.before_unet = crash
    try:
        with caplog.at_level(logging.ERROR, logger="diffusiond"), pytest.raises(ClientError) as info:
            client.generate("a fox", steps=2, request_id="crash-1")
    finally:
        counting.before_unet = None
    assert info.value.code is grpc.StatusCode.INTERNAL
    assert "crash-1" in info.value.details and "secret" not in info.value.details
    assert any("secret internal detail" in (r.exc_text or "") for r in caplog.records)
    assert requests_total(server, "Generate", "INTERNAL") == before + 1
    assert client.generate("a fox", steps=1).images  # and the server goes on


def test_every_rpc_goes_through_the_interceptor(server, client):
    before = requests_total(server, "ListModels", "OK"), requests_total(server, "StreamProgress", "NOT_FOUND")
    client.list_models()
    with pytest.raises(ClientError):
        list(client.stream("a fox", steps=1, model="no-such-model"))
    after = requests_total(server, "ListModels", "OK"), requests_total(server, "StreamProgress", "NOT_FOUND")
    assert after == (before[0] + 1, before[1] + 1)
