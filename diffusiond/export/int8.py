"""Static INT8 quantization of the UNet with ONNX Runtime, from recorded calibration inputs.

The default is the form TensorRT takes for explicit quantization: QDQ
(QuantizeLinear/DequantizeLinear pairs around each quantized op), symmetric
int8 activations and weights, weights per output channel. Conv, MatMul and
Gemm with constant weights are quantized; the attention products between two
activations are not (as in NVIDIA's recipe without MHA quantization). The layers
NVIDIA's diffusion recipe keeps in higher precision stay fp32: ``conv_in``,
``conv_out``, the time embedding (``time_proj``, ``time_embedding``,
``time_emb_proj``), the residual ``conv_shortcut`` convolutions and
``add_embedding``.

Other type pairs and formats (uint8 activations, QOperator, per-tensor
weights, reduced range) are settings, for CPU kernels that prefer them; the
benchmark compares them.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from diffusiond.errors import InvalidArgument, MissingDependency
from diffusiond.export.calibration import CalibrationSettings, UNetCalibrationReader
from diffusiond.export.onnx_io import nodes_in_modules
from diffusiond.export.quiet import quiet_tools

log = logging.getLogger(__name__)

# NVIDIA's diffusion INT8 recipe keeps these in higher precision.
KEEP_FP32_MODULES = (
    "conv_in",
    "conv_out",
    "time_proj",
    "time_embedding",
    "time_emb_proj",
    "conv_shortcut",
    "add_embedding",
)
QUANT_FORMATS = ("qdq", "qoperator")
QUANT_TYPES = ("int8", "uint8")


@dataclass(frozen=True)
class Int8Settings:
    quant_format: str = "qdq"
    activation_type: str = "int8"
    weight_type: str = "int8"
    per_channel: bool = True
    symmetric_activations: bool = True  # zero point 0, as TensorRT requires
    reduce_range: bool = False  # 7-bit weights: avoids u8s8 saturation on CPUs without VNNI
    op_types: tuple[str, ...] = ("Conv", "MatMul", "Gemm")
    keep_fp32_modules: tuple[str, ...] = KEEP_FP32_MODULES

    def __post_init__(self) -> None:
        if self.quant_format not in QUANT_FORMATS:
            raise InvalidArgument("quant format", f"{self.quant_format!r} is not one of {', '.join(QUANT_FORMATS)}")
        for name, value in (("activation type", self.activation_type), ("weight type", self.weight_type)):
            if value not in QUANT_TYPES:
                raise InvalidArgument(name, f"{value!r} is not one of {', '.join(QUANT_TYPES)}")

    @property
    def label(self) -> str:
        """Short name for logs and benchmarks, e.g. ``qdq-s8s8-per-channel``."""
        short = {"int8": "s8", "uint8": "u8"}
        parts = [self.quant_format, short[self.activation_type] + short[self.weight_type]]
        parts.append("per-channel" if self.per_channel else "per-tensor")
        if self.reduce_range:
            parts.append("reduce-range")
        if set(self.op_types) != {"Conv", "MatMul", "Gemm"}:
            parts.append("+".join(self.op_types).lower())
        return "-".join(parts)

    def to_json(self) -> dict[str, object]:
        return {
            "tool": "onnxruntime.quantization.quantize_static",
            "format": self.quant_format.upper() if self.quant_format == "qdq" else "QOperator",
            "activation_type": self.activation_type,
            "weight_type": self.weight_type,
            "per_channel": self.per_channel,
            "symmetric_activations": self.symmetric_activations,
            "reduce_range": self.reduce_range,
            "op_types": list(self.op_types),
            "constant_weight_matmuls_only": True,
            "kept_fp32_modules": list(self.keep_fp32_modules),
        }


def quantize_unet(
    fp32_path: Path,
    out_path: Path,
    samples: list,
    settings: Int8Settings,
    calibration: CalibrationSettings,
    use_external_data: bool = False,
    range_cache: Path | None = None,
) -> dict[str, object]:
    """Write the INT8 UNet for ``fp32_path`` to ``out_path``; return what was done, for the manifest.

    ``range_cache`` is ONNX Runtime's calibration cache (the activation ranges): when the file
    exists, ``samples`` may be empty and calibration is not run again; otherwise it is written.
    """
    try:
        import onnx
        from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    except ImportError:
        raise MissingDependency("onnxruntime", "INT8 quantization", "onnx") from None

    cached = range_cache is not None and range_cache.is_file()
    if not samples and not cached:
        raise InvalidArgument("calibration", "no calibration samples were recorded")
    types = {"int8": QuantType.QInt8, "uint8": QuantType.QUInt8}
    methods = {
        "minmax": CalibrationMethod.MinMax,
        "percentile": CalibrationMethod.Percentile,
        "entropy": CalibrationMethod.Entropy,
    }
    graph = onnx.load(str(fp32_path), load_external_data=False)
    excluded = nodes_in_modules(graph, settings.keep_fp32_modules)
    quantizable = [n.name for n in graph.graph.node if n.op_type in settings.op_types]
    kept = sorted(set(excluded) & set(quantizable))
    del graph
    extra = {
        "MatMulConstBOnly": True,  # leave attention's activation x activation products in fp32
        "ActivationSymmetric": settings.symmetric_activations,
        "WeightSymmetric": True,
        # No CalibMaxIntermediateOutputs: ONNX Runtime's MinMax calibrator (1.32) empties its buffer
        # when that count is reached without merging it into the ranges, so every sample but the
        # last few would be lost. MinMax keeps only per-tensor minima and maxima per sample anyway.
        "QDQOpTypePerChannelSupportToAxis": {"MatMul": 1},
    }
    if calibration.method == "percentile":
        extra["CalibPercentile"] = calibration.percentile
    reader = UNetCalibrationReader(samples) if samples else None
    log.info(
        "quantizing %s (%s, %d of %d Conv/MatMul/Gemm nodes kept fp32) from %s, %s calibration",
        fp32_path.parent.name, settings.label, len(kept), len(quantizable),
        f"cached ranges {range_cache}" if cached else f"{len(samples)} calibration samples", calibration.method,
    )
    with quiet_tools("quantizer"):  # its prints and root-logger advice go to the debug log
        quantize_static(
            str(fp32_path),
            str(out_path),
            reader,
            quant_format=QuantFormat.QDQ if settings.quant_format == "qdq" else QuantFormat.QOperator,
            op_types_to_quantize=list(settings.op_types),
            per_channel=settings.per_channel,
            reduce_range=settings.reduce_range,
            activation_type=types[settings.activation_type],
            weight_type=types[settings.weight_type],
            nodes_to_exclude=excluded,
            use_external_data_format=use_external_data,
            calibrate_method=methods[calibration.method],
            extra_options=extra,
            calibration_cache_path=str(range_cache) if range_cache is not None else None,
        )
    return {
        **settings.to_json(),
        "quantizable_nodes": len(quantizable),
        "quantizable_nodes_kept_fp32": len(kept),
        "activation_ranges": "cached" if cached else "calibrated",
    }
