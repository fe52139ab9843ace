"""FP16 conversion with ONNX Runtime's float16 tool, keeping the sensitive parts in fp32.

What stays in fp32, and why:

- normalisation (InstanceNormalization, which is how GroupNorm exports,
  LayerNormalization, GroupNormalization): their mean/variance reductions over
  thousands of values lose precision or overflow in fp16;
- the sinusoidal timestep embedding (the UNet's ``time_proj``): it computes
  ``sin``/``cos`` of timesteps up to 1000 times frequencies, where fp16's
  spacing near 1000 (0.5) would scramble the phase;
- ops ONNX Runtime's tool blocks by default (Range, CumSum, TopK, Resize's
  scales...), whose fp16 kernels are missing or inexact.

Inputs and outputs stay float32 (``keep_io_types``): an fp16 artifact takes and
returns the same tensors as an fp32 one, and casts at its edges.

The SD VAE overflows in fp16 (diffusers marks it ``force_upcast``), so an fp16
export keeps the VAE networks in fp32 unless the model says otherwise.
"""

from __future__ import annotations

from dataclasses import dataclass

from diffusiond.export.onnx_io import nodes_in_modules
from diffusiond.export.quiet import quiet_tools
from diffusiond.models.descriptors import TEXT_ENCODER, UNET, VAE_DECODER, VAE_ENCODER

SENSITIVE_OPS = ("InstanceNormalization", "LayerNormalization", "GroupNormalization")
SENSITIVE_MODULES = ("time_proj",)


@dataclass(frozen=True)
class Fp16Settings:
    keep_ops_fp32: tuple[str, ...] = SENSITIVE_OPS
    keep_modules_fp32: tuple[str, ...] = SENSITIVE_MODULES

    def to_json(self) -> dict[str, object]:
        return {
            "tool": "onnxruntime.transformers.float16.convert_float_to_float16",
            "keep_io_types": True,
            "ops_kept_fp32": list(self.keep_ops_fp32) + ["onnxruntime DEFAULT_OP_BLOCK_LIST"],
            "modules_kept_fp32": list(self.keep_modules_fp32),
        }


def fp16_components(vae_force_upcast: bool) -> tuple[str, ...]:
    """The components an fp16 export converts."""
    if vae_force_upcast:
        return (TEXT_ENCODER, UNET)
    return (TEXT_ENCODER, UNET, VAE_DECODER, VAE_ENCODER)


def convert_to_fp16(model, settings: Fp16Settings = Fp16Settings(), shapes_inferred: bool = False):
    """Return ``model`` with float tensors in fp16 except the kept ops and modules; I/O stays float32.

    The converter runs ONNX shape inference in memory, which protobuf refuses past 2 GB: for such
    models infer shapes on the files first (``onnx.shape_inference.infer_shapes_path``) and pass
    ``shapes_inferred``.
    """
    from onnxruntime.transformers import float16

    node_block_list = nodes_in_modules(model, settings.keep_modules_fp32)
    with quiet_tools("float16 converter"):
        return float16.convert_float_to_float16(
            model,
            keep_io_types=True,
            op_block_list=list(float16.DEFAULT_OP_BLOCK_LIST) + list(settings.keep_ops_fp32),
            node_block_list=node_block_list,
            disable_shape_infer=shapes_inferred,
        )
