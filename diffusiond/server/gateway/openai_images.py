"""``POST /v1/images/generations`` as OpenAI's images API defines it, onto a GenerateRequest.

OpenAI's fields map as follows: ``prompt``; ``n`` -> num_images; ``size``
("WxH", or "auto") -> width/height; ``model`` -> a model name from
``/v1/models`` (absent: the default); ``output_format`` png|jpeg|webp;
``output_compression`` -> JPEG/WebP quality; ``response_format`` must be
``b64_json`` (the default here: diffusiond hosts no image URLs). ``quality``,
``style``, ``moderation``, ``user`` and ``partial_images`` are accepted and
ignored; a transparent ``background`` or ``stream`` are refused, naming why.
diffusiond's own fields go in the ``diffusiond`` object, as a GenerateRequest
in protobuf's JSON mapping (``negativePrompt``, ``steps``, ``guidanceScale``,
``seed``, ``scheduler``, ``requestId``); fields that OpenAI's own fields set are
refused there, so one request never says a thing twice.
"""

from __future__ import annotations

import base64
import re
import time
from typing import Any

from diffusiond.api.v1 import diffusion_pb2 as pb
from diffusiond.errors import InvalidArgument
from diffusiond.server.gateway.messages import parse_message, result_json
from diffusiond.service.outputs import EncodedResult

EXTENSION = "diffusiond"
FORMATS = {"png": pb.IMAGE_FORMAT_PNG, "jpeg": pb.IMAGE_FORMAT_JPEG, "jpg": pb.IMAGE_FORMAT_JPEG,
           "webp": pb.IMAGE_FORMAT_WEBP}
IGNORED = ("quality", "style", "moderation", "user", "partial_images")
KNOWN = ("prompt", "n", "size", "model", "response_format", "output_format", "output_compression", "background",
         "stream", EXTENSION, *IGNORED)
# Set through OpenAI's fields, so not in the extension object.
OWNED = {"prompt": "prompt", "numImages": "n", "width": "size", "height": "size", "outputFormat": "output_format",
         "quality": "output_compression", "model": "model", "preview": "(nothing: previews are for streams)"}
_SIZE = re.compile(r"(\d{1,5})x(\d{1,5})")


def _typed(body: dict[str, Any], name: str, kind: type | tuple[type, ...], what: str) -> Any:
    value = body.get(name)
    if value is None:
        return None
    if not isinstance(value, kind) or isinstance(value, bool) and kind is not bool:
        raise InvalidArgument(name, f"must be {what}, got {type(value).__name__}")
    return value


def request_from_openai(body: Any) -> pb.GenerateRequest:
    if not isinstance(body, dict):
        raise InvalidArgument("request", "must be a JSON object (OpenAI's image generation request)")
    for name in body:
        if name not in KNOWN:
            raise InvalidArgument(
                str(name)[:64], f"not an images API field diffusiond knows; its own fields go in '{EXTENSION}'"
            )
    msg = pb.GenerateRequest()
    extension = body.get(EXTENSION)
    if extension is not None:
        parse_message(extension, msg, EXTENSION)
        for field, owner in OWNED.items():
            if field in _set_fields(extension):
                raise InvalidArgument(f"{EXTENSION}.{field}", f"set it with the images API's {owner}")
    msg.prompt = _typed(body, "prompt", str, "a string") or ""
    n = _typed(body, "n", int, "an integer")
    if n is not None:
        if n < 1:
            raise InvalidArgument("n", f"must be at least 1, got {n}")
        msg.num_images = min(n, 2**31 - 1)
    size = _typed(body, "size", str, 'a string "WIDTHxHEIGHT" or "auto"')
    if size not in (None, "auto"):
        match = _SIZE.fullmatch(size)
        if match is None:
            raise InvalidArgument("size", f'must be "WIDTHxHEIGHT" (e.g. "512x512") or "auto", got {size[:32]!r}')
        msg.width, msg.height = int(match.group(1)), int(match.group(2))
    msg.model = _typed(body, "model", str, "a string") or ""
    response_format = _typed(body, "response_format", str, "a string")
    if response_format not in (None, "b64_json"):
        raise InvalidArgument("response_format", "only 'b64_json' is offered: diffusiond returns images, it does "
                              "not host them at URLs")
    output_format = _typed(body, "output_format", str, "a string")
    if output_format is not None:
        if output_format.lower() not in FORMATS:
            raise InvalidArgument("output_format", f"must be png, jpeg or webp, got {output_format[:32]!r}")
        msg.output_format = FORMATS[output_format.lower()]
    compression = _typed(body, "output_compression", int, "an integer")
    if compression is not None:
        if not 1 <= compression <= 100:
            raise InvalidArgument("output_compression", f"must be between 1 and 100, got {compression}")
        msg.quality = compression
    if _typed(body, "background", str, "a string") not in (None, "auto", "opaque"):
        raise InvalidArgument("background", "only 'auto' or 'opaque': the images have no transparency")
    if _typed(body, "stream", bool, "true or false"):
        raise InvalidArgument("stream", "for progress and previews use POST /v1/generate/stream (Server-Sent Events)")
    return msg


def _set_fields(extension: dict[str, Any]) -> set[str]:
    """The extension's fields by their JSON names, whichever spelling the client used."""
    fields = pb.GenerateRequest.DESCRIPTOR.fields_by_name
    names = set()
    for key in extension:
        field = fields.get(key) or next((f for f in fields.values() if f.json_name == key), None)
        if field is not None:
            names.add(field.json_name)
    return names


def response_to_openai(result: EncodedResult) -> dict[str, Any]:
    """OpenAI's ImagesResponse; the rest of GenerateResponse (seeds, timings...) under ``diffusiond``."""
    request = result.request
    details = result_json(result)
    for image in details.get("images", []):
        image.pop("data", None)
    return {
        "created": int(time.time()),
        "data": [{"b64_json": base64.b64encode(image.data).decode("ascii"), "revised_prompt": None}
                 for image in result.images],
        "output_format": request.output_format.value,
        "size": f"{request.width}x{request.height}",
        EXTENSION: details,
    }
