"""``diffusiond``: serve | generate | models.

Client commands import only the client; ``serve`` imports the inference stack
when it runs, so ``diffusiond generate`` works where only the client is installed.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys

from diffusiond.client.cli import add_connection_arguments, add_generate_arguments, run_generate, run_models

log = logging.getLogger("diffusiond")
MIB = 1024 * 1024


def add_serve_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (0.0.0.0 for all interfaces)")
    parser.add_argument("--port", type=int, default=50051)
    parser.add_argument(
        "--model", action="append", default=None, metavar="[NAME=]PATH",
        help="a diffusers-format model directory (repeatable; the first is the default). "
        "Default: the built-in model, created on first start.",
    )
    parser.add_argument("--backend", default="torch", help="inference backend (torch)")
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    parser.add_argument("--dtype", default="fp32", choices=["fp32", "fp16", "bf16"],
                        help="network precision; bf16 is fast only on CPUs with AVX512-BF16/AMX")
    parser.add_argument("--max-queue", type=int, default=64,
                        help="requests waiting before new ones get RESOURCE_EXHAUSTED")
    parser.add_argument("--max-batch-size", type=int, default=1,
                        help="most images per UNet batch; compatible requests share one (1: no batching)")
    parser.add_argument("--max-batch-delay-ms", type=float, default=0.0,
                        help="how long the oldest queued request waits for compatible company")
    parser.add_argument("--max-size", type=int, default=2048, help="largest width/height accepted, in pixels")
    parser.add_argument("--grace-period", type=float, default=30.0,
                        help="seconds accepted requests get to finish on shutdown")
    parser.add_argument("--prompt-cache-size", type=int, default=256,
                        help="prompt encodings kept per model (LRU; 0: none)")
    parser.add_argument("--result-cache-mb", type=float, default=0.0,
                        help="MiB of finished images kept for repeated seeded requests (LRU; 0: off)")
    parser.add_argument("--metrics-port", type=int, default=0,
                        help="serve Prometheus metrics at http://HOST:PORT/metrics (0: off)")
    parser.add_argument("--metrics-host", default=None, help="address for --metrics-port (default: --host)")
    parser.add_argument("--compression", default="none", choices=["none", "gzip"],
                        help="compression of responses (requests may be gzip-compressed either way)")
    parser.add_argument("--max-send-message-mb", type=float, default=None,
                        help="largest message sent, in MiB (default: enough for max-images images "
                        "of max-size, 98 MiB for the defaults)")
    parser.add_argument("--max-receive-message-mb", type=float, default=4.0,
                        help="largest request accepted, in MiB")
    parser.add_argument("--threads", type=int, default=0, help="CPU threads for inference (0: all cores)")
    parser.add_argument("--no-warmup", action="store_true", help="skip the warm-up generation at start")
    parser.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])


def run_serve(args: argparse.Namespace) -> int:
    from diffusiond.backends.base import BackendSettings
    from diffusiond.errors import DiffusiondError
    from diffusiond.models.sources import ModelSource
    from diffusiond.server.app import ServerSettings
    from diffusiond.server.engine import EngineSettings

    if args.threads > 0:
        import torch

        torch.set_num_threads(args.threads)
    try:
        settings = ServerSettings(
            host=args.host,
            port=args.port,
            models=[ModelSource.parse(m) for m in (args.model or ["builtin"])],
            backend=args.backend,
            backend_settings=BackendSettings(device=args.device, dtype=args.dtype),
            engine=EngineSettings(
                max_queue=args.max_queue,
                max_batch_size=args.max_batch_size,
                max_batch_delay_ms=args.max_batch_delay_ms,
            ),
            max_size=args.max_size,
            grace_period_s=args.grace_period,
            warmup=not args.no_warmup,
            prompt_cache_size=args.prompt_cache_size,
            result_cache_bytes=int(args.result_cache_mb * MIB),
            metrics_host=args.metrics_host,
            metrics_port=args.metrics_port or None,
            compression=args.compression,
            max_send_message_bytes=None if args.max_send_message_mb is None else int(args.max_send_message_mb * MIB),
            max_receive_message_bytes=int(args.max_receive_message_mb * MIB),
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


async def _serve(settings) -> int:
    from diffusiond.server.app import DiffusionServer

    server = DiffusionServer(settings)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, _on_signal, sig, stop)
    await server.start()
    loader = asyncio.create_task(server.load())
    stopper = asyncio.create_task(stop.wait())
    done, _ = await asyncio.wait({loader, stopper}, return_when=asyncio.FIRST_COMPLETED)
    if loader in done:
        loader.result()  # raises if a model failed to load
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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="diffusiond", description="Text-to-image service over gRPC.")
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="run the gRPC server")
    add_serve_arguments(serve)
    serve.set_defaults(func=run_serve)
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
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    level = getattr(args, "log_level", "WARNING")
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
