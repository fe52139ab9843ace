"""JSON bodies <-> the service layer, through the ``.proto`` messages and protobuf's JSON mapping.

A JSON request is parsed into a ``GenerateRequest`` with ``json_format`` and
then goes through the gRPC codec, so it is checked exactly as a gRPC request
is; answers are the same messages printed back (lowerCamelCase names, enums by
name, 64-bit integers as strings, bytes as base64). In Server-Sent Events every
image carries ``dataUrl`` (``data:image/jpeg;base64,...``) instead of ``data``,
so a browser can show it as it is.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import replace
from typing import Any

from google.protobuf import json_format
from google.protobuf.message import Message

from diffusiond.api.v1 import diffusion_pb2 as pb
from diffusiond.errors import InvalidArgument
from diffusiond.server import codec
from diffusiond.server.interceptor import ANONYMOUS
from diffusiond.service.generation import ProgressEvent
from diffusiond.service.models import LoadedModel
from diffusiond.service.outputs import EncodedResult
from diffusiond.service.resolver import GenerationParams

MAX_PARSE_MESSAGE_CHARS = 400


def to_json(message: Message) -> dict[str, Any]:
    return json_format.MessageToDict(message, always_print_fields_with_no_presence=True)


def parse_json(body: bytes, what: str = "request") -> Any:
    if not body.strip():
        raise InvalidArgument(what, "the body is empty; send a JSON object")
    try:
        return json.loads(body)
    except (ValueError, UnicodeDecodeError) as exc:
        raise InvalidArgument(what, f"not valid JSON ({str(exc)[:MAX_PARSE_MESSAGE_CHARS]})") from None


def parse_message(data: Any, message: Message, what: str) -> Message:
    """``data`` (decoded JSON) into ``message`` by protobuf's JSON mapping; INVALID_ARGUMENT says why not."""
    if not isinstance(data, dict):
        raise InvalidArgument(what, f"must be a JSON object ({type(message).__name__} in protobuf's JSON mapping)")
    try:
        return json_format.ParseDict(data, message)
    except json_format.ParseError as exc:
        raise InvalidArgument(what, str(exc).replace("\n", " ")[:MAX_PARSE_MESSAGE_CHARS]) from None


def generate_request(data: Any) -> pb.GenerateRequest:
    return parse_message(data, pb.GenerateRequest(), "request")


def query_request(query: Iterable[tuple[str, str]]) -> pb.GenerateRequest:
    """A GenerateRequest from URL query parameters (``GET /v1/generate/stream``): each field by its
    name (``steps=20``), ``preview.kind=PREVIEW_KIND_APPROX_RGB`` for the nested preview options."""
    data: dict[str, Any] = {}
    for key, value in query:
        parent, _, child = key.partition(".")
        target = data.setdefault(parent, {}) if child else data
        name = child or parent
        if not isinstance(target, dict) or name in target:
            raise InvalidArgument(key, "given twice (or both as a field and as its parent)")
        target[name] = value
    return generate_request(data)


def params_of(message: pb.GenerateRequest, headers: Iterable[tuple[str, str]], client: str) -> GenerationParams:
    """The service's parameters; the request id from the body, else the ``x-request-id`` header."""
    request_id = codec.request_id_of(message, list(headers))
    params = codec.params_from_proto(message, request_id)
    return params if client == ANONYMOUS else replace(params, client=client)


def result_json(result: EncodedResult) -> dict[str, Any]:
    return to_json(codec.response_to_proto(result))


def event_json(request_id: str, event: ProgressEvent) -> tuple[str, dict[str, Any]]:
    """The event's kind (``queued``, ``started``, ``step``, ``result``) and its ProgressEvent JSON,
    images as data URLs."""
    message = codec.event_to_proto(request_id, event)
    kind = message.WhichOneof("event")
    data = to_json(message)
    body = data.get(kind, {})
    for image in [*body.get("previews", []), *body.get("images", [])]:
        image["dataUrl"] = f"data:{image.get('mimeType', 'application/octet-stream')};base64,{image.pop('data', '')}"
    return kind, data


def models_json(models: Iterable[tuple[LoadedModel, bool]]) -> dict[str, Any]:
    """ListModelsResponse's JSON, plus OpenAI's model list (``object``/``data``) so its clients can list them."""
    infos = [codec.model_info(model, default) for model, default in models]
    return {
        "object": "list",
        "data": [{"id": info.name, "object": "model", "created": 0, "owned_by": "diffusiond"} for info in infos],
        **to_json(pb.ListModelsResponse(models=infos)),
    }


def sse_frame(event: str, data: Mapping[str, Any]) -> bytes:
    """One Server-Sent Event; JSON never holds a raw newline, so ``data`` is one line."""
    return f"event: {event}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n".encode()
