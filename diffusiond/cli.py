"""``diffusiond``: serve | generate | models | create-model | eval.

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
    parser.add_argument("--max-queue", type=int, default=64, help="requests waiting before RESOURCE_EXHAUSTED")
    parser.add_argument("--max-batch-size", type=int, default=1, help="requests per UNet batch")
    parser.add_argument("--max-batch-delay-ms", type=float, default=0.0,
                        help="how long a batch waits for compatible requests")
    parser.add_argument("--max-size", type=int, default=2048, help="largest width/height accepted, in pixels")
    parser.add_argument("--grace-period", type=float, default=30.0,
                        help="seconds accepted requests get to finish on shutdown")
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
        )
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


def add_eval_arguments(parser: argparse.ArgumentParser) -> None:
    # Defaults are EvalSettings'; it is not imported here, so client commands never load torch.
    parser.add_argument("--model", default="builtin", metavar="[NAME=]PATH",
                        help="model directory (diffusers or exported layout); default: the built-in model")
    parser.add_argument("--backend", default="torch", help="inference backend (torch)")
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
    parser.add_argument("--threads", type=int, default=0, help="CPU threads for inference (0: all cores)")
    parser.add_argument("--clip-model", default="", metavar="DIR",
                        help="a local CLIP model directory: also report CLIP score")
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
        save_images=args.save_images,
    )

    def progress(done: int, total: int) -> None:
        sys.stderr.write(f"\r{done}/{total} prompts")
        if done == total:
            sys.stderr.write("\n")
        sys.stderr.flush()

    try:
        report = evaluate(settings, progress=progress)
    except DiffusiondError as exc:
        log.error("cannot evaluate: %s", exc)
        return 2
    sys.stdout.write(report.table() + "\n")
    if args.out:
        write_report(report, Path(args.out))
        sys.stdout.write(f"report: {args.out}\n")
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
    create.add_argument("--preset", default="sd15-half", choices=["tiny", "sd15-half", "sd15"])
    create.add_argument("--out", required=True, help="directory to write the diffusers-format model into")
    create.add_argument("--seed", type=int, default=0)
    create.add_argument("--force", action="store_true")
    create.set_defaults(func=run_create_model)
    evaluate = sub.add_parser(
        "eval", help="generate the shapes data set's held-out prompts and score them (in-process, no server)"
    )
    add_eval_arguments(evaluate)
    evaluate.set_defaults(func=run_eval)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    level = getattr(args, "log_level", "WARNING")
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
