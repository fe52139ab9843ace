"""Export toolchain: ONNX export, fp16 conversion, INT8 calibration and quantization, manifests."""
