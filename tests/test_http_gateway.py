"""The HTTP gateway: a second front door onto the same service, in the same process.

Real servers on loopback ports, real HTTP: the official ``openai`` package against
``/v1/images/generations``, the JSON mirror of GenerateRequest, Server-Sent Events,
models, health, errors with the gRPC code and its HTTP status, and the same tokens,
per-client limits, cancellation and drain as gRPC.
"""

from __future__ import annotations

import base64
import http.client
import io
import threading
import time
from collections.abc import Iterator

import grpc
import http_client as web
import openai
import pytest
from conftest import FaultyBackend, running_server
from google.protobuf import json_format
from PIL import Image

from diffusiond.api.v1 import diffusion_pb2 as pb
from diffusiond.client import DiffusionClient
from diffusiond.models.sources import ModelSource
from diffusiond.server.app import ServerSettings, ServerThread
from diffusiond.server.limits import ClientLimitSettings
from diffusiond.server.status import HTTP_STATUS_FOR_CODE, STATUS_FOR_EXCEPTION, http_status_for

WAIT_S = 120.0
TOKEN = "alice:alice-secret-token-0123"


def settings(builtin_dir, **fields) -> ServerSettings:
    return ServerSettings(host="127.0.0.1", port=0, http_port=0, models=[ModelSource("builtin", str(builtin_dir))],
                          **fields)


@pytest.fixture(scope="module")
def gateway(builtin_dir) -> Iterator[ServerThread]:
    with running_server(settings(builtin_dir), FaultyBackend) as thread:
        yield thread


@pytest.fixture
def backend(gateway) -> Iterator[FaultyBackend]:
    faulty = gateway.server.registry.get("builtin").pipeline.backend
    faulty.reset()
    yield faulty
    faulty.reset()


def requests_total(thread: ServerThread, method: str, code: str, client: str = "-") -> float:
    labels = {"method": method, "code": code, "client": client}
    return thread.server.metrics.registry.get_sample_value("diffusiond_requests_total", labels) or 0.0


def decode(data: bytes) -> Image.Image:
    image = Image.open(io.BytesIO(data))
    image.load()
    return image


# -- OpenAI's images API, through the official client ---------------------------------------


def openai_client(thread: ServerThread, api_key: str = "unused") -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{thread.http_url}/v1", api_key=api_key, max_retries=0, timeout=WAIT_S)


def test_openai_client_generates_the_same_images_as_grpc(gateway):
    response = openai_client(gateway).images.generate(
        prompt="a large red circle on a blue background, top left", n=2, size="64x64", response_format="b64_json",
        extra_body={"diffusiond": {"steps": 4, "seed": "7", "scheduler": "euler"}},
    )
    images = [base64.b64decode(item.b64_json) for item in response.data]
    assert [decode(data).size for data in images] == [(64, 64), (64, 64)]
    assert response.size == "64x64" and response.output_format == "png"
    details = response.model_extra["diffusiond"]
    assert [image["seed"] for image in details["images"]] == ["7", "8"]
    assert details["steps"] == 4 and details["scheduler"] == "euler" and details["model"] == "builtin"
    with DiffusionClient(gateway.address, timeout=WAIT_S) as client:
        same = client.generate("a large red circle on a blue background, top left", num_images=2, steps=4, seed=7,
                               scheduler="euler")
    assert [image.data for image in same.images] == images  # one service, one pipeline, byte for byte


def test_openai_client_sees_errors_with_their_codes(gateway):
    client = openai_client(gateway)
    with pytest.raises(openai.BadRequestError) as bad:
        client.images.generate(prompt="a fox", extra_body={"diffusiond": {"steps": 5000}})
    assert bad.value.status_code == 400
    assert bad.value.body["code"] == "INVALID_ARGUMENT" and bad.value.body["param"] == "steps"
    with pytest.raises(openai.NotFoundError) as missing:
        client.images.generate(prompt="a fox", model="dall-e-3")
    assert missing.value.body["code"] == "NOT_FOUND" and "dall-e-3" in missing.value.body["message"]
    with pytest.raises(openai.BadRequestError) as url:
        client.images.generate(prompt="a fox", response_format="url")
    assert url.value.body["param"] == "response_format" and "b64_json" in url.value.body["message"]


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"prompt": "a fox", "size": "large"}, "size"),
        ({"prompt": "a fox", "n": 0}, "n"),
        ({"prompt": "a fox", "n": "2"}, "n"),
        ({"prompt": "a fox", "stream": True}, "stream"),
        ({"prompt": "a fox", "background": "transparent"}, "background"),
        ({"prompt": "a fox", "colour": "red"}, "colour"),
        ({"prompt": "a fox", "diffusiond": {"prompt": "a hen"}}, "diffusiond.prompt"),
        ({"prompt": "a fox", "diffusiond": {"num_images": 3}}, "diffusiond.numImages"),
        ({"prompt": "a fox", "diffusiond": {"stepz": 3}}, "diffusiond"),
        ({"prompt": ""}, "prompt"),
    ],
)
def test_images_api_refuses_what_it_cannot_honour(gateway, body, param):
    reply = web.post(f"{gateway.http_url}/v1/images/generations", body)
    assert reply.status == 400, reply.body
    assert reply.json()["error"]["code"] == "INVALID_ARGUMENT" and reply.json()["error"]["param"] == param


def test_openai_client_lists_the_models(gateway):
    assert [model.id for model in openai_client(gateway).models.list()] == ["builtin"]


# -- the JSON mirror of the gRPC API -----------------------------------------------------------


def test_json_generate_mirrors_grpc(gateway):
    body = {"prompt": "a small yellow triangle on a black background", "steps": 3, "seed": "11", "numImages": 1,
            "outputFormat": "IMAGE_FORMAT_WEBP", "requestId": "json-1"}
    reply = web.post(f"{gateway.http_url}/v1/generate", body)
    assert reply.status == 200, reply.body
    assert reply.headers["x-request-id"] == "json-1"
    response = json_format.ParseDict(reply.json(), pb.GenerateResponse())
    assert response.request_id == "json-1" and response.seed == 11 and response.images[0].mime_type == "image/webp"
    with DiffusionClient(gateway.address, timeout=WAIT_S) as client:
        same = client.generate("a small yellow triangle on a black background", steps=3, seed=11, output_format="webp")
    assert response.images[0].data == same.images[0].data
    assert decode(response.images[0].data).format == "WEBP"


def test_request_id_header_is_used_when_the_body_has_none(gateway):
    reply = web.post(f"{gateway.http_url}/v1/generate", {"prompt": "a fox", "steps": 1},
                      headers={"x-request-id": "from-header"})
    assert reply.status == 200 and reply.json()["requestId"] == "from-header"


@pytest.mark.parametrize(
    ("raw", "status", "code", "fragment"),
    [
        (b"{not json", 400, "INVALID_ARGUMENT", "not valid JSON"),
        (b"", 400, "INVALID_ARGUMENT", "empty"),
        (b'["a list"]', 400, "INVALID_ARGUMENT", "JSON object"),
        (b'{"prompt": "a fox", "bogus": 1}', 400, "INVALID_ARGUMENT", "bogus"),
        (b'{"prompt": "a fox", "outputFormat": 9}', 400, "INVALID_ARGUMENT", "output_format"),
        (b'{"prompt": "a fox", "model": "nope"}', 404, "NOT_FOUND", "nope"),
        (b'{"prompt": "a fox", "scheduler": "nope"}', 404, "NOT_FOUND", "nope"),
        (b'{"prompt": "a fox", "width": 65}', 400, "INVALID_ARGUMENT", "multiple of 4"),
        (b'{"prompt": "a fox", "requestId": "has space"}', 400, "INVALID_ARGUMENT", "printable ASCII"),
    ],
)
def test_errors_are_json_with_the_grpc_code_and_its_http_status(gateway, raw, status, code, fragment):
    reply = web.request("POST", f"{gateway.http_url}/v1/generate", raw=raw,
                         headers={"content-type": "application/json"})
    assert reply.status == status, reply.body
    error = reply.json()["error"]
    assert error["code"] == code and error["status"] == status and fragment in error["message"]


def test_a_body_larger_than_a_grpc_request_may_be_is_refused(gateway):
    limit = gateway.server.settings.receive_limit_bytes
    reply = web.post(f"{gateway.http_url}/v1/generate", {"prompt": "x" * (limit + 1)})
    assert reply.status == 400 and str(limit) in reply.json()["error"]["message"]


def test_every_error_maps_to_the_http_status_of_its_grpc_code():
    expected = {grpc.StatusCode.INVALID_ARGUMENT: 400, grpc.StatusCode.NOT_FOUND: 404,
                grpc.StatusCode.RESOURCE_EXHAUSTED: 429, grpc.StatusCode.FAILED_PRECONDITION: 400,
                grpc.StatusCode.UNAVAILABLE: 503, grpc.StatusCode.UNAUTHENTICATED: 401,
                grpc.StatusCode.CANCELLED: 499, grpc.StatusCode.DEADLINE_EXCEEDED: 504}
    for code in STATUS_FOR_EXCEPTION.values():
        assert http_status_for(code) == expected[code]
    assert set(HTTP_STATUS_FOR_CODE) == set(grpc.StatusCode)
    assert http_status_for(grpc.StatusCode.INTERNAL) == 500


# -- Server-Sent Events ------------------------------------------------------------------------


def test_stream_sends_the_progress_events_with_previews_as_data_urls(gateway):
    body = {"prompt": "a large green square on a white background", "steps": 5, "seed": "3",
            "preview": {"kind": "PREVIEW_KIND_APPROX_RGB", "everyNSteps": 1}}
    with web.EventStream(f"{gateway.http_url}/v1/generate/stream", body) as stream:
        assert stream.status == 200 and stream.headers["content-type"].startswith("text/event-stream")
        events = list(stream)
    kinds = [kind for kind, _ in events]
    assert kinds == ["queued", "started", "step", "step", "step", "step", "step", "result"], kinds
    steps = [data["step"] for kind, data in events if kind == "step"]
    assert [s["step"] for s in steps] == [1, 2, 3, 4, 5] and all(s["totalSteps"] == 5 for s in steps)
    assert steps[-1]["etaS"] == 0
    for step in steps:
        url = step["previews"][0]["dataUrl"]
        assert url.startswith("data:image/jpeg;base64,")
        assert decode(base64.b64decode(url.split(",", 1)[1])).format == "JPEG"
    result = events[-1][1]["result"]
    final = base64.b64decode(result["images"][0]["dataUrl"].split(",", 1)[1])
    reply = web.post(f"{gateway.http_url}/v1/generate", {k: v for k, v in body.items() if k != "preview"})
    assert final == base64.b64decode(reply.json()["images"][0]["data"])  # the stream's result is Generate's


def test_stream_by_get_with_query_parameters(gateway):
    url = (f"{gateway.http_url}/v1/generate/stream?prompt=a+blue+circle&steps=2&seed=4"
           "&preview.kind=PREVIEW_KIND_FULL&preview.max_size=32")
    with web.EventStream(url) as stream:
        events = list(stream)
    previews = [data["step"]["previews"][0] for kind, data in events if kind == "step"]
    assert len(previews) == 2 and all(p["width"] == 32 for p in previews)
    assert events[-1][0] == "result" and events[-1][1]["result"]["seed"] == "4"


def test_stream_errors_before_it_starts_have_a_status(gateway):
    reply = web.get(f"{gateway.http_url}/v1/generate/stream?prompt=a+fox&steps=0.5")
    assert reply.status == 400 and reply.json()["error"]["code"] == "INVALID_ARGUMENT"
    reply = web.get(f"{gateway.http_url}/v1/generate/stream?prompt=a+fox&steps=1&steps=2")
    assert reply.status == 400 and reply.json()["error"]["param"] == "steps"


def test_a_disconnected_stream_stops_its_denoising(gateway, backend):
    batcher = gateway.server.batcher
    before = requests_total(gateway, "http:StreamProgress", "CANCELLED")
    held, stopped = threading.Event(), threading.Event()

    def hold_until_cancelled(sample) -> None:
        if len(backend.unet_rows) >= 2 and not held.is_set():  # after two steps, wait for the client to leave
            held.set()
            if batcher.running[0].wait_cancelled(WAIT_S):
                stopped.set()

    backend.before_unet = hold_until_cancelled
    body = {"prompt": "a fox", "steps": 50, "seed": "1"}
    with web.EventStream(f"{gateway.http_url}/v1/generate/stream", body) as stream:
        for kind, data in stream:
            if kind == "step" and data["step"]["step"] == 2:
                break
    assert stopped.wait(WAIT_S), "the request was not cancelled when its client disconnected"
    with DiffusionClient(gateway.address, timeout=WAIT_S) as client:
        client.generate("after", steps=1)  # the batcher has moved on
    assert len(backend.unet_rows) < 10
    assert requests_total(gateway, "http:StreamProgress", "CANCELLED") == before + 1


def test_a_disconnected_generate_stops_its_denoising(gateway, backend):
    batcher = gateway.server.batcher
    entered, stopped = threading.Event(), threading.Event()

    def hold_until_cancelled(sample) -> None:
        if not entered.is_set():
            entered.set()
            if batcher.running[0].wait_cancelled(WAIT_S):
                stopped.set()

    backend.before_unet = hold_until_cancelled
    connection = http.client.HTTPConnection("127.0.0.1", gateway.server.http_port, timeout=WAIT_S)
    connection.request("POST", "/v1/generate", body=b'{"prompt": "a fox", "steps": 50}',
                       headers={"content-type": "application/json"})
    assert entered.wait(WAIT_S)
    connection.sock.close()
    assert stopped.wait(WAIT_S), "the request was not cancelled when its client disconnected"


# -- models, health, metrics -------------------------------------------------------------------


def test_models_mirror_list_models(gateway):
    reply = web.get(f"{gateway.http_url}/v1/models")
    assert reply.status == 200
    models = json_format.ParseDict({"models": reply.json()["models"]}, pb.ListModelsResponse()).models
    assert [(m.name, m.default_width, m.default_steps, m.is_default) for m in models] == [("builtin", 64, 20, True)]
    assert reply.json()["data"][0]["id"] == "builtin"
    # The web page offers these, the first (the model's best live preview) selected.
    assert reply.json()["models"][0]["previewKinds"][:2] == ["PREVIEW_KIND_APPROX_RGB", "PREVIEW_KIND_FULL"]


def test_health_and_readiness_follow_loading(builtin_dir):
    thread = ServerThread(settings(builtin_dir))
    thread.start(load=False)
    try:
        assert web.get(f"{thread.http_url}/healthz").status == 200
        ready = web.get(f"{thread.http_url}/readyz")
        assert ready.status == 503 and ready.json()["error"]["code"] == "UNAVAILABLE"
        loading = web.post(f"{thread.http_url}/v1/generate", {"prompt": "a fox"})
        assert loading.status == 503 and "loading" in loading.json()["error"]["message"]
        thread.load()
        assert web.get(f"{thread.http_url}/readyz").json() == {"status": "ready", "models": ["builtin"]}
    finally:
        thread.stop()


def test_http_calls_are_counted_like_rpcs(gateway):
    before = requests_total(gateway, "http:Generate", "INVALID_ARGUMENT")
    web.post(f"{gateway.http_url}/v1/generate", {"prompt": ""})
    assert requests_total(gateway, "http:Generate", "INVALID_ARGUMENT") == before + 1


def test_the_page_is_served_with_its_script(gateway):
    page = web.get(f"{gateway.http_url}/")
    assert page.status == 200 and page.headers["content-type"].startswith("text/html")
    assert b'id="generate"' in page.body and "default-src 'self'" in page.headers["content-security-policy"]
    assert web.get(f"{gateway.http_url}/app.js").status == 200
    assert web.get(f"{gateway.http_url}/style.css").status == 200


# -- the same tokens, limits and drain as gRPC --------------------------------------------------


def test_tokens_and_per_client_limits_are_shared_with_grpc(builtin_dir):
    limits = ClientLimitSettings(max_inflight=1)
    with running_server(settings(builtin_dir, auth_tokens_text=TOKEN, client_limits=limits), FaultyBackend) as thread:
        url = f"{thread.http_url}/v1/generate"
        missing = web.post(url, {"prompt": "a fox", "steps": 1})
        assert missing.status == 401 and missing.json()["error"]["code"] == "UNAUTHENTICATED"
        wrong = web.post(url, {"prompt": "a fox", "steps": 1}, headers={"authorization": "Bearer not-a-known-token"})
        assert wrong.status == 401
        assert web.get(f"{thread.http_url}/healthz").status == 200  # health needs no token
        assert web.get(f"{thread.http_url}/v1/models").status == 401
        key = TOKEN.split(":", 1)[1]
        response = openai_client(thread, api_key=key).images.generate(prompt="a fox", extra_body={"diffusiond": {"steps": 1}})
        assert len(response.data) == 1

        backend = thread.server.registry.get("builtin").pipeline.backend
        entered, release = threading.Event(), threading.Event()

        def hold(sample) -> None:
            entered.set()
            release.wait(WAIT_S)

        backend.before_unet = hold
        with DiffusionClient(thread.address, timeout=WAIT_S, token=key) as client:
            call = client._stub.Generate.future(pb.GenerateRequest(prompt="held", steps=1),
                                                metadata=[("authorization", f"Bearer {key}")], timeout=WAIT_S)
            assert entered.wait(WAIT_S)
            over = web.post(url, {"prompt": "a fox", "steps": 1}, headers={"authorization": f"Bearer {key}"})
            release.set()
            assert call.result(WAIT_S).images
        assert over.status == 429 and over.json()["error"]["code"] == "RESOURCE_EXHAUSTED"
        assert "alice" in over.json()["error"]["message"]
        assert requests_total(thread, "http:ImagesGenerations", "OK", "alice") == 1


def test_a_draining_server_answers_accepted_http_calls(builtin_dir):
    thread = ServerThread(settings(builtin_dir))
    thread.start()
    backend = thread.server.registry.get("builtin").pipeline.backend = FaultyBackend(
        thread.server.registry.get("builtin").pipeline.backend
    )
    entered, release = threading.Event(), threading.Event()

    def hold(sample) -> None:
        if not entered.is_set():
            entered.set()
            release.wait(WAIT_S)

    backend.before_unet = hold
    replies: list[web.Reply] = []
    caller = threading.Thread(
        target=lambda: replies.append(web.post(f"{thread.http_url}/v1/generate", {"prompt": "a fox", "steps": 2}))
    )
    caller.start()
    assert entered.wait(WAIT_S)
    stopper = threading.Thread(target=thread.stop, kwargs={"grace": WAIT_S})
    stopper.start()
    deadline = time.monotonic() + WAIT_S
    while not thread.server.service.draining and time.monotonic() < deadline:  # the drain begins first
        stopper.join(0.01)
    assert thread.server.service.draining
    refused = web.post(f"{thread.http_url}/v1/generate", {"prompt": "too late", "steps": 1})
    assert refused.status == 503 and "shutting down" in refused.json()["error"]["message"]
    release.set()
    caller.join(WAIT_S)
    stopper.join(WAIT_S)
    assert replies and replies[0].status == 200, replies
    assert len(replies[0].json()["images"]) == 1


def test_https_with_the_grpc_certificate_and_client_ca(builtin_dir, tmp_path):
    import ssl

    from tls_certs import CertificateAuthority

    from diffusiond.server.tls import TlsSettings

    ca = CertificateAuthority(tmp_path)
    server_pem, client_pem = ca.issue("server", "localhost", server=True), ca.issue("client", "a client", server=False)
    tls = TlsSettings(cert=str(server_pem.cert), key=str(server_pem.key), client_ca=str(ca.pem))
    with running_server(settings(builtin_dir, tls=tls, warmup=False)) as thread:
        port = thread.server.http_port

        def get_models(with_certificate: bool) -> int:
            context = ssl.create_default_context(cafile=str(ca.pem))
            if with_certificate:
                context.load_cert_chain(str(client_pem.cert), str(client_pem.key))
            connection = http.client.HTTPSConnection("127.0.0.1", port, context=context, timeout=WAIT_S)
            try:
                connection.request("GET", "/v1/models")
                return connection.getresponse().status
            finally:
                connection.close()

        assert get_models(with_certificate=True) == 200
        with pytest.raises((ssl.SSLError, ConnectionError)):
            get_models(with_certificate=False)
