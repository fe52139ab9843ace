"""Assembling and running the server: gRPC, health, reflection, models, batcher, metrics, shutdown.

The server starts listening before its models are loaded, with health
NOT_SERVING and Generate answering UNAVAILABLE, so orchestrators can tell
"starting" from "dead". Once every model is loaded and warmed up, health turns
SERVING (health service ``liveness`` is SERVING all along, for liveness
probes). ``stop`` drains: NOT_SERVING, new calls refused with UNAVAILABLE,
accepted requests (queued and running) finish and their answers are sent
within the grace period; what is left then ends with UNAVAILABLE.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio
from grpc_reflection.v1alpha import reflection

from diffusiond.api.v1 import diffusion_pb2_grpc as pb_grpc
from diffusiond.backends.base import BackendSettings
from diffusiond.errors import MissingDependency, NotFound
from diffusiond.models.sources import ModelSource, resolve_model_dir
from diffusiond.server import transport
from diffusiond.server.auth import TokenStore
from diffusiond.server.interceptor import SERVICE_NAME, CallTracker, ServiceInterceptor
from diffusiond.server.limits import ClientLimits, ClientLimitSettings
from diffusiond.server.metrics import CacheCollector, GpuCollector, ServerMetrics
from diffusiond.server.servicer import DiffusionServicer
from diffusiond.server.tls import TlsSettings, server_credentials
from diffusiond.service.adapters import AdapterLibrary, resolve_lora_dir
from diffusiond.service.batcher import Batcher, BatcherSettings
from diffusiond.service.control import ControlNetSource
from diffusiond.service.generation import GenerationService
from diffusiond.service.image_decode import DEFAULT_MAX_IMAGE_BYTES, DEFAULT_MAX_PIXELS, ImageLimits
from diffusiond.service.limits import ModelLimits
from diffusiond.service.models import ModelRegistry, load_model, warm_up
from diffusiond.service.result_cache import ResultCache

log = logging.getLogger(__name__)

# A health service name that is SERVING from the moment the server listens until it stops, loading and
# draining included: a liveness probe checks it, so a loading or draining server is never restarted as broken.
LIVENESS_SERVICE = "liveness"
# After the grace period, how long aborted requests get to send their UNAVAILABLE.
ABORT_GRACE_S = 2.0


@dataclass
class ServerSettings:
    host: str = "127.0.0.1"
    port: int = 50051
    models: list[ModelSource] = field(default_factory=lambda: [ModelSource.parse("builtin")])
    backend: str = "torch"
    backend_settings: BackendSettings = field(default_factory=BackendSettings)
    batcher: BatcherSettings = field(default_factory=BatcherSettings)
    max_size: int = 2048
    grace_period_s: float = 30.0
    # None: transport.largest_response_bytes(max_size, max_images), enough for any answer.
    max_send_message_bytes: int | None = None
    # None: transport.largest_request_bytes(max_input_image_bytes), enough for any request with images.
    max_receive_message_bytes: int | None = None
    # Each input image (init, mask): checked before it is decoded.
    max_input_image_bytes: int = DEFAULT_MAX_IMAGE_BYTES
    max_input_pixels: int = DEFAULT_MAX_PIXELS
    compression: str = "none"  # default compression of responses: none or gzip
    warmup: bool = True
    prompt_cache_size: int = 256  # prompt encodings kept per model
    result_cache_bytes: int = 0  # 0: no result cache
    metrics_host: str | None = None  # None: the gRPC host
    metrics_port: int | None = None  # None: no /metrics endpoint; 0: any free port
    http_host: str | None = None  # None: the gRPC host
    http_port: int | None = None  # None: no HTTP gateway; 0: any free port
    # Authentication: name:token pairs from a file (re-read when it changes, and on SIGHUP) or as text.
    auth_tokens_file: str = ""
    auth_tokens_text: str = ""
    reflection: bool = True  # behind authentication when it is on
    tls: TlsSettings | None = None
    client_limits: ClientLimitSettings = field(default_factory=ClientLimitSettings)
    safety_checker: str = ""  # a StableDiffusionSafetyChecker directory: every model's outputs are filtered
    # TINY_DECODER previews: model name -> an AutoencoderTiny directory (beside the models' own preview_decoder/).
    preview_decoders: dict[str, str] = field(default_factory=dict)
    cache_interval: int = 1  # step caching for requests that leave it at 0 (1: off, exact)
    cache_depth: int = 1
    lora_dir: str = ""  # LoRA adapters served from this directory ("" none)
    lora_cache_bytes: int = 256 * 2**20  # converted adapters kept in memory (LRU)
    controlnets: list[ControlNetSource] = field(default_factory=list)  # attached at load; "" model: the first

    def __post_init__(self) -> None:
        transport.compression_named(self.compression)  # raises ValueError naming the choices
        for name in ("prompt_cache_size", "result_cache_bytes"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must not be negative, got {getattr(self, name)}")
        for name in ("max_send_message_bytes", "max_receive_message_bytes"):
            value = getattr(self, name)
            if value is not None and value < 1024:
                raise ValueError(f"{name} must be at least 1024 bytes, got {value}")
        if self.grace_period_s < 0:
            raise ValueError(f"grace_period_s must not be negative, got {self.grace_period_s}")
        unknown = sorted(set(self.preview_decoders) - {m.name for m in self.models})
        if unknown:
            raise ValueError(f"--preview-decoder names model(s) not served: {', '.join(unknown)}")
        if self.auth_tokens_file and self.auth_tokens_text:
            raise ValueError("give auth tokens in a file or as text, not both")
        ImageLimits(self.max_input_image_bytes, self.max_input_pixels)  # ValueError naming a limit out of range

    @property
    def input_images(self) -> ImageLimits:
        return ImageLimits(max_bytes=self.max_input_image_bytes, max_pixels=self.max_input_pixels)

    @property
    def receive_limit_bytes(self) -> int:
        if self.max_receive_message_bytes is not None:
            return self.max_receive_message_bytes
        return transport.largest_request_bytes(self.max_input_image_bytes)

    @property
    def send_limit_bytes(self) -> int:
        if self.max_send_message_bytes is not None:
            return self.max_send_message_bytes
        side = max(self.max_size, transport.LARGEST_NATIVE_SIZE)
        return transport.largest_response_bytes(side, ModelLimits.max_images)


def _token_store(settings: ServerSettings) -> TokenStore | None:
    if settings.auth_tokens_file:
        return TokenStore(path=Path(settings.auth_tokens_file))
    if settings.auth_tokens_text:
        return TokenStore(text=settings.auth_tokens_text)
    return None


class DiffusionServer:
    def __init__(self, settings: ServerSettings) -> None:
        self.settings = settings
        self.registry = ModelRegistry()
        self.metrics = ServerMetrics()
        self.batcher = Batcher(settings.batcher, self.metrics)
        self.result_cache = ResultCache(settings.result_cache_bytes) if settings.result_cache_bytes > 0 else None
        self.service = GenerationService(self.registry, self.batcher, self.result_cache)
        self.calls = CallTracker()
        self.tokens = _token_store(settings)
        self.client_limits = ClientLimits(settings.client_limits)  # one budget per client across both front doors
        self.health = health_aio.HealthServicer()
        self.port: int | None = None
        self.metrics_port: int | None = None
        self.http_port: int | None = None
        self._server: grpc.aio.Server | None = None
        self._gateway: Any = None  # gateway.server.HttpGateway, imported only when --http-port asks for it
        self.metrics.watch_batcher(lambda: self.batcher.queue_depth, lambda: len(self.batcher.running))
        self.metrics.add_collector(
            CacheCollector(lambda: [(m.name, m.pipeline.prompts) for m in self.registry], self.result_cache)
        )
        self.metrics.add_collector(GpuCollector(self._cuda_devices))

    def _cuda_devices(self) -> list[int]:
        devices = {m.backend.device for m in self.registry if m.backend.device.type == "cuda"}
        return sorted(d.index if d.index is not None else 0 for d in devices)

    async def start(self) -> int:
        """Bind and serve (health NOT_SERVING until ``load`` finishes); return the bound port."""
        settings = self.settings
        needed = transport.largest_request_bytes(settings.max_input_image_bytes)
        if settings.receive_limit_bytes < needed:
            log.warning(
                "the receive limit (%d bytes) is below what two input images of the %d-byte limit need (%d bytes): "
                "such requests will be refused by the transport, without naming a field",
                settings.receive_limit_bytes, settings.max_input_image_bytes, needed,
            )
        options = transport.server_options(settings.send_limit_bytes, settings.receive_limit_bytes)
        server = grpc.aio.server(
            options=options,
            compression=transport.compression_named(settings.compression),
            interceptors=[
                ServiceInterceptor(self.calls, self.metrics, self.tokens, self.client_limits)
            ],
        )
        pb_grpc.add_DiffusionServicer_to_server(DiffusionServicer(self.service), server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        if settings.reflection:
            reflection.enable_server_reflection(
                (SERVICE_NAME, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME),
                server,
            )
        address = f"{self.settings.host}:{self.settings.port}"
        if settings.tls is not None:
            port = server.add_secure_port(address, server_credentials(settings.tls))
        else:
            port = server.add_insecure_port(address)
        if port == 0:
            raise OSError(f"could not bind {address}")
        for service in ("", SERVICE_NAME):
            await self.health.set(service, health_pb2.HealthCheckResponse.NOT_SERVING)
        await self.health.set(LIVENESS_SERVICE, health_pb2.HealthCheckResponse.SERVING)
        await server.start()
        self._server, self.port = server, port
        log.info(
            "listening on %s:%d (%s, %s)", self.settings.host, port,
            "plaintext" if settings.tls is None else ("mutual TLS" if settings.tls.client_ca else "TLS"),
            f"tokens: {', '.join(self.tokens.names)}" if self.tokens is not None else "no authentication",
        )
        if settings.metrics_port is not None:
            self.metrics_port = self.metrics.serve_http(settings.metrics_host or settings.host, settings.metrics_port)
        if settings.http_port is not None:
            await self._start_gateway()
        return port

    async def _start_gateway(self) -> None:
        """The HTTP front door on the same service, tokens, limits and call tracking as gRPC."""
        settings = self.settings
        try:
            from diffusiond.server.gateway.app import Gateway
            from diffusiond.server.gateway.guard import Guard
            from diffusiond.server.gateway.server import HttpGateway
        except ImportError as exc:
            raise MissingDependency(exc.name or "starlette", "the HTTP gateway (--http-port)", "server") from None
        guard = Guard(self.calls, self.metrics, self.tokens, self.client_limits)
        app = Gateway(self.service, guard, settings.receive_limit_bytes).app()
        host = settings.http_host or settings.host
        self._gateway = HttpGateway(app, host, settings.http_port or 0, settings.tls)
        self.http_port = await self._gateway.start()
        scheme = "http" if settings.tls is None else "https"
        log.info("HTTP gateway and web page on %s://%s:%d/", scheme, host, self.http_port)

    def reload_tokens(self) -> None:
        """Read the auth tokens file again (SIGHUP)."""
        if self.tokens is not None:
            self.tokens.reload()

    async def load(self) -> None:
        """Load and warm up every model off the event loop, start the batcher, turn health SERVING."""
        await asyncio.to_thread(self._load_models)
        self.batcher.start()
        self.service.ready = True
        for service in ("", SERVICE_NAME):
            await self.health.set(service, health_pb2.HealthCheckResponse.SERVING)
        self.metrics.serving.set(1)
        log.info("serving %s", ", ".join(m.name for m in self.registry))

    def _load_models(self) -> None:
        library = AdapterLibrary(resolve_lora_dir(self.settings.lora_dir), self.settings.lora_cache_bytes) \
            if self.settings.lora_dir else None
        names = [source.name for source in self.settings.models]
        for controlnet in self.settings.controlnets:
            if controlnet.model and controlnet.model not in names:
                raise NotFound(f"--controlnet {controlnet.name}: no model named {controlnet.model!r} is served")
        for index, source in enumerate(self.settings.models):
            attached = {c.name: c.path for c in self.settings.controlnets
                        if c.model == source.name or (not c.model and index == 0)}
            model = load_model(
                source.name,
                resolve_model_dir(source.location),
                backend_name=self.settings.backend,
                settings=self.settings.backend_settings,
                max_size=self.settings.max_size,
                prompt_cache_size=self.settings.prompt_cache_size,
                input_images=self.settings.input_images,
                safety_checker=Path(self.settings.safety_checker) if self.settings.safety_checker else None,
                default_cache_interval=self.settings.cache_interval,
                default_cache_depth=self.settings.cache_depth,
                preview_decoder=_path_or_none(self.settings.preview_decoders.get(source.name, "")),
                lora_library=library,
                controlnets=attached or None,
            )
            if self.settings.warmup:
                warm_up(model)
            self.registry.add(model)

    async def stop(self, grace: float | None = None) -> None:
        """Drain: refuse new work, let accepted requests finish within ``grace`` seconds, then stop."""
        grace = self.settings.grace_period_s if grace is None else grace
        log.info("shutting down: health NOT_SERVING, new calls refused, grace period %.1fs", grace)
        self.metrics.serving.set(0)
        for service in ("", SERVICE_NAME):  # not LIVENESS_SERVICE: a draining server is not a broken one
            await self.health.set(service, health_pb2.HealthCheckResponse.NOT_SERVING)
        self.service.draining = True
        self.batcher.stop_accepting()
        # Every accepted request has been answered once no RPC is in flight (queued, running, or sending).
        finished = await self.calls.wait_idle(grace)
        if not finished:
            log.warning("grace period over with %d calls unfinished; they end with UNAVAILABLE", self.calls.active)
            self.batcher.abort("the server shut down before it finished")
            await self.calls.wait_idle(ABORT_GRACE_S)
        if self._server is not None:
            await self._server.stop(1.0 if finished else 0)
        if self._gateway is not None:
            await self._gateway.stop()
        await asyncio.to_thread(self.batcher.shutdown)
        self.registry.close()
        self.metrics.close()
        log.info("stopped")

    async def wait_for_termination(self) -> None:
        assert self._server is not None
        await self._server.wait_for_termination()


class ServerThread:
    """Runs a DiffusionServer on its own event loop in a background thread (tests, benchmarks)."""

    def __init__(self, settings: ServerSettings) -> None:
        self.server = DiffusionServer(settings)
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="diffusiond-server", daemon=True)

    def start(self, timeout: float = 300.0, load: bool = True) -> int:
        """Bind and serve; with ``load`` also load the models (else call ``load`` later)."""
        self._thread.start()
        port = asyncio.run_coroutine_threadsafe(self.server.start(), self._loop).result(timeout)
        if load:
            self.load(timeout)
        return port

    def load(self, timeout: float = 300.0) -> None:
        asyncio.run_coroutine_threadsafe(self.server.load(), self._loop).result(timeout)

    @property
    def address(self) -> str:
        return f"{self.server.settings.host}:{self.server.port}"

    @property
    def http_url(self) -> str:
        """The HTTP gateway's base URL (the server must run with ``http_port`` set)."""
        settings = self.server.settings
        return f"http://{settings.http_host or settings.host}:{self.server.http_port}"

    def stop(self, grace: float = 5.0) -> None:
        asyncio.run_coroutine_threadsafe(self.server.stop(grace), self._loop).result(grace + 60)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)


def _path_or_none(value: str) -> Path | None:
    return Path(value) if value else None
