"""``diffusiond``: serve | generate | models | create-model | export onnx | openvino | tensorrt | eval.

Client commands import only the client; ``serve`` imports the inference stack
when it runs, so ``diffusiond generate`` works where only the client is installed.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys

from diffusiond import __version__
from diffusiond.client.cli import add_connection_arguments, add_generate_arguments, run_generate, run_models
from diffusiond.client.progress import Progress
from diffusiond.envflags import EnvironmentDefaults
from diffusiond.server.logs import configure_logging

log = logging.getLogger("diffusiond")
MIB = 1024 * 1024


def add_backend_choice(parser: argparse.ArgumentParser, backends: dict | None, what: str) -> list[str]:
    """``--backend``, its choices from the backend registry (``backends``; None: not this command, so
    the registry, and torch with it, is not imported). Returns the choices, which later clashes may shrink."""
    if backends is None:
        parser.add_argument("--backend", default="torch")
        return []
    choices = list(backends)
    described = "; ".join(f"{p.name}: {p.description}" for p in backends.values()).replace("%", "%%")
    parser.add_argument("--backend", default="torch", choices=choices, help=f"{what} ({described})")
    return choices


def add_backend_flags(parser: argparse.ArgumentParser, backends: dict | None, choices: list[str]) -> None:
    """Each backend's own argument group, as its plug-in declares it."""
    for plugin in (backends or {}).values():
        if plugin.add_arguments is None:
            continue
        try:
            plugin.add_arguments(parser.add_argument_group(f"{plugin.name} backend"))
        except argparse.ArgumentError as exc:
            log.error("the %s backend is not offered: its flags clash with others (%s)", plugin.name, exc)
            choices.remove(plugin.name)


def add_serve_arguments(parser: argparse.ArgumentParser, backends: dict | None = None) -> None:
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (0.0.0.0 for all interfaces)")
    parser.add_argument("--port", type=int, default=50051)
    parser.add_argument(
        "--model", action="append", default=None, metavar="[NAME=]PATH",
        help="a diffusers-format model directory (repeatable; the first is the default). "
        "Default: the built-in model, created on first start.",
    )
    parser.add_argument(
        "--controlnet", action="append", default=None, metavar="[MODEL:]NAME=DIR",
        help="attach a diffusers-format ControlNet directory to a model (default: the first) under NAME "
        "(repeatable); DIR 'builtin' is the shipped canny ControlNet of the built-in model, which that model "
        "gets as 'canny' by itself when no --controlnet names it",
    )
    choices = add_backend_choice(parser, backends, "inference backend")
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    parser.add_argument("--dtype", default="fp32", choices=["fp32", "fp16", "bf16"],
                        help="network precision; bf16 is fast only on CPUs with AVX512-BF16/AMX")
    parser.add_argument("--max-queue", type=int, default=64,
                        help="requests waiting before new ones get RESOURCE_EXHAUSTED")
    parser.add_argument("--max-batch-size", type=int, default=1,
                        help="most images denoised together in one UNet call (1: no batching)")
    parser.add_argument("--batching", default="continuous", choices=["continuous", "static"],
                        help="continuous: queued requests of the same model and size join the running ones at "
                        "every step; static: a batch of requests with the same size, steps and scheduler "
                        "starts and finishes together (for comparison)")
    parser.add_argument("--max-batch-delay-ms", type=float, default=0.0,
                        help="how long the oldest queued request waits for company when nothing is running")
    parser.add_argument("--max-size", type=int, default=2048, help="largest width/height accepted, in pixels")
    parser.add_argument("--cache-interval", type=int, default=1,
                        help="step caching for requests that do not choose: the full UNet every N steps, its "
                        "shallow blocks in between (faster, approximate; 1: off, exact)")
    parser.add_argument("--cache-depth", type=int, default=1,
                        help="up blocks a step-cached shallow pass runs (1: fastest)")
    parser.add_argument("--lora-dir", default="", metavar="DIR",
                        help="serve the LoRA adapters in DIR (safetensors, diffusers/PEFT or kohya format; 'builtin': "
                        "those shipped for the built-in model); requests name them in 'loras'; files added later "
                        "are found without a restart")
    parser.add_argument("--lora-cache-mb", type=float, default=256.0,
                        help="MiB of converted adapters kept in memory (LRU); others are read again when used")
    parser.add_argument("--grace-period", type=float, default=30.0,
                        help="seconds accepted requests get to finish on shutdown")
    parser.add_argument("--prompt-cache-size", type=int, default=256,
                        help="prompt encodings kept per model (LRU; 0: none)")
    parser.add_argument("--result-cache-mb", type=float, default=0.0,
                        help="MiB of finished images kept for repeated seeded requests (LRU; 0: off)")
    parser.add_argument("--metrics-port", type=int, default=0,
                        help="serve Prometheus metrics at http://HOST:PORT/metrics (0: off)")
    parser.add_argument("--metrics-host", default=None, help="address for --metrics-port (default: --host)")
    parser.add_argument("--http-port", type=int, default=None,
                        help="also serve the HTTP gateway (OpenAI images API, JSON, Server-Sent Events) and the "
                        "web page on this port, in this process (0: any free port; default: off)")
    parser.add_argument("--http-host", default=None, help="address for --http-port (default: --host)")
    parser.add_argument("--compression", default="none", choices=["none", "gzip"],
                        help="compression of responses (requests may be gzip-compressed either way)")
    parser.add_argument("--max-send-message-mb", type=float, default=None,
                        help="largest message sent, in MiB (default: enough for max-images images "
                        "of max-size, 98 MiB for the defaults)")
    parser.add_argument("--max-receive-message-mb", type=float, default=None,
                        help="largest request accepted, in MiB (default: enough for two input images of "
                        "--max-input-image-mb, 17 MiB for the defaults)")
    parser.add_argument("--max-input-image-mb", type=float, default=8.0,
                        help="largest init or mask image accepted, in MiB (checked before decoding)")
    parser.add_argument("--max-input-pixels", type=int, default=4096 * 4096,
                        help="most pixels an init or mask image may declare in its header (refused before "
                        "decoding; default 4096x4096)")
    parser.add_argument("--threads", type=int, default=0, help="CPU threads for inference (0: all cores)")
    parser.add_argument("--precision", default="", choices=["", "fp32", "fp16", "int8"],
                        help="refuse an exported artifact whose manifest says another precision")
    parser.add_argument("--expect-source-hash", default="", metavar="SHA256",
                        help="refuse an exported artifact made from another source model (a prefix of 12+ hex digits)")
    add_backend_flags(parser, backends, choices)
    security = parser.add_argument_group("security (README: Security)")
    security.add_argument("--auth-tokens", default="", metavar="FILE",
                          help="require 'authorization: Bearer <token>' on every call but health; FILE holds "
                          "name:token lines and is re-read when it changes and on SIGHUP (default: the "
                          "DIFFUSIOND_AUTH_TOKENS variable's name:token pairs, else no authentication)")
    security.add_argument("--no-reflection", action="store_true", help="do not serve gRPC server reflection")
    security.add_argument("--tls-cert", default="", metavar="PEM", help="serve TLS with this certificate chain")
    security.add_argument("--tls-key", default="", metavar="PEM", help="the certificate's private key")
    security.add_argument("--tls-client-ca", default="", metavar="PEM",
                          help="mutual TLS: refuse clients without a certificate signed by this CA")
    security.add_argument("--per-client-max-inflight", type=int, default=0,
                          help="most generation calls one client (token, else address) may have queued or running "
                          "(0: no limit)")
    security.add_argument("--per-client-rate", type=float, default=0.0,
                          help="generation calls per second one client may start, on average (0: no limit)")
    security.add_argument("--per-client-burst", type=int, default=0,
                          help="calls a client may start at once within its rate (default: the rate, at least 1)")
    security.add_argument("--safety-checker", default="", metavar="DIR",
                          help="filter every image with diffusers' StableDiffusionSafetyChecker from DIR (a checker "
                          "directory, or a model directory with safety_checker/ and feature_extractor/): flagged "
                          "images are sent black and marked")
    parser.add_argument("--preview-decoder", action="append", default=None, metavar="[MODEL=]DIR",
                        help="a tiny preview decoder (diffusers AutoencoderTiny, e.g. TAESD) for MODEL (default: the "
                        "first --model) for PREVIEW_KIND_TINY_DECODER previews; a model directory's own "
                        "preview_decoder/ is used without this flag; repeat for several models")
    parser.add_argument("--no-warmup", action="store_true", help="skip the warm-up generation at start")
    parser.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    parser.add_argument("--log-format", default="text", choices=["text", "json"],
                        help="json: one JSON object per line (time, level, logger, message, request_id), for log "
                        "collectors")


def backend_settings_from_args(args: argparse.Namespace):
    """The common backend flags, and the chosen backend's own (through its plug-in)."""
    from diffusiond.backends.base import BackendSettings
    from diffusiond.backends.registry import get_plugin

    plugin = get_plugin(args.backend)
    return BackendSettings(
        device=args.device,
        dtype=args.dtype,
        threads=args.threads,
        expect_precision=args.precision,
        expect_source_sha256=_source_hash_arg(args.expect_source_hash),
        options=plugin.options_from_args(args) if plugin.options_from_args is not None else None,
    )


def _preview_decoders(specs: list[str], default_model: str) -> dict[str, str]:
    """``--preview-decoder [MODEL=]DIR`` values -> {model: DIR}; without MODEL=, the first model's."""
    decoders: dict[str, str] = {}
    for spec in specs:
        name, sep, path = spec.partition("=")
        name, path = (name, path) if sep else (default_model, spec)
        if not path:
            raise ValueError(f"--preview-decoder {spec!r}: give a directory, as [MODEL=]DIR")
        decoders[name] = path
    return decoders


def run_serve(args: argparse.Namespace) -> int:
    from diffusiond.errors import DiffusiondError
    from diffusiond.models.sources import ModelSource
    from diffusiond.server.app import ServerSettings
    from diffusiond.server.auth import ENV_VAR as AUTH_TOKENS_ENV
    from diffusiond.server.limits import ClientLimitSettings
    from diffusiond.service.batcher import BatcherSettings
    from diffusiond.service.control import ControlNetSource

    if args.threads > 0:
        import torch

        torch.set_num_threads(args.threads)
    try:
        models = [ModelSource.parse(m) for m in (args.model or ["builtin"])]
        settings = ServerSettings(
            host=args.host,
            port=args.port,
            models=models,
            backend=args.backend,
            backend_settings=backend_settings_from_args(args),
            batcher=BatcherSettings(
                max_queue=args.max_queue,
                max_batch_size=args.max_batch_size,
                max_batch_delay_ms=args.max_batch_delay_ms,
                batching=args.batching,
            ),
            max_size=args.max_size,
            grace_period_s=args.grace_period,
            warmup=not args.no_warmup,
            prompt_cache_size=args.prompt_cache_size,
            result_cache_bytes=int(args.result_cache_mb * MIB),
            metrics_host=args.metrics_host,
            metrics_port=args.metrics_port or None,
            http_host=args.http_host,
            http_port=args.http_port,
            compression=args.compression,
            max_send_message_bytes=None if args.max_send_message_mb is None else int(args.max_send_message_mb * MIB),
            max_receive_message_bytes=(
                None if args.max_receive_message_mb is None else int(args.max_receive_message_mb * MIB)
            ),
            max_input_image_bytes=int(args.max_input_image_mb * MIB),
            max_input_pixels=args.max_input_pixels,
            auth_tokens_file=args.auth_tokens,
            auth_tokens_text="" if args.auth_tokens else os.environ.get(AUTH_TOKENS_ENV, ""),
            reflection=not args.no_reflection,
            tls=_tls_settings(args),
            client_limits=ClientLimitSettings(
                max_inflight=args.per_client_max_inflight, rate=args.per_client_rate, burst=args.per_client_burst
            ),
            safety_checker=args.safety_checker,
            preview_decoders=_preview_decoders(args.preview_decoder or [], models[0].name),
            cache_interval=args.cache_interval,
            cache_depth=args.cache_depth,
            lora_dir=args.lora_dir,
            lora_cache_bytes=int(args.lora_cache_mb * MIB),
            controlnets=[ControlNetSource.parse(c) for c in (args.controlnet or [])],
        )
    except (ValueError, DiffusiondError) as exc:  # a flag out of range
        log.error("cannot serve: %s", exc)
        return 2
    try:
        return asyncio.run(_serve(settings))
    except DiffusiondError as exc:
        log.error("cannot serve: %s", exc)
        return 2
    except OSError as exc:
        log.error("cannot serve: %s", exc)
        return 2


def _tls_settings(args: argparse.Namespace):
    from diffusiond.errors import InvalidArgument
    from diffusiond.server.tls import TlsSettings

    if not (args.tls_cert or args.tls_key or args.tls_client_ca):
        return None
    if not (args.tls_cert and args.tls_key):
        raise InvalidArgument("--tls-cert/--tls-key", "TLS needs both the certificate and its key")
    return TlsSettings(cert=args.tls_cert, key=args.tls_key, client_ca=args.tls_client_ca)


def _source_hash_arg(text: str) -> str:
    from diffusiond.errors import InvalidArgument

    text = text.strip().lower()
    if text and (len(text) < 12 or any(c not in "0123456789abcdef" for c in text)):
        raise InvalidArgument("--expect-source-hash", f"{text!r} is not a sha256 prefix of at least 12 hex digits")
    return text


async def _serve(settings) -> int:
    from diffusiond.server.app import DiffusionServer

    server = DiffusionServer(settings)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, _on_signal, sig, stop)
    loop.add_signal_handler(signal.SIGHUP, server.reload_tokens)
    await server.start()
    loader = asyncio.create_task(server.load())
    stopper = asyncio.create_task(stop.wait())
    done, _ = await asyncio.wait({loader, stopper}, return_when=asyncio.FIRST_COMPLETED)
    if loader in done:
        if loader.exception() is not None:  # a model failed to load: close the listener, then report it
            stopper.cancel()
            await server.stop(0)
            loader.result()
        await stopper
    else:
        loader.cancel()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.remove_signal_handler(sig)  # a second Ctrl-C ends the process at once
    await server.stop()
    return 0


def _on_signal(sig: signal.Signals, stop: asyncio.Event) -> None:
    log.info("received %s", signal.Signals(sig).name)
    stop.set()


def run_create_model(args: argparse.Namespace) -> int:
    from pathlib import Path

    from diffusiond.models.synthetic import write_sd_model

    out = Path(args.out)
    if (out / "model_index.json").exists() and not args.force:
        log.error("%s already holds a model; pass --force to overwrite it", out)
        return 2
    write_sd_model(out, args.preset, seed=args.seed)
    sys.stdout.write(f"wrote a {args.preset} model with seeded random weights to {out}\n")
    return 0


def add_export_onnx_arguments(parser: argparse.ArgumentParser, target: str = "onnx") -> None:
    """``export onnx``'s flags; ``target="openvino"``: those ``export openvino`` shares (it exports ONNX on the
    way), its precisions, and NNCF's settings in place of ONNX Runtime's quantization flags."""
    openvino = target == "openvino"
    parser.add_argument("--model", required=True, help="diffusers-format source model directory (or 'builtin')")
    parser.add_argument("--out", required=True,
                        help=f"directory to write the {'OpenVINO IR' if openvino else 'ONNX'} export into")
    parser.add_argument("--precision", default="fp32", choices=["fp32", "int8"] if openvino else ["fp32", "fp16", "int8"],
                        help="int8: the UNet quantized by NNCF, the rest fp32 (bf16 is chosen when serving)"
                        if openvino else None)
    parser.add_argument("--force", action="store_true", help="rebuild even when the export is up to date")
    parser.add_argument("--opset", type=int, default=17, help="ONNX opset (14-20)")
    parser.add_argument("--max-images", type=int, default=4,
                        help="images per request batch the shape profile covers (the guided UNet sees twice as many)")
    parser.add_argument("--min-size", type=int, default=0, help="smallest image side in the profile (default: native/2)")
    parser.add_argument("--max-size", type=int, default=0, help="largest image side in the profile (default: native*2)")
    parser.add_argument("--no-verify", action="store_true", help="skip running each network against PyTorch")
    if not openvino:  # export openvino carries the adapters of the ONNX export it converts (--onnx)
        parser.add_argument("--lora", action="append", default=[], metavar="NAME:SCALE",
                            help="fuse a LoRA adapter into the exported UNet at SCALE (-2..2, default 1): NAME in "
                            "--lora-dir, or a .safetensors file (repeatable; the manifest records them)")
        parser.add_argument("--lora-dir", default="", metavar="DIR", help="where --lora NAMEs are looked up")
    parser.add_argument("--step-cache-depth", type=int, default=1,
                        help="export the UNet's deep features at this depth and its shallow blocks as unet_shallow, "
                        "for step caching on ONNX Runtime (0: neither)")
    if not openvino:
        parser.add_argument("--controlnet", default="", metavar="[NAME=]DIR",
                            help="also export this diffusers-format ControlNet (as controlnet/, with the UNet that "
                            "takes its residuals as unet_controlled/), served under NAME (default: the directory's "
                            "name; DIR 'builtin': the built-in model's canny ControlNet)")
    parser.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    cal = parser.add_argument_group("int8 calibration (NVIDIA's recipe by default: 32 prompts, 20 steps)")
    cal.add_argument("--calibration-prompts", default="", metavar="FILE",
                     help="prompts, one per line (default: the set shipped with diffusiond)")
    cal.add_argument("--calibration-max-prompts", type=int, default=32, help="use at most this many prompts (0: all)")
    cal.add_argument("--calibration-steps", type=int, default=20, help="denoising steps per prompt")
    cal.add_argument("--calibration-size", type=int, default=0, help="image side in pixels (default: native)")
    cal.add_argument("--calibration-scheduler", default="", help="scheduler (default: the model's)")
    cal.add_argument("--calibration-guidance", type=float, default=None,
                     help="guidance scale (default: the model's, 7.5 for SD)")
    cal.add_argument("--calibration-seed", type=int, default=0)
    if openvino:
        parser.add_argument("--onnx", default="", metavar="DIR",
                            help="an fp32 ONNX export of --model to convert (default: export one on the way)")
        nncf = parser.add_argument_group("int8 quantization (NNCF, transformer model type)")
        nncf.add_argument("--nncf-preset", default="mixed", choices=["mixed", "performance"],
                          help="mixed: asymmetric activations; performance: symmetric (default: %(default)s)")
        return
    cal.add_argument("--calibration-method", default="percentile", choices=["minmax", "percentile", "entropy"])
    cal.add_argument("--calibration-percentile", type=float, default=99.999)
    q = parser.add_argument_group("int8 quantization (default: QDQ int8/int8 symmetric, per-channel: TensorRT's form)")
    q.add_argument("--int8-format", default="qdq", choices=["qdq", "qoperator"])
    q.add_argument("--int8-activations", default="int8", choices=["int8", "uint8"])
    q.add_argument("--int8-weights", default="int8", choices=["int8", "uint8"])
    q.add_argument("--int8-per-tensor", action="store_true", help="one weight scale per tensor, not per channel")
    q.add_argument("--int8-asymmetric", action="store_true", help="activation zero points other than 0 (CPU only)")
    q.add_argument("--int8-reduce-range", action="store_true", help="7-bit weights (u8s8 saturation on CPUs without VNNI)")


def export_profile_from_args(args: argparse.Namespace):
    """The shape profile the export flags ask for; None: the export's default."""
    from diffusiond.models.descriptors import Range, ShapeProfile

    profile = None
    if args.min_size or args.max_size or args.max_images != 4:
        from diffusiond.models.config import load_model_config
        from diffusiond.models.sources import resolve_model_dir

        native = load_model_config(resolve_model_dir(args.model)).default_size
        default = ShapeProfile.around(native, args.max_images)
        lo = args.min_size or default.height.min
        hi = args.max_size or default.height.max
        size = Range(lo, min(max(native, lo), hi), hi)
        profile = ShapeProfile(images=Range(1, 1, args.max_images), height=size, width=size)
    return profile


def calibration_from_args(args: argparse.Namespace):
    from pathlib import Path

    from diffusiond.export.calibration import CalibrationSettings

    ranges = {"method": args.calibration_method, "percentile": args.calibration_percentile} if hasattr(
        args, "calibration_method") else {}
    return CalibrationSettings(
        prompts_file=Path(args.calibration_prompts) if args.calibration_prompts else None,
        max_prompts=args.calibration_max_prompts,
        steps=args.calibration_steps,
        guidance_scale=args.calibration_guidance,
        size=args.calibration_size,
        scheduler=args.calibration_scheduler,
        seed=args.calibration_seed,
        **ranges,
    )


def export_options_from_args(args: argparse.Namespace):

    from diffusiond.export.int8 import Int8Settings
    from diffusiond.export.onnx_export import ExportOptions
    from diffusiond.models.lora import parse_adapter_spec
    from diffusiond.service.adapters import resolve_lora_dir

    lora_dir = resolve_lora_dir(args.lora_dir) if args.lora_dir else None
    controlnet_name, _, controlnet = getattr(args, "controlnet", "").rpartition("=")
    if controlnet == "builtin":
        from diffusiond.service.control import BUILTIN_CONTROLNET_DIR, BUILTIN_CONTROLNET_NAME

        controlnet, controlnet_name = str(BUILTIN_CONTROLNET_DIR), controlnet_name or BUILTIN_CONTROLNET_NAME
    return ExportOptions(
        loras=tuple(parse_adapter_spec(text, lora_dir) for text in args.lora),
        controlnet=controlnet,
        controlnet_name=controlnet_name,
        precision=args.precision,
        opset=args.opset,
        profile=export_profile_from_args(args),
        verify=not args.no_verify,
        force=args.force,
        step_cache_depth=args.step_cache_depth,
        calibration=calibration_from_args(args),
        int8=Int8Settings(
            quant_format=args.int8_format,
            activation_type=args.int8_activations,
            weight_type=args.int8_weights,
            per_channel=not args.int8_per_tensor,
            symmetric_activations=not args.int8_asymmetric,
            reduce_range=args.int8_reduce_range,
        ),
    )


def run_export_onnx(args: argparse.Namespace) -> int:
    from pathlib import Path

    from diffusiond.errors import DiffusiondError
    from diffusiond.export.onnx_export import export_onnx
    from diffusiond.models.sources import resolve_model_dir

    try:
        result = export_onnx(resolve_model_dir(args.model), Path(args.out), export_options_from_args(args))
    except DiffusiondError as exc:
        log.error("export failed: %s", exc)
        return 2
    manifest = result.manifest
    state = "up to date, reused" if result.reused else "written"
    sys.stdout.write(f"{result.directory}: {state} ({manifest.precision}, source sha256 {manifest.source_sha256[:16]})\n")
    for name, entry in manifest.components.items():
        sys.stdout.write(f"  {name:13s} {entry.precision:5s} {entry.bytes / 1e6:10.1f} MB  {', '.join(entry.files)}\n")
    return 0


def run_export_openvino(args: argparse.Namespace) -> int:
    from pathlib import Path

    from diffusiond.errors import DiffusiondError
    from diffusiond.export.openvino_export import NncfSettings, OpenVinoExportOptions, export_openvino
    from diffusiond.models.sources import resolve_model_dir

    try:
        options = OpenVinoExportOptions(
            precision=args.precision, opset=args.opset, profile=export_profile_from_args(args),
            verify=not args.no_verify, force=args.force, calibration=calibration_from_args(args),
            nncf=NncfSettings(preset=args.nncf_preset),
        )
        result = export_openvino(resolve_model_dir(args.model), Path(args.out), options,
                                 onnx_dir=Path(args.onnx) if args.onnx else None)
    except DiffusiondError as exc:
        log.error("export failed: %s", exc)
        return 2
    manifest = result.manifest
    state = "up to date, reused" if result.reused else "written"
    sys.stdout.write(f"{result.directory}: {state} (OpenVINO IR, {manifest.precision}, "
                     f"source sha256 {manifest.source_sha256[:16]})\n")
    for name, entry in manifest.components.items():
        sys.stdout.write(f"  {name:13s} {entry.precision:5s} {entry.bytes / 1e6:10.1f} MB  {', '.join(entry.files)}\n")
    return 0


def add_eval_arguments(parser: argparse.ArgumentParser, backends: dict | None = None) -> None:
    # Defaults are EvalSettings'; it is not imported here, so client commands never load torch.
    parser.add_argument("--model", default="builtin", metavar="[NAME=]PATH",
                        help="model directory (diffusers or exported layout); default: the built-in model")
    add_backend_choice(parser, backends, "inference backend, at its default options; --model names what it runs")
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    parser.add_argument("--dtype", default="fp32", choices=["fp32", "fp16", "bf16"],
                        help="precision the torch backend computes in")
    parser.add_argument("--precision", default="",
                        help="refuse to run unless the backend reports this precision (e.g. int8 for an INT8 export)")
    parser.add_argument("--num-prompts", type=int, default=200, help="held-out prompts to generate")
    parser.add_argument("--split", default="test", choices=["test", "validation"],
                        help="test: the held-out prompts; validation: for choosing sampling defaults")
    parser.add_argument("--steps", type=int, default=0, help="denoising steps (0: the model's default)")
    parser.add_argument("--guidance", type=float, default=None, help="guidance scale (default: the model's)")
    parser.add_argument("--scheduler", default="", help="scheduler name (default: the model's)")
    parser.add_argument("--seed", type=int, default=0, help="prompt i uses seed + i")
    parser.add_argument("--batch-size", type=int, default=16, help="prompts per UNet batch")
    parser.add_argument("--cache-interval", type=int, default=1,
                        help="step caching: the full UNet every N steps (1: off, exact)")
    parser.add_argument("--cache-depth", type=int, default=1, help="up blocks a step-cached pass runs")
    parser.add_argument("--controlnet", default="", help="condition every prompt on the canny edges of its scene "
                        "with this attached ControlNet (the built-in model's: canny)")
    parser.add_argument("--control-scale", type=float, default=1.0, help="with --controlnet: conditioning scale")
    parser.add_argument("--threads", type=int, default=0, help="CPU threads for inference (0: all cores)")
    parser.add_argument("--clip-model", default="", metavar="DIR",
                        help="a local CLIP model directory: also report CLIP score")
    parser.add_argument("--fid", action="store_true",
                        help="also FID against --reference (default: real renders of the same scenes); without "
                        "--inception-weights its features come from the built-in VAE encoder, a stand-in not "
                        "comparable to published FID")
    parser.add_argument("--inception-weights", default="", metavar="FILE",
                        help="a local TorchScript Inception-v3 (inception-2015-12-05.pt): standard FID and Inception "
                        "Score (implies --fid; nothing is downloaded)")
    parser.add_argument("--reference", default="", metavar="DIR",
                        help="reference images for FID (implies --fid; default: real renders of the same scenes)")
    parser.add_argument("--save-images", default="", metavar="DIR", help="write the images and a contact sheet here")
    parser.add_argument("--out", default="", metavar="REPORT.json", help="write the full report (every prompt) here")
    parser.add_argument("--log-level", default="WARNING", choices=["DEBUG", "INFO", "WARNING", "ERROR"])


def run_eval(args: argparse.Namespace) -> int:
    from pathlib import Path

    from diffusiond.errors import DiffusiondError
    from diffusiond.eval.run import EvalSettings, evaluate, write_report

    if args.threads > 0:
        import torch

        torch.set_num_threads(args.threads)
    settings = EvalSettings(
        model=args.model, backend=args.backend, device=args.device, dtype=args.dtype, precision=args.precision,
        num_prompts=args.num_prompts, split=args.split, steps=args.steps, guidance_scale=args.guidance,
        scheduler=args.scheduler, seed=args.seed, batch_size=args.batch_size, clip_model=args.clip_model,
        save_images=args.save_images, cache_interval=args.cache_interval, cache_depth=args.cache_depth,
        fid=args.fid, inception_weights=args.inception_weights, reference=args.reference,
        controlnet=args.controlnet, control_scale=args.control_scale,
    )

    bar = Progress("prompts")
    try:
        report = evaluate(settings, progress=bar.update)
    except DiffusiondError as exc:
        log.error("cannot evaluate: %s", exc)
        return 2
    finally:
        bar.close()
    sys.stdout.write(report.table() + "\n")
    if args.out:
        write_report(report, Path(args.out))
        sys.stdout.write(f"report: {args.out}\n")
    return 0


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The parser; ``command`` is the one about to run: only serve and eval read the backend registry
    (importing torch), so client commands work where only the client is installed."""
    backends = None
    if command in ("serve", "eval"):
        from diffusiond.backends.registry import plugins

        backends = plugins()
    parser = argparse.ArgumentParser(prog="diffusiond", description="Text-to-image service over gRPC.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="run the gRPC server (and, with --http-port, the HTTP gateway)",
                           description="Every flag can also be set from the DIFFUSIOND_* variable its help names; "
                           "the command line wins.")
    add_serve_arguments(serve, backends)
    serve.set_defaults(func=run_serve, finish=EnvironmentDefaults(serve).finish)
    generate = sub.add_parser("generate", help="generate images through a running server")
    add_generate_arguments(generate)
    generate.set_defaults(func=run_generate)
    models = sub.add_parser("models", help="list the models a server has loaded")
    add_connection_arguments(models)
    models.set_defaults(func=run_models)
    create = sub.add_parser(
        "create-model", help="write an SD-architecture model with seeded random weights (for speed work)"
    )
    create.add_argument("--preset", default="sd15-half", choices=["tiny", "small", "sd15-half", "sd15"])
    create.add_argument("--out", required=True, help="directory to write the diffusers-format model into")
    create.add_argument("--seed", type=int, default=0)
    create.add_argument("--force", action="store_true")
    create.set_defaults(func=run_create_model)
    export = sub.add_parser("export", help="export a model for another runtime")
    targets = export.add_subparsers(dest="target", required=True)
    export_onnx = targets.add_parser(
        "onnx", help="export to ONNX in Optimum's layout (fp32, fp16, or int8 with calibration)"
    )
    add_export_onnx_arguments(export_onnx)
    export_onnx.set_defaults(func=run_export_onnx)
    export_ov = targets.add_parser(
        "openvino", help="export to OpenVINO IR for `--backend openvino` (fp32, or an NNCF INT8 UNet)"
    )
    add_export_onnx_arguments(export_ov, target="openvino")
    export_ov.set_defaults(func=run_export_openvino)
    from diffusiond.export import tensorrt_cli

    export_trt = targets.add_parser(
        "tensorrt", help="build TensorRT engines for this machine's GPU from an ONNX export"
    )
    tensorrt_cli.add_arguments(export_trt)
    export_trt.set_defaults(func=tensorrt_cli.run)
    from diffusiond.training import lora_cli

    train_lora = sub.add_parser(
        "train-lora", help="train a LoRA adapter for a model's UNet on a folder of captioned images"
    )
    lora_cli.add_arguments(train_lora)
    train_lora.set_defaults(func=lora_cli.run)
    evaluate = sub.add_parser(
        "eval", help="generate the shapes data set's held-out prompts and score them (in-process, no server)"
    )
    add_eval_arguments(evaluate, backends)
    evaluate.set_defaults(func=run_eval)
    return parser


# What each command needs beyond the client, and the extra that installs it.
EXTRAS = {"serve": "server", "eval": "server", "create-model": "server", "train-lora": "server", "onnx": "server,onnx",
          "tensorrt": "tensorrt"}
# Modules of those extras: an ImportError naming one means an extra is missing, not a bug.
EXTRA_MODULES = {"torch", "diffusers", "transformers", "safetensors", "numpy", "scipy", "accelerate", "onnx",
                 "onnxruntime", "tensorrt", "prometheus_client", "grpc_health", "grpc_reflection", "starlette",
                 "uvicorn", "tqdm"}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    command = argv[0] if argv else None
    try:
        args = build_parser(command).parse_args(argv)
        if hasattr(args, "finish"):
            args.finish(args)
        configure_logging(getattr(args, "log_level", "WARNING"), getattr(args, "log_format", "text"))
        return int(args.func(args))
    except ImportError as exc:
        if (exc.name or "").split(".")[0] not in EXTRA_MODULES:
            raise
        return _missing_extra(argv, exc.name or "")


def _missing_extra(argv: list[str], module: str) -> int:
    """One line naming what to install, instead of a traceback, on an installation without an extra."""
    words = [a for a in argv if not a.startswith("-")]
    command = " ".join(words[:2] if words[:1] == ["export"] else words[:1])
    extra = EXTRAS.get(words[1] if words[:1] == ["export"] and len(words) > 1 else command, "server")
    torch_first = " (install torch first, e.g. a CPU build: pip install torch)" if module == "torch" else ""
    sys.stderr.write(
        f"error: `diffusiond {command}` needs the '{extra}' extra, which this installation lacks (no module named "
        f"{module!r}): pip install 'diffusiond[{extra}]'{torch_first}\n"
    )
    return 2


if __name__ == "__main__":
    sys.exit(main())
