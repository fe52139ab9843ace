"""Sync and asyncio clients over the generated gRPC stubs."""

from __future__ import annotations

import io
import json
import os
import re
from collections.abc import AsyncIterator, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

from diffusiond.api.v1 import diffusion_pb2 as pb
from diffusiond.api.v1 import diffusion_pb2_grpc as pb_grpc

Metadata = Sequence[tuple[str, str]]

FORMATS = {
    "png": pb.IMAGE_FORMAT_PNG,
    "jpeg": pb.IMAGE_FORMAT_JPEG,
    "jpg": pb.IMAGE_FORMAT_JPEG,
    "webp": pb.IMAGE_FORMAT_WEBP,
}
PREVIEWS = {
    "none": pb.PREVIEW_KIND_UNSPECIFIED,
    "latent": pb.PREVIEW_KIND_LATENT,
    "approx_rgb": pb.PREVIEW_KIND_APPROX_RGB,
    "full": pb.PREVIEW_KIND_FULL,
    "tiny_decoder": pb.PREVIEW_KIND_TINY_DECODER,
}
UPSCALERS = {
    "latent": pb.UPSCALER_LATENT_BICUBIC,
    "latent_bicubic": pb.UPSCALER_LATENT_BICUBIC,
    "lanczos": pb.UPSCALER_LANCZOS,
}
DEFAULT_MAX_MESSAGE_BYTES = 256 * 1024 * 1024
# Modes a PNG holds as they are; a PIL image in another mode (CMYK, float...) is sent as RGB.
_PNG_MODES = ("1", "L", "LA", "P", "RGB", "RGBA", "I", "I;16")
_SIZE = re.compile(r"(\d+)x(\d+)")
_SCALE = re.compile(r"(\d+(?:\.\d*)?|\.\d+)x?")

# What the client takes as an input image: encoded bytes (PNG, JPEG, WebP), a file path, a PIL image,
# or a numpy array (HxW, HxWx3, HxWx4; uint8, bool, or float in [0, 1]). Arrays and PIL images go as PNG.
ImageLike = Any
SERVICE = pb.DESCRIPTOR.services_by_name["Diffusion"].full_name
DEFAULT_ATTEMPTS = 5  # gRPC caps a retry policy at 5 attempts


def service_config(max_attempts: int = DEFAULT_ATTEMPTS, wait_for_ready: bool = False) -> str:
    """gRPC's retry policy for the Diffusion service: a call answered UNAVAILABLE (a server still loading its
    models or draining, one not reachable, or one that shut down before it finished the request) is tried
    again with exponential backoff, up to ``max_attempts`` in all (about 7 seconds of waiting at most). Such a
    request produced nothing, so trying it again is safe; a stream is retried only before its first event.
    ``wait_for_ready``: wait for a connection (within the call's timeout) rather than failing at once when
    nothing listens yet."""
    method: dict[str, Any] = {"name": [{"service": SERVICE}], "waitForReady": wait_for_ready}
    if max_attempts > 1:
        method["retryPolicy"] = {
            "maxAttempts": min(max_attempts, DEFAULT_ATTEMPTS),
            "initialBackoff": "0.5s",
            "maxBackoff": "4s",
            "backoffMultiplier": 2,
            "retryableStatusCodes": ["UNAVAILABLE"],
        }
    return json.dumps({"methodConfig": [method]})


class ClientError(Exception):
    """A failed call: ``code`` is the gRPC status code, ``details`` the server's message."""

    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(f"{code.name}: {details}")
        self.code = code
        self.details = details

    @classmethod
    def from_rpc_error(cls, error: grpc.RpcError) -> ClientError:
        code = error.code() if hasattr(error, "code") else grpc.StatusCode.UNKNOWN
        details = error.details() if hasattr(error, "details") else str(error)
        return cls(code, details or "")


@dataclass(frozen=True)
class GeneratedImage:
    data: bytes
    mime_type: str
    width: int
    height: int
    seed: int
    index: int

    @classmethod
    def from_proto(cls, image: pb.Image) -> GeneratedImage:
        return cls(image.data, image.mime_type, image.width, image.height, image.seed, image.index)

    def to_pil(self):
        from PIL import Image

        return Image.open(io.BytesIO(self.data))

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.write_bytes(self.data)
        return path


@dataclass(frozen=True)
class GenerateResult:
    images: list[GeneratedImage]
    seed: int
    response: pb.GenerateResponse

    @classmethod
    def from_proto(cls, response: pb.GenerateResponse) -> GenerateResult:
        return cls([GeneratedImage.from_proto(i) for i in response.images], response.seed, response)


def image_bytes(image: ImageLike, field: str = "image") -> bytes:
    """An input image as the bytes the server takes: encoded files as they are, pixels as a lossless PNG."""
    if isinstance(image, (bytes, bytearray, memoryview)):
        return bytes(image)
    if isinstance(image, (str, os.PathLike)):
        return Path(image).read_bytes()
    from PIL import Image

    if isinstance(image, Image.Image):
        pil = image if image.mode in _PNG_MODES else image.convert("RGB")
    elif hasattr(image, "__array_interface__"):
        pil = _array_to_image(image, field)
    else:
        raise TypeError(f"{field}: expected bytes, a path, a PIL image or a numpy array, got {type(image).__name__}")
    buffer = io.BytesIO()
    pil.save(buffer, format="PNG")
    return buffer.getvalue()


def _array_to_image(array: Any, field: str):
    import numpy as np  # an array came in, so numpy is there
    from PIL import Image

    a = np.asarray(array)
    if a.dtype == np.bool_:
        a = a.astype(np.uint8) * 255
    elif a.dtype.kind == "f":
        a = (np.clip(a, 0.0, 1.0) * 255).round().astype(np.uint8)
    elif a.dtype != np.uint8:
        raise ValueError(f"{field}: an array must be uint8, bool or float in [0, 1], got {a.dtype}")
    if a.ndim == 3 and a.shape[2] == 1:
        a = a[:, :, 0]
    if a.ndim == 2 or (a.ndim == 3 and a.shape[2] in (3, 4)):
        return Image.fromarray(np.ascontiguousarray(a))
    raise ValueError(f"{field}: an array must be HxW, HxWx3 or HxWx4, got shape {a.shape}")


def parse_hires(value: float | str | tuple[int, int]) -> tuple[float, int, int]:
    """A hi-res target as (scale, width, height): 2 / "2x" / "1.5" are scales, (w, h) / "WxH" sizes."""
    if isinstance(value, tuple):
        width, height = value
        return 0.0, int(width), int(height)
    if isinstance(value, (int, float)):
        return float(value), 0, 0
    text = str(value).strip().lower()
    if match := _SIZE.fullmatch(text):
        return 0.0, int(match.group(1)), int(match.group(2))
    if match := _SCALE.fullmatch(text):
        return float(match.group(1)), 0, 0
    raise ValueError(f"hires must be a scale (2, 2x, 1.5x) or a size (WIDTHxHEIGHT), got {value!r}")


def build_request(
    prompt: str,
    *,
    negative_prompt: str = "",
    width: int = 0,
    height: int = 0,
    steps: int = 0,
    guidance_scale: float | None = None,
    seed: int | None = None,
    num_images: int = 1,
    scheduler: str = "",
    output_format: str = "png",
    quality: int = 0,
    model: str = "",
    request_id: str = "",
    preview: str = "none",
    preview_every: int = 0,
    preview_max_size: int = 0,
    init_image: ImageLike | None = None,
    strength: float | None = None,
    mask: ImageLike | None = None,
    mask_blur: int = 0,
    keep_unmasked: bool = False,
    hires: float | str | tuple[int, int] | None = None,
    hires_steps: int = 0,
    hires_strength: float | None = None,
    hires_upscaler: str = "latent",
    cache_interval: int = 0,
    cache_depth: int = 0,
    loras: Mapping[str, float] | Sequence[tuple[str, float]] | None = None,
    control: pb.ControlOptions | None = None,
) -> pb.GenerateRequest:
    """A GenerateRequest from keyword arguments; 0 / None / "" mean "the model's default".

    ``init_image`` and ``mask`` take encoded bytes, a path, a PIL image or a numpy array;
    ``hires`` a scale (2, "2x") or a size ((w, h), "WxH").
    ``loras``: LoRA adapters to apply, ``{"name": scale}`` or ``[("name", scale), ...]`` (scale -2..2).
    """
    if output_format.lower() not in FORMATS:
        raise ValueError(f"output_format must be one of {', '.join(FORMATS)}, got {output_format!r}")
    if preview.lower() not in PREVIEWS:
        raise ValueError(f"preview must be one of {', '.join(PREVIEWS)}, got {preview!r}")
    if hires_upscaler.lower() not in UPSCALERS:
        raise ValueError(f"hires_upscaler must be one of {', '.join(UPSCALERS)}, got {hires_upscaler!r}")
    request = pb.GenerateRequest(
        request_id=request_id,
        model=model,
        prompt=prompt,
        negative_prompt=negative_prompt,
        width=width,
        height=height,
        steps=steps,
        num_images=num_images,
        scheduler=scheduler,
        output_format=FORMATS[output_format.lower()],
        quality=quality,
        preview=pb.PreviewOptions(
            kind=PREVIEWS[preview.lower()], every_n_steps=preview_every, max_size=preview_max_size
        ),
        cache_interval=cache_interval,
        cache_depth=cache_depth,
        loras=[pb.LoraRef(name=name, scale=scale)
               for name, scale in (loras.items() if isinstance(loras, Mapping) else loras or ())],
    )
    if guidance_scale is not None:
        request.guidance_scale = guidance_scale
    if seed is not None:
        request.seed = seed
    if control is not None:
        request.control.CopyFrom(control)
    if init_image is not None:
        request.init_image = image_bytes(init_image, "init_image")
    if strength is not None:
        request.strength = strength
    if mask is not None:
        request.mask_image = image_bytes(mask, "mask")
    request.mask_blur = mask_blur
    request.keep_unmasked = keep_unmasked
    if hires is not None:
        scale, width_, height_ = parse_hires(hires)
        request.hires.CopyFrom(pb.HiresOptions(scale=scale, width=width_, height=height_, steps=hires_steps,
                                               upscaler=UPSCALERS[hires_upscaler.lower()]))
        if hires_strength is not None:
            request.hires.strength = hires_strength
    return request


def control_options(
    *,
    image: bytes | str | Path | None = None,
    canny_from: bytes | str | Path | None = None,
    controlnet: str = "",
    scale: float | None = None,
    guidance_start: float | None = None,
    guidance_end: float | None = None,
    canny_low: float | None = None,
    canny_high: float | None = None,
) -> pb.ControlOptions:
    """ControlNet options: a control ``image`` or an image to take canny edges of (``canny_from``), as
    bytes or a file path; None leaves a field to the server's default (scale 1, window 0..1, 100/200)."""
    if (image is None) == (canny_from is None):
        raise ValueError("give exactly one of image and canny_from")

    def read(value: bytes | str | Path) -> bytes:
        return value if isinstance(value, bytes) else Path(value).read_bytes()

    msg = pb.ControlOptions(controlnet=controlnet)
    if image is not None:
        msg.image = read(image)
    else:
        msg.canny_from = read(canny_from)  # type: ignore[arg-type]
    for name, value in (("scale", scale), ("guidance_start", guidance_start), ("guidance_end", guidance_end),
                        ("canny_low", canny_low), ("canny_high", canny_high)):
        if value is not None:
            setattr(msg, name, value)
    return msg


def tls_credentials(ca: str | Path | None = None, cert: str | Path | None = None,
                    key: str | Path | None = None) -> grpc.ChannelCredentials:
    """Channel credentials from PEM files: ``ca`` to trust the server (default: the system's roots),
    ``cert`` and ``key`` to prove this client to a server that requires mutual TLS."""
    if (cert is None) != (key is None):
        raise ValueError("a client certificate needs its key, and a key its certificate")

    def read(path: str | Path | None) -> bytes | None:
        return None if path is None else Path(path).read_bytes()

    return grpc.ssl_channel_credentials(root_certificates=read(ca), private_key=read(key), certificate_chain=read(cert))


def auth_metadata(token: str | None) -> list[tuple[str, str]]:
    """The ``authorization`` header a server with ``--auth-tokens`` asks for."""
    return [("authorization", f"Bearer {token}")] if token else []


def _open_channel(
    api: Any,
    address: str,
    credentials: grpc.ChannelCredentials | None,
    compression: grpc.Compression | None,
    max_message_bytes: int,
    max_attempts: int = DEFAULT_ATTEMPTS,
    wait_for_ready: bool = False,
) -> Any:
    """A channel from ``grpc`` or ``grpc.aio`` (same signatures), secure when credentials are given,
    with the retry policy of ``service_config``."""
    options = [
        ("grpc.max_send_message_length", max_message_bytes),
        ("grpc.max_receive_message_length", max_message_bytes),
        ("grpc.enable_retries", 1),
        ("grpc.service_config", service_config(max_attempts, wait_for_ready)),
    ]
    if credentials is not None:
        return api.secure_channel(address, credentials, options=options, compression=compression)
    return api.insecure_channel(address, options=options, compression=compression)


class ProgressStream:
    """Iterate over a StreamProgress call's events; ``cancel()`` stops the server's work too."""

    def __init__(self, call: Any) -> None:
        self._call = call

    def __iter__(self) -> Iterator[pb.ProgressEvent]:
        try:
            yield from self._call
        except grpc.RpcError as error:
            raise ClientError.from_rpc_error(error) from None

    def cancel(self) -> None:
        self._call.cancel()


class DiffusionClient:
    """Blocking client. Use as a context manager, or call ``close()``."""

    def __init__(
        self,
        address: str = "127.0.0.1:50051",
        *,
        timeout: float | None = None,
        metadata: Metadata | None = None,
        credentials: grpc.ChannelCredentials | None = None,
        compression: grpc.Compression | None = None,
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
        token: str | None = None,
        max_attempts: int = DEFAULT_ATTEMPTS,
        wait_for_ready: bool = False,
    ) -> None:
        """``max_attempts``: tries of a call answered UNAVAILABLE (1: no retries); ``wait_for_ready``: wait
        for the server to listen instead of failing at once (see ``service_config``)."""
        self._channel = _open_channel(grpc, address, credentials, compression, max_message_bytes, max_attempts,
                                      wait_for_ready)
        self._stub = pb_grpc.DiffusionStub(self._channel)
        self.timeout = timeout
        self.metadata = [*auth_metadata(token), *(metadata or [])]

    def __enter__(self) -> DiffusionClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._channel.close()

    def _call_args(self, timeout: float | None, metadata: Metadata | None) -> dict[str, Any]:
        return {"timeout": timeout if timeout is not None else self.timeout, "metadata": [*self.metadata, *(metadata or [])]}

    def wait_ready(self, timeout: float = 30.0) -> None:
        """Block until the channel connects (not until models are loaded: see the health service)."""
        try:
            grpc.channel_ready_future(self._channel).result(timeout=timeout)
        except grpc.FutureTimeoutError:
            raise ClientError(grpc.StatusCode.UNAVAILABLE, f"no server answered within {timeout:g}s") from None

    def generate_request(
        self, request: pb.GenerateRequest, *, timeout: float | None = None, metadata: Metadata | None = None
    ) -> GenerateResult:
        try:
            return GenerateResult.from_proto(self._stub.Generate(request, **self._call_args(timeout, metadata)))
        except grpc.RpcError as error:
            raise ClientError.from_rpc_error(error) from None

    def generate(
        self, prompt: str, *, timeout: float | None = None, metadata: Metadata | None = None, **fields: Any
    ) -> GenerateResult:
        """Generate images; ``fields`` are ``build_request``'s keyword arguments."""
        return self.generate_request(build_request(prompt, **fields), timeout=timeout, metadata=metadata)

    def stream_request(
        self, request: pb.GenerateRequest, *, timeout: float | None = None, metadata: Metadata | None = None
    ) -> ProgressStream:
        return ProgressStream(self._stub.StreamProgress(request, **self._call_args(timeout, metadata)))

    def stream(
        self, prompt: str, *, timeout: float | None = None, metadata: Metadata | None = None, **fields: Any
    ) -> ProgressStream:
        """Progress events (queued, started, steps with previews, result) for one request."""
        return self.stream_request(build_request(prompt, **fields), timeout=timeout, metadata=metadata)

    def list_models(self, *, timeout: float | None = None, metadata: Metadata | None = None) -> list[pb.ModelInfo]:
        try:
            return list(self._stub.ListModels(pb.ListModelsRequest(), **self._call_args(timeout, metadata)).models)
        except grpc.RpcError as error:
            raise ClientError.from_rpc_error(error) from None


class AsyncDiffusionClient:
    """asyncio client. Use with ``async with``, or call ``await close()``."""

    def __init__(
        self,
        address: str = "127.0.0.1:50051",
        *,
        timeout: float | None = None,
        metadata: Metadata | None = None,
        credentials: grpc.ChannelCredentials | None = None,
        compression: grpc.Compression | None = None,
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
        token: str | None = None,
        max_attempts: int = DEFAULT_ATTEMPTS,
        wait_for_ready: bool = False,
    ) -> None:
        """``max_attempts``: tries of a call answered UNAVAILABLE (1: no retries); ``wait_for_ready``: wait
        for the server to listen instead of failing at once (see ``service_config``)."""
        self._channel = _open_channel(grpc.aio, address, credentials, compression, max_message_bytes, max_attempts,
                                      wait_for_ready)
        self._stub = pb_grpc.DiffusionStub(self._channel)
        self.timeout = timeout
        self.metadata = [*auth_metadata(token), *(metadata or [])]

    async def __aenter__(self) -> AsyncDiffusionClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        await self._channel.close()

    def _call_args(self, timeout: float | None, metadata: Metadata | None) -> dict[str, Any]:
        return {"timeout": timeout if timeout is not None else self.timeout, "metadata": [*self.metadata, *(metadata or [])]}

    async def generate(
        self, prompt: str, *, timeout: float | None = None, metadata: Metadata | None = None, **fields: Any
    ) -> GenerateResult:
        try:
            response = await self._stub.Generate(build_request(prompt, **fields), **self._call_args(timeout, metadata))
        except grpc.RpcError as error:
            raise ClientError.from_rpc_error(error) from None
        return GenerateResult.from_proto(response)

    async def stream(
        self, prompt: str, *, timeout: float | None = None, metadata: Metadata | None = None, **fields: Any
    ) -> AsyncIterator[pb.ProgressEvent]:
        """Progress events; leaving the ``async for`` early cancels the call and the server's work."""
        call = self._stub.StreamProgress(build_request(prompt, **fields), **self._call_args(timeout, metadata))
        try:
            async for event in call:
                yield event
        except grpc.RpcError as error:
            raise ClientError.from_rpc_error(error) from None
        finally:
            call.cancel()

    async def list_models(self, *, timeout: float | None = None, metadata: Metadata | None = None) -> list[pb.ModelInfo]:
        try:
            response = await self._stub.ListModels(pb.ListModelsRequest(), **self._call_args(timeout, metadata))
        except grpc.RpcError as error:
            raise ClientError.from_rpc_error(error) from None
        return list(response.models)
