"""Why INT8 is no faster on some CPUs: ONNX Runtime's int8 GEMM kernels vs its fp32 GEMM, alone.

    .venv/bin/python bench/int8_gemm_cpu.py [--m 4096 --k 640 --n 640 --threads 2]

Times one MatMul of the UNet's typical shape (a 32x32 latent's 1024 tokens x
batch 4, 640 channels) in fp32, and as QLinearMatMul / MatMulInteger with the
type pairs ONNX Runtime's CPU kernels offer (u8s8, u8u8, s8s8). Where the CPU
has VNNI or AMX the int8 kernels do 4x the multiply-adds per instruction; on
AVX2 alone they emulate the dot product (vpmaddubsw + vpmaddwd) and end up
near fp32 speed, before any quantize/dequantize overhead.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper


def run(model, feeds, threads: int, repeats: int = 10) -> float:
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    session.run(None, feeds)
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        session.run(None, feeds)
        times.append(time.perf_counter() - started)
    return float(np.median(times))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--m", type=int, default=4096)
    parser.add_argument("--k", type=int, default=640)
    parser.add_argument("--n", type=int, default=640)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    m, k, n = args.m, args.k, args.n
    rng = np.random.default_rng(0)
    opset = [helper.make_opsetid("", 17)]
    flops = 2 * m * k * n

    x = rng.standard_normal((m, k)).astype(np.float32)
    w = rng.standard_normal((k, n)).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"])], "fp32",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [m, k])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], [numpy_helper.from_array(w, "w")],
    )
    base = run(helper.make_model(graph, opset_imports=opset), {"x": x}, args.threads)
    print(f"ONNX Runtime {ort.__version__}, M={m} K={k} N={n}, {args.threads} threads")
    print(f"| kernel | ms | GOP/s | vs fp32 |\n|---|---:|---:|---:|\n| fp32 MatMul | {base * 1e3:.1f} | {flops / base / 1e9:.1f} | 1.00 |")
    types = {"u8": (np.uint8, TensorProto.UINT8, 0, 255), "s8": (np.int8, TensorProto.INT8, -127, 127)}
    for act, wt in (("u8", "s8"), ("u8", "u8"), ("s8", "s8")):
        a_np, a_pb, a_lo, a_hi = types[act]
        w_np, _, w_lo, w_hi = types[wt]
        xq = rng.integers(a_lo, a_hi, size=(m, k)).astype(a_np)
        wq = numpy_helper.from_array(rng.integers(w_lo, w_hi, size=(k, n)).astype(w_np), "w")
        zero_a, zero_w = numpy_helper.from_array(np.array(0, a_np), "za"), numpy_helper.from_array(np.array(0, w_np), "zw")
        scale = numpy_helper.from_array(np.array(0.01, np.float32), "s")
        qlinear = helper.make_graph(
            [helper.make_node("QLinearMatMul", ["x", "s", "za", "w", "s", "zw", "s", "za"], ["y"])], "q",
            [helper.make_tensor_value_info("x", a_pb, [m, k])], [helper.make_tensor_value_info("y", a_pb, None)],
            [wq, zero_a, zero_w, scale],
        )
        integer = helper.make_graph(
            [helper.make_node("MatMulInteger", ["x", "w", "za", "zw"], ["y"])], "i",
            [helper.make_tensor_value_info("x", a_pb, [m, k])], [helper.make_tensor_value_info("y", TensorProto.INT32, None)],
            [wq, zero_a, zero_w],
        )
        for name, graph in ((f"QLinearMatMul {act}{wt}", qlinear), (f"MatMulInteger {act}{wt}", integer)):
            t = run(helper.make_model(graph, opset_imports=opset), {"x": xq}, args.threads)
            print(f"| {name} | {t * 1e3:.1f} | {flops / t / 1e9:.1f} | {base / t:.2f} |")


if __name__ == "__main__":
    main()
