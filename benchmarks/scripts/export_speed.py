"""CPU inference speed of the exported files (issue 4): torch eager vs ONNX Runtime fp32/fp16/int8.

    .venv/bin/python -m benchmarks.scripts.export_speed [--test-images 2000] [--rounds 20]

For cifar_resnet56 and cifar_resnet20 (pretrained, ../shared/weights/cifar10-resnet) and resnet8x4
(random weights: its speed counts, its accuracy is chance) it exports the four ONNX flavours with
the export stage's own functions, then times every runner side by side at batch 1 and 32,
alternating runners call by call so that load from other processes hits all of them alike. It
prints a Markdown table: p50 latency, images/s, achieved GFLOP/s (FLOPs counted by torch's
FlopCounterMode; one multiply-add = 2 FLOPs) against the CPU's fp32 peak, and top-1 on a
class-balanced subset of the CIFAR-10 test set (int8 calibrated on 512 training images).

This script drives the export stage, so unlike the rest of benchmarks/ it imports export and
reviewkd; nothing imports it.
"""

from __future__ import annotations

import argparse
import os
import platform
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from deploy.optional import optional_import

SHARED = Path(os.environ.get("REVIEWKD_SHARED", Path(__file__).resolve().parents[2] / "shared"))
CIFAR = SHARED / "data" / "cifar10"
WEIGHTS = SHARED / "weights" / "cifar10-resnet"
MODELS = {
    "cifar_resnet56": WEIGHTS / "resnet56-4bfd9763.th",
    "cifar_resnet20": WEIGHTS / "resnet20-12fca82f.th",
    "resnet8x4": None,
}
# The pretrained CIFAR ResNets were trained with these (their README).
MEAN = np.array([0.485, 0.456, 0.406], np.float32).reshape(1, 3, 1, 1)
STD = np.array([0.229, 0.224, 0.225], np.float32).reshape(1, 3, 1, 1)
# Zen 4 runs AVX-512 on two 256-bit FMA pipes: 2 pipes x 8 fp32 lanes x 2 FLOPs = 32 FLOPs/cycle/core.
FP32_FLOPS_PER_CYCLE = 32
# VPDPBUSD on the same two pipes: 2 x 32 int8 multiply-adds = 128 int8 ops/cycle/core.
INT8_OPS_PER_CYCLE = 128
# The VM's lscpu and /proc/cpuinfo show only the 2.6 GHz base clock, yet fp32 kernels measured
# above 2.6 GHz x 32 FLOPs; EPYC 9004 (Zen 4) cores boost to 3.7 GHz, which we take as the clock.
DEFAULT_GHZ = 3.7


def load_split(split: str, per_class: int) -> tuple[np.ndarray, np.ndarray]:
    """The first `per_class` images of each class (sorted file names), normalised float32 NCHW."""
    root = CIFAR / split
    images, labels = [], []
    for label, name in enumerate(sorted(p.name for p in root.iterdir() if p.is_dir())):
        for file in sorted((root / name).iterdir())[:per_class]:
            images.append(np.asarray(Image.open(file).convert("RGB"), np.float32).transpose(2, 0, 1) / 255.0)
            labels.append(label)
    array = (np.stack(images) - MEAN) / STD
    return array.astype(np.float32), np.array(labels)


def cpu_peak(cores: int, ghz: float) -> tuple[str, float, str]:
    """(CPU model, fp32 peak GFLOP/s of `cores` cores at `ghz`, how the peak was estimated)."""
    info = dict(
        line.split(":", 1)
        for line in subprocess.run(["lscpu"], capture_output=True, text=True).stdout.splitlines()
        if ":" in line
    )
    model = info.get("Model name", platform.processor()).strip()
    family = f"family {info.get('CPU family', '?').strip()}, model {info.get('Model', '?').strip()}"
    peak = cores * ghz * FP32_FLOPS_PER_CYCLE
    how = (
        f"{cores} core(s) x {ghz:.2f} GHz x {FP32_FLOPS_PER_CYCLE} fp32 FLOPs/cycle (2 x 256-bit FMA pipes); "
        f"int8 rows against {INT8_OPS_PER_CYCLE // FP32_FLOPS_PER_CYCLE}x that (AVX-512 VNNI)"
    )
    return f"{model} ({family})", peak, how


def _ort_runner(session: Any) -> Callable[[np.ndarray], np.ndarray]:
    def run(x: np.ndarray) -> np.ndarray:
        return np.asarray(session.run(None, {"images": x})[0])

    return run


def main() -> None:
    """Export, time and print the table."""
    with optional_import("the export speed measurement"):
        import onnxruntime as ort
        import torch
        from torch.utils.flop_counter import FlopCounterMode

        from export.onnx_export import export_fp32
        from export.precision import convert_fp16, quantize_int8
        from reviewkd.models import create_model

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--test-images", type=int, default=2000, help="class-balanced CIFAR-10 test subset")
    parser.add_argument("--calib-images", type=int, default=512)
    parser.add_argument("--rounds", type=int, default=15, help="timed calls per runner and batch size")
    parser.add_argument("--ghz", type=float, default=DEFAULT_GHZ, help="core clock for the peak estimate")
    parser.add_argument("--threads", type=int, default=1, help="intra-op threads for torch and ORT")
    args = parser.parse_args()

    # One thread by default: on a shared machine, multi-threaded runs wait on descheduled worker
    # threads and their timings swing by 10x; one thread measures the kernels, not the scheduler.
    threads = args.threads
    torch.set_num_threads(threads)
    test_x, test_y = load_split("test", args.test_images // 10)
    calib_x, _ = load_split("train", -(-args.calib_images // 10))
    calib = [calib_x[i : i + 64] for i in range(0, args.calib_images, 64)]
    cpu, peak, how = cpu_peak(threads, args.ghz)
    load_before = os.getloadavg()
    rows: list[str] = []
    for name, weights in MODELS.items():
        torch.manual_seed(0)
        model = create_model(name, 10, weights=weights).eval()
        with FlopCounterMode(display=False) as counter, torch.no_grad():
            model(torch.from_numpy(test_x[:1]))
        flops = counter.get_total_flops()
        with tempfile.TemporaryDirectory() as tmp:
            files = {
                "onnxruntime/fp32": Path(tmp) / "student.onnx",
                "onnxruntime/fp16": Path(tmp) / "student.fp16.onnx",
                "onnxruntime/int8 (uint8 act, CPU)": Path(tmp) / "student.int8.onnx",
                "onnxruntime/int8 (symmetric, TRT)": Path(tmp) / "student.int8.trt.onnx",
            }
            export_fp32(model, files["onnxruntime/fp32"], (3, 32, 32), {})
            convert_fp16(files["onnxruntime/fp32"], files["onnxruntime/fp16"])
            quantize_int8(
                files["onnxruntime/fp32"], files["onnxruntime/int8 (uint8 act, CPU)"], calib, flavour="cpu"
            )
            quantize_int8(
                files["onnxruntime/fp32"], files["onnxruntime/int8 (symmetric, TRT)"], calib, flavour="trt"
            )
            options = ort.SessionOptions()
            options.intra_op_num_threads = threads
            # Spinning ORT workers would steal the CPU from the torch runner timed next to them.
            options.add_session_config_entry("session.intra_op.allow_spinning", "0")
            runners: dict[str, Callable[[np.ndarray], np.ndarray]] = {}

            def torch_run(x: np.ndarray, net: torch.nn.Module = model) -> np.ndarray:
                with torch.no_grad():
                    return net(torch.from_numpy(x)).numpy()

            runners["torch/fp32 (eager)"] = torch_run
            for label, path in files.items():
                session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
                runners[label] = _ort_runner(session)
            top1 = {
                label: float(
                    np.mean(
                        np.concatenate([run(test_x[i : i + 250]) for i in range(0, len(test_x), 250)]).argmax(
                            1
                        )
                        == test_y
                    )
                )
                for label, run in runners.items()
            }
            for batch in (1, 32):
                x = np.ascontiguousarray(test_x[:batch])
                for run in runners.values():
                    for _ in range(3):
                        run(x)
                times: dict[str, list[float]] = {label: [] for label in runners}
                for _ in range(args.rounds):
                    for label, run in runners.items():
                        start = time.perf_counter()
                        run(x)
                        times[label].append(time.perf_counter() - start)
                base = float(np.median(times["onnxruntime/fp32"]))
                eager = float(np.median(times["torch/fp32 (eager)"]))
                for label, samples in times.items():
                    p50 = float(np.median(samples))
                    gflops = flops * batch / p50 / 1e9
                    label_peak = peak * (INT8_OPS_PER_CYCLE // FP32_FLOPS_PER_CYCLE if "int8" in label else 1)
                    rows.append(
                        f"| {name} | {batch} | {label} | {p50 * 1e3:.2f} | {batch / p50:,.0f} | "
                        f"{gflops:.1f} ({gflops / label_peak:.0%}) | {eager / p50:.2f}x | "
                        f"{base / p50:.2f}x | {top1[label]:.2%} |"
                    )
    load_after = os.getloadavg()
    print(f"CPU: {cpu}; peak fp32 {peak:.0f} GFLOP/s = {how}")
    print(f"threads: {threads}; load average before/after: {load_before[0]:.1f} / {load_after[0]:.1f}")
    print(
        f"versions: torch {torch.__version__}, onnxruntime {ort.__version__}, "
        f"python {platform.python_version()}; "
        f"top-1 on {len(test_y)} CIFAR-10 test images ({args.test_images // 10} per class), "
        f"int8 calibrated on {args.calib_images} training images (minmax)"
    )
    print()
    print(
        "| model | batch | runner | p50 ms | images/s | GFLOP/s (of peak) | vs eager | vs ORT fp32 | top-1 |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
