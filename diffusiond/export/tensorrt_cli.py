"""``diffusiond export tensorrt``: arguments and the command."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

log = logging.getLogger("diffusiond")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--onnx", required=True, help="an ONNX export (`diffusiond export onnx`) to build engines from")
    parser.add_argument("--out", required=True, help="directory to write the engines into")
    parser.add_argument("--precision", default="", choices=["fp32", "fp16", "int8"],
                        help="refuse an ONNX export of another precision (default: build whatever it holds; "
                        "engines keep the export's types, so fp16 engines come from `export onnx --precision fp16`)")
    parser.add_argument("--device", default="cuda", help="the GPU to build for (cuda or cuda:N)")
    parser.add_argument("--max-images", type=int, default=0, help="images per call the profile covers (default: the export's)")
    parser.add_argument("--min-size", type=int, default=0, help="smallest image side (default: the export's profile)")
    parser.add_argument("--opt-size", type=int, default=0, help="image side the kernels are tuned for")
    parser.add_argument("--max-size", type=int, default=0, help="largest image side (default: the export's profile)")
    parser.add_argument("--workspace-gb", type=float, default=8.0, help="builder workspace, GiB")
    parser.add_argument("--optimization-level", type=int, default=3, help="TensorRT builder optimisation level 0-5")
    parser.add_argument("--vae-encoder", default="auto", choices=["auto", "build", "skip"],
                        help="the VAE encoder engine, which image inputs (img2img, inpainting) need: auto builds it "
                        "when the ONNX export has it, build requires it, skip leaves it out")
    parser.add_argument("--force", action="store_true", help="rebuild even when the engines are up to date")
    parser.add_argument("--controlnet", action="store_true",
                        help="also build the export's ControlNet (controlnet, unet_controlled; see export onnx --controlnet)")
    parser.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])


def profile_from_args(args: argparse.Namespace, onnx_dir: Path):
    """The export's own profile, with any size/image bounds the operator overrode."""
    from diffusiond.models.config import load_model_config
    from diffusiond.models.descriptors import Range, ShapeProfile
    from diffusiond.models.manifest import read_manifest

    if not (args.max_images or args.min_size or args.opt_size or args.max_size):
        return None
    manifest = read_manifest(onnx_dir)
    base = (
        ShapeProfile.from_json(manifest.profile)
        if manifest is not None
        else ShapeProfile.around(load_model_config(onnx_dir).default_size)
    )
    low = args.min_size or base.height.min
    high = args.max_size or base.height.max
    opt = args.opt_size or min(max(base.height.opt, low), high)
    size = Range(low, opt, high)
    images = Range(1, 1, args.max_images) if args.max_images else base.images
    return ShapeProfile(images=images, height=size, width=size)


def run(args: argparse.Namespace) -> int:
    from diffusiond.errors import DiffusiondError
    from diffusiond.export.tensorrt_build import EngineBuildOptions, build_engines

    onnx_dir = Path(args.onnx)
    try:
        options = EngineBuildOptions(
            precision=args.precision,
            profile=profile_from_args(args, onnx_dir),
            controlnet=args.controlnet,
            workspace_gib=args.workspace_gb,
            optimization_level=args.optimization_level,
            force=args.force,
            device=args.device,
            vae_encoder=args.vae_encoder,
        )
        manifest, reused = build_engines(onnx_dir, Path(args.out), options)
    except DiffusiondError as exc:
        log.error("TensorRT build failed: %s", exc)
        return 2
    machine = manifest.machine
    sys.stdout.write(
        f"{args.out}: {'up to date, reused' if reused else 'written'} ({manifest.precision}, "
        f"{machine['gpu_name']}, compute capability {machine['compute_capability']}, "
        f"TensorRT {machine['tensorrt_version']})\n"
    )
    for name, entry in manifest.components.items():
        sys.stdout.write(f"  {name:13s} {entry['precision']:5s} {entry['bytes'] / 1e6:10.1f} MB  {entry['file']}\n")
    return 0
