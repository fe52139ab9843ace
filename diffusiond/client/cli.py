"""``diffusiond generate`` and ``diffusiond models``: the command-line client.

Needs only the client dependencies. Errors from the server or the network are
printed as one line naming the status and the reason, never a traceback.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Iterable
from pathlib import Path

import grpc

from diffusiond.api.v1 import diffusion_pb2 as pb
from diffusiond.client.client import (
    FORMATS,
    PREVIEWS,
    UPSCALERS,
    ClientError,
    DiffusionClient,
    GeneratedImage,
    build_request,
    control_options,
    tls_credentials,
)
from diffusiond.client.progress import Progress

DEFAULT_SERVER = "127.0.0.1:50051"
AUTO_PREVIEW = "auto"
FALLBACK_PREVIEW = "approx_rgb"  # for servers whose ModelInfo lists no preview kinds
TOKEN_ENV = "DIFFUSIOND_TOKEN"
EXTENSIONS = {"image/png": ".png", "image/jpeg": ".jpg", "image/webp": ".webp"}
FORMAT_OF_EXTENSION = {".png": "png", ".jpg": "jpeg", ".jpeg": "jpeg", ".webp": "webp"}


def add_generate_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("prompt", help="what to draw")
    parser.add_argument("--negative", default="", help="negative prompt: what to steer away from")
    parser.add_argument("--steps", type=int, default=0, help="denoising steps (default: the model's)")
    parser.add_argument("--seed", type=int, default=None, help="seed of image 0; image i uses seed + i")
    parser.add_argument("--width", type=int, default=0, help="pixels (default: the model's native size)")
    parser.add_argument("--height", type=int, default=0, help="pixels (default: the model's native size)")
    parser.add_argument("--scheduler", default="", help="e.g. euler_a, dpmpp_2m_karras, ddim (see `diffusiond models`)")
    parser.add_argument("--guidance", type=float, default=None, help="classifier-free guidance scale")
    parser.add_argument("--num-images", type=int, default=1)
    parser.add_argument("--format", default=None, choices=sorted(FORMATS),
                        help="output image format (default: from the extension of --out, else png)")
    parser.add_argument("--quality", type=int, default=0, help="JPEG/WebP quality 1-100")
    parser.add_argument("--model", default="", help="model name (default: the server's default model)")
    parser.add_argument("--out", "-o", default="image",
                        help="output file (.png, .jpg/.jpeg or .webp: the format follows it; without an extension "
                        "the format's is added); several images get -0, -1, ... suffixes")
    parser.add_argument("--stream", action="store_true", help="show progress and ETA while the image forms")
    parser.add_argument("--preview-dir", default=None, help="with --stream: save preview images here")
    parser.add_argument("--preview", default=AUTO_PREVIEW, choices=[AUTO_PREVIEW, *(k for k in PREVIEWS if k != "none")],
                        help="preview kind saved with --preview-dir (default auto: the best the model has, from "
                        "its ModelInfo.preview_kinds)")
    parser.add_argument("--preview-every", type=int, default=1, help="a preview every N steps")
    images = parser.add_argument_group("image inputs (README: Images in)")
    images.add_argument("--init-image", default=None, metavar="FILE",
                        help="img2img: start from this PNG, JPEG or WebP (without --width/--height the result "
                        "has its size)")
    images.add_argument("--strength", type=float, default=None,
                        help="how far from the init image to go, 0-1: int(steps * strength) steps run "
                        "(default 0.8, 1.0 with --mask)")
    images.add_argument("--mask", default=None, metavar="FILE",
                        help="inpainting: white repaints, black keeps; the init image's size")
    images.add_argument("--mask-blur", type=int, default=0, help="blur the mask by this many pixels (0-64)")
    images.add_argument("--keep-unmasked", action="store_true",
                        help="paste the init image back where the mask is black, so those pixels stay exact")
    images.add_argument("--hires", default=None, metavar="SCALE|WxH",
                        help="hi-res fix: a second pass at 2x (or 1.5x, or 1024x768) over the upscaled first one")
    images.add_argument("--hires-strength", type=float, default=None, help="the second pass's strength (default 0.5)")
    images.add_argument("--hires-steps", type=int, default=0, help="the second pass's steps (default: --steps)")
    images.add_argument("--hires-upscaler", default="latent", choices=sorted(UPSCALERS),
                        help="latent: bicubic on the latents (free); lanczos: on the pixels (a VAE decode and encode)")
    parser.add_argument("--cache-interval", type=int, default=0,
                        help="step caching: the full UNet every N steps (faster, approximate; 1: exact; "
                        "default: the server's)")
    parser.add_argument("--cache-depth", type=int, default=0, help="up blocks a step-cached pass runs (default: the server's)")
    parser.add_argument("--lora", action="append", default=[], metavar="NAME:SCALE", type=lora_arg,
                        help="apply the server's LoRA adapter NAME at SCALE (-2..2; default 1); repeatable "
                        "(`diffusiond models` lists the adapters)")
    control = parser.add_argument_group("ControlNet")
    source = control.add_mutually_exclusive_group()
    source.add_argument("--control-image", default=None, metavar="FILE", help="a control image (e.g. white edges on black)")
    source.add_argument("--canny-from", default=None, metavar="FILE",
                        help="an image whose canny edges the server computes and uses as the control image")
    control.add_argument("--controlnet", default="", help="ControlNet name (default: the model's first)")
    control.add_argument("--control-scale", type=float, default=None, help="conditioning scale 0-2 (default 1.0)")
    control.add_argument("--control-start", type=float, default=None, help="fraction of steps where it starts (default 0)")
    control.add_argument("--control-end", type=float, default=None, help="fraction of steps where it ends (default 1)")
    control.add_argument("--canny-low", type=float, default=None, help="with --canny-from: low threshold (default 100)")
    control.add_argument("--canny-high", type=float, default=None, help="with --canny-from: high threshold (default 200)")
    add_connection_arguments(parser)


def lora_arg(text: str) -> tuple[str, float]:
    """``NAME:SCALE`` (or ``NAME``, scale 1) -> (name, scale)."""
    name, sep, scale = text.rpartition(":")
    if not sep:
        return text, 1.0
    try:
        return name, float(scale)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected NAME:SCALE with a number after ':'") from None


def add_connection_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--server", default=DEFAULT_SERVER, help=f"host:port (default {DEFAULT_SERVER})")
    parser.add_argument("--timeout", type=float, default=None, help="seconds before the call is abandoned")
    parser.add_argument("--gzip", action="store_true", help="gzip-compress requests (the server answers in kind "
                        "when started with --compression gzip)")
    parser.add_argument("--token", default=None,
                        help=f"bearer token for a server with --auth-tokens (default: ${TOKEN_ENV})")
    parser.add_argument("--tls-ca", default=None, help="connect with TLS, trusting this CA (PEM)")
    parser.add_argument("--tls", action="store_true", help="connect with TLS, trusting the system's CAs")
    parser.add_argument("--tls-cert", default=None, help="client certificate (PEM) for mutual TLS")
    parser.add_argument("--tls-key", default=None, help="client private key (PEM) for mutual TLS")


def open_client(args: argparse.Namespace) -> DiffusionClient:
    """A client for the connection flags: server, compression, token, TLS."""
    secure = args.tls or args.tls_ca or args.tls_cert or args.tls_key
    try:
        credentials = tls_credentials(args.tls_ca, args.tls_cert, args.tls_key) if secure else None
    except OSError as exc:
        raise ValueError(f"cannot read {exc.filename}: {exc.strerror}") from None
    return DiffusionClient(args.server, compression=_compression(args), credentials=credentials,
                           token=args.token or os.environ.get(TOKEN_ENV) or None)


def _compression(args: argparse.Namespace) -> grpc.Compression | None:
    return grpc.Compression.Gzip if getattr(args, "gzip", False) else None


def output_format(out: str, requested: str | None) -> str:
    """The format to ask for: ``--format``, else the one ``out``'s extension names, else PNG.
    ValueError when the two disagree or the extension is no image format, rather than a silent rename."""
    suffix = Path(out).suffix.lower()
    implied = FORMAT_OF_EXTENSION.get(suffix)
    if suffix and implied is None:
        raise ValueError(f"--out {out}: {suffix} is not a format diffusiond writes; use .png, .jpg, .jpeg or .webp, "
                         "or no extension with --format")
    if requested is None:
        return implied or "png"
    if implied is not None and FORMATS[implied] != FORMATS[requested.lower()]:
        raise ValueError(f"--format {requested} does not match --out {out} ({implied}); change one, or drop --format "
                         "to follow the extension")
    return requested


def output_paths(out: Path, images: list[GeneratedImage]) -> list[Path]:
    """``out`` for one image, ``stem-i.ext`` for several; an extension given is kept, else the format's is added."""
    paths = []
    for image in images:
        ext = out.suffix or EXTENSIONS.get(image.mime_type, ".img")
        stem = out.stem if len(images) == 1 else f"{out.stem}-{image.index}"
        paths.append(out.with_name(stem + ext))
    return paths


def best_preview_kind(client: DiffusionClient, model: str, timeout: float | None) -> int:
    """The first of the model's ``preview_kinds`` (its best live preview); APPROX_RGB when it lists none."""
    for info in client.list_models(timeout=timeout):
        if (info.name == model if model else info.is_default) and info.preview_kinds:
            return info.preview_kinds[0]
    return PREVIEWS[FALLBACK_PREVIEW]


def _save_previews(step: pb.Step, directory: Path) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    for image in step.previews:
        ext = EXTENSIONS.get(image.mime_type, ".img")
        (directory / f"step{step.step:04d}-{image.index}{ext}").write_bytes(image.data)
    if step.HasField("latents"):
        (directory / f"step{step.step:04d}-latents.bin").write_bytes(step.latents.data)


def _stream(client: DiffusionClient, request: pb.GenerateRequest, args: argparse.Namespace) -> pb.GenerateResponse:
    bar = Progress("steps")
    response = None
    try:
        response = _follow(client, request, args, bar)
    finally:
        bar.close()
    if response is None:
        raise ClientError(grpc.StatusCode.UNKNOWN, "the stream ended without a result")
    return response


def _follow(client: DiffusionClient, request: pb.GenerateRequest, args: argparse.Namespace,
            bar: Progress) -> pb.GenerateResponse | None:
    response = None
    for event in client.stream_request(request, timeout=args.timeout):
        kind = event.WhichOneof("event")
        if kind == "queued":
            bar.note(f"queued at position {event.queued.position}")
        elif kind == "started":
            bar.note(f"started on {event.started.model} ({event.started.backend}), seed {event.started.seed}")
        elif kind == "step":
            bar.update(event.step.step, event.step.total_steps, event.step.eta_s)
            if args.preview_dir:
                _save_previews(event.step, Path(args.preview_dir))
        elif kind == "result":
            response = event.result
    return response


def run_generate(args: argparse.Namespace) -> int:
    try:
        image_format = output_format(args.out, args.format)
        request = build_request(
            args.prompt,
            negative_prompt=args.negative,
            width=args.width,
            height=args.height,
            steps=args.steps,
            guidance_scale=args.guidance,
            seed=args.seed,
            num_images=args.num_images,
            scheduler=args.scheduler,
            output_format=image_format,
            quality=args.quality,
            model=args.model,
            preview="none" if not (args.stream and args.preview_dir) else (
                FALLBACK_PREVIEW if args.preview == AUTO_PREVIEW else args.preview
            ),
            preview_every=args.preview_every,
            init_image=_read(args.init_image, "--init-image"),
            strength=args.strength,
            mask=_read(args.mask, "--mask"),
            mask_blur=args.mask_blur,
            keep_unmasked=args.keep_unmasked,
            hires=args.hires,
            hires_steps=args.hires_steps,
            hires_strength=args.hires_strength,
            hires_upscaler=args.hires_upscaler,
            cache_interval=args.cache_interval,
            cache_depth=args.cache_depth,
            loras=args.lora,
            control=_control(args),
        )
    except (ValueError, OSError) as exc:
        return _fail(str(exc), 2)
    started = time.perf_counter()
    try:
        with open_client(args) as client:
            try:
                if args.stream and args.preview_dir and args.preview == AUTO_PREVIEW:
                    request.preview.kind = best_preview_kind(client, args.model, args.timeout)
                if args.stream:
                    response = _stream(client, request, args)
                else:
                    response = client.generate_request(request, timeout=args.timeout).response
            except ClientError as exc:
                return _fail(_explain(exc, args.server, client), 1)
    except ValueError as exc:
        return _fail(str(exc), 2)
    images = [GeneratedImage.from_proto(i) for i in response.images]
    for image, path in zip(images, output_paths(Path(args.out), images)):
        image.save(path)
        sys.stdout.write(f"{path}  seed={image.seed} {image.width}x{image.height}\n")
    for warning in response.warnings:
        sys.stderr.write(f"warning: {warning}\n")
    sys.stderr.write(
        f"{len(images)} image(s) in {time.perf_counter() - started:.2f}s "
        f"({response.model}, {response.backend}, {response.scheduler}, {response.steps} steps)\n"
    )
    return 0


def _control(args: argparse.Namespace) -> pb.ControlOptions | None:
    if args.control_image is None and args.canny_from is None:
        for flag in ("controlnet", "control_scale", "control_start", "control_end", "canny_low", "canny_high"):
            if getattr(args, flag) not in (None, ""):
                raise ValueError(f"--{flag.replace('_', '-')} needs --control-image or --canny-from")
        return None
    return control_options(
        image=args.control_image, canny_from=args.canny_from, controlnet=args.controlnet, scale=args.control_scale,
        guidance_start=args.control_start, guidance_end=args.control_end, canny_low=args.canny_low,
        canny_high=args.canny_high,
    )
def _read(path: str | None, flag: str) -> bytes | None:
    """A file's bytes, or ValueError saying which flag named a file that cannot be read."""
    if path is None:
        return None
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise ValueError(f"{flag}: cannot read {path}: {exc.strerror}") from None


def run_models(args: argparse.Namespace) -> int:
    try:
        with open_client(args) as client:
            try:
                models = client.list_models(timeout=args.timeout)
            except ClientError as exc:
                return _fail(_explain(exc, args.server, client), 1)
    except ValueError as exc:
        return _fail(str(exc), 2)
    for m in models:
        mark = " (default)" if m.is_default else ""
        sys.stdout.write(
            f"{m.name}{mark}: {m.backend} on {m.device} ({m.dtype}), source {m.source}\n"
            f"  size {m.default_width}x{m.default_height} (from {m.min_size} to {m.max_size}, "
            f"multiples of {m.size_multiple}), {m.default_steps} steps, guidance {m.default_guidance_scale:g}\n"
            f"  schedulers: {', '.join(m.schedulers)} (default {m.default_scheduler})\n"
            f"  image inputs: {_image_inputs(m.image_inputs)}\n"
            + (f"  previews: {_preview_kinds(m.preview_kinds)} (the first is the best live preview)\n"
               if m.preview_kinds else "")
            + (f"  step caching: depths {', '.join(map(str, m.step_cache_depths))} (default every "
               f"{m.default_cache_interval} at depth {m.default_cache_depth})\n" if m.step_cache_depths else "")
            + (f"  fused adapters: {', '.join(f'{a.name}:{a.scale:g}' for a in m.fused_adapters)}\n"
               if m.fused_adapters else "")
            + (f"  controlnets: {', '.join(c.name + (f' ({c.conditioning})' if c.conditioning else '') for c in m.controlnets)}\n"
               if m.controlnets else "")
        )
        for a in m.adapters:
            what = f"error: {a.error}" if a.error else (
                f"{a.format}, rank {a.rank}, {a.layers} layers, {a.size_bytes / 1e3:.0f} kB"
                + (f", for {a.base_model}" if a.base_model else ""))
            sys.stdout.write(f"  adapter {a.name}: {what}\n")
    return 0


def _preview_kinds(kinds: Iterable[int]) -> str:
    names = {value: name for name, value in PREVIEWS.items()}
    return ", ".join(names.get(kind, str(kind)) for kind in kinds)


def _image_inputs(support: pb.ImageInputSupport) -> str:
    if not support.img2img:
        return "hi-res fix (latent upscaler) only: no VAE encoder"
    return (f"img2img, inpainting ({support.inpainting_method}), hi-res fix; each image at most "
            f"{support.max_image_bytes / 2**20:g} MiB and {support.max_image_pixels} pixels")


def _explain(exc: ClientError, server: str, client: DiffusionClient) -> str:
    unreachable = f"cannot reach a diffusiond server at {server} ({exc.details}); is `diffusiond serve` running?"
    if exc.code is grpc.StatusCode.UNAVAILABLE and ("connect" in exc.details.lower() or "failed" in exc.details.lower()):
        return unreachable
    if exc.code is grpc.StatusCode.DEADLINE_EXCEEDED:
        try:  # the timeout may have passed while retrying a server that never answered at all
            client.wait_ready(timeout=1.0)
        except ClientError:
            return unreachable
        return f"the server at {server} did not finish before the timeout ({exc.details})"
    return f"{exc.code.name}: {exc.details}"


def _fail(message: str, code: int) -> int:
    sys.stderr.write(f"error: {message}\n")
    return code
