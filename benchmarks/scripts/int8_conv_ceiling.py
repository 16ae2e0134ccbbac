"""How much faster can ONNX Runtime's int8 convolution be than its fp32 one on this CPU?

    .venv/bin/python -m benchmarks.scripts.int8_conv_ceiling [--batch 32] [--rounds 30]

The whole-model speed-up of an int8 file is bounded by its convolutions'. This script times, one
intra-op thread, single 3x3 convolutions shaped like the CIFAR ResNets' stages (16 channels at 32x32,
32 at 16x16, 64 at 8x8; batch 32): an fp32 `Conv` against `QLinearConv` with uint8 activations and
int8 weights (per channel, and per tensor) and with uint8 weights. The sessions run call by call in
turn, so load from other jobs falls on all of them alike; it prints the median milliseconds and the
speed-up over fp32 of each, and the CPU flags that decide which int8 kernel ONNX Runtime uses (VNNI
or not).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper
from tabulate import tabulate

STAGES = ((16, 32), (32, 16), (64, 8))  # (channels, spatial size)


def _fp32_conv(channels: int, weights: np.ndarray) -> onnx.ModelProto:
    nodes = [helper.make_node("Conv", ["x", "w"], ["y"], pads=[1, 1, 1, 1])]
    return _model(nodes, [numpy_helper.from_array(weights, "w")], TensorProto.FLOAT, channels)


def _int8_conv(
    channels: int, weights: np.ndarray, weight_type: str, per_channel: bool
) -> onnx.ModelProto:
    """QLinearConv of uint8 activations with `weight_type` ("int8" or "uint8") weights."""
    axes = (1, 2, 3)
    absmax = np.abs(weights).max(axis=axes) if per_channel else np.array([np.abs(weights).max()])
    scale = (absmax / 127.0).astype(np.float32)
    shape = (-1, 1, 1, 1) if per_channel else (1, 1, 1, 1)
    quantized = np.clip(np.round(weights / scale.reshape(shape)), -127, 127)
    if weight_type == "int8":
        w, zero = quantized.astype(np.int8), np.zeros_like(scale, dtype=np.int8)
    else:
        w, zero = (quantized + 128).astype(np.uint8), np.full_like(scale, 128, dtype=np.uint8)
    initializers = [
        numpy_helper.from_array(w, "w"),
        numpy_helper.from_array(scale, "w_scale"),
        numpy_helper.from_array(zero, "w_zero"),
        numpy_helper.from_array(np.array(0.05, np.float32), "x_scale"),
        numpy_helper.from_array(np.array(128, np.uint8), "x_zero"),
        numpy_helper.from_array(np.array(0.05, np.float32), "y_scale"),
        numpy_helper.from_array(np.array(128, np.uint8), "y_zero"),
    ]
    inputs = ["x", "x_scale", "x_zero", "w", "w_scale", "w_zero", "y_scale", "y_zero"]
    nodes = [helper.make_node("QLinearConv", inputs, ["y"], pads=[1, 1, 1, 1])]
    return _model(nodes, initializers, TensorProto.UINT8, channels)


def _model(
    nodes: list[onnx.NodeProto], initializers: list[TensorProto], dtype: int, channels: int
) -> onnx.ModelProto:
    graph = helper.make_graph(
        nodes,
        "conv",
        [helper.make_tensor_value_info("x", dtype, ["n", channels, "h", "w"])],
        [helper.make_tensor_value_info("y", dtype, None)],
        initializers,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])


def _session(model: onnx.ModelProto) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def time_stage(channels: int, size: int, batch: int, rounds: int) -> dict[str, float]:
    """Median ms per call of each convolution variant at one stage's shape."""
    rng = np.random.default_rng(0)
    weights = rng.standard_normal((channels, channels, 3, 3)).astype(np.float32) * 0.1
    x_float = rng.standard_normal((batch, channels, size, size)).astype(np.float32)
    x_uint8 = rng.integers(0, 256, (batch, channels, size, size), dtype=np.uint8)
    variants = {
        "fp32 Conv": (_session(_fp32_conv(channels, weights)), x_float),
        "u8 x s8 per-channel": (_session(_int8_conv(channels, weights, "int8", True)), x_uint8),
        "u8 x s8 per-tensor": (_session(_int8_conv(channels, weights, "int8", False)), x_uint8),
        "u8 x u8 per-tensor": (_session(_int8_conv(channels, weights, "uint8", False)), x_uint8),
    }
    times: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(3):
        for session, feed in variants.values():
            session.run(None, {"x": feed})
    for _ in range(rounds):
        for name, (session, feed) in variants.items():
            start = time.perf_counter()
            session.run(None, {"x": feed})
            times[name].append(1000 * (time.perf_counter() - start))
    return {name: float(np.median(values)) for name, values in times.items()}


def cpu_flags() -> str:
    """The CPU's model name and the SIMD flags that pick ONNX Runtime's int8 kernels."""
    info = Path("/proc/cpuinfo")
    if not info.is_file():
        return "unknown CPU"
    entries: dict[str, str] = {}
    for line in info.read_text(encoding="utf-8", errors="replace").splitlines():
        key, colon, value = line.partition(":")
        if colon:
            entries.setdefault(key.strip(), value.strip())  # the first core's values
    model, flags = entries.get("model name", "?"), set(entries.get("flags", "").split())
    wanted = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "amx_int8")
    return f"{model}; " + ", ".join(f"{flag} {'yes' if flag in flags else 'no'}" for flag in wanted)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=30)
    args = parser.parse_args(argv)
    print(f"CPU: {cpu_flags()}; onnxruntime {ort.__version__}; batch {args.batch}, one thread")
    rows = []
    for channels, size in STAGES:
        medians = time_stage(channels, size, args.batch, args.rounds)
        base = medians["fp32 Conv"]
        for name, ms in medians.items():
            rows.append([f"{channels} ch, {size}x{size}", name, f"{ms:.2f}", f"{base / ms:.2f}x"])
    print(tabulate(rows, headers=["stage", "convolution", "median ms", "vs fp32"], tablefmt="github"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
