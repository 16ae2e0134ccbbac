"""Post-training int8 per calibration method, with paired 95% intervals on a whole test split.

    nice -n 10 .venv/bin/python -m benchmarks.scripts.int8_calibration --model cifar_resnet56 \
        --weights ../shared/weights/cifar10-resnet/resnet56-4bfd9763.th --data ../shared/data/cifar10 \
        --out benchmarks/results/int8_cifar_resnet56.json

For a zoo model trained elsewhere it lays out a run with the export stage's own `export_model`
(fp32 only), then, for both int8 flavours and every calibration method: quantizes on the first
512 shuffled training images, scores the file on the next 1,000 (what `--calib-method auto`
chooses by, with export's own rule, export.calibration.best_method), and runs it on every
validation image twice: as deployed (deploy's session options: ONNX Runtime's fused int8 kernels,
except for files marked to run unfused, as the TensorRT flavour is) and with its Q/DQ semantics
(Q/DQ fusion off). Each top-1 drop
against the fp32 file comes with its paired 95% interval (deploy.paired_stats). Last, the speed of
the fp32 and cpu-flavour int8 files at batch 32, one thread, timed alternately.

This script drives the export stage, so unlike the rest of benchmarks/ it imports export and
reviewkd; nothing imports it.
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from deploy.optional import optional_import
from deploy.paired_stats import compare_predictions, describe_drop
from deploy.runners.onnxruntime_runner import CPU_PROVIDER, open_session
from export.check import run_onnx
from export.pipeline import FP32_FILE, export_model


def _session(path: Path, mode: str, threads: int | None = None) -> Any:
    """A CPU session running `path` as it deploys ("deployed": deploy's options for the file, which
    turn Q/DQ fusion off where the file asks) or with its Q/DQ semantics ("qdq": fusion always off)."""
    session, _ = open_session(path, [CPU_PROVIDER], threads=threads, unfused=True if mode == "qdq" else None)
    return session


def _predict(path: Path, batches: list[np.ndarray], mode: str) -> np.ndarray:
    session = _session(path, mode)
    return np.concatenate([session.run(None, {"images": b})[0].argmax(1) for b in batches])


def _speed(paths: dict[str, Path], batch: np.ndarray, rounds: int) -> dict[str, float]:
    """Median ms per batch of each file, one thread, the files timed call by call in turn."""
    sessions = {name: _session(path, "deployed", threads=1) for name, path in paths.items()}
    times: dict[str, list[float]] = {name: [] for name in paths}
    for _ in range(3):
        for session in sessions.values():
            session.run(None, {"images": batch})
    for _ in range(rounds):
        for name, session in sessions.items():
            start = time.perf_counter()
            session.run(None, {"images": batch})
            times[name].append(1000 * (time.perf_counter() - start))
    return {name: float(np.median(t)) for name, t in times.items()}


def main() -> None:
    """Measure and write the JSON; print a Markdown table."""
    with optional_import("the int8 calibration measurement"):
        import onnxruntime as ort
        import torch

        from export.calibration import best_method, score, split_training_images
        from export.precision import CALIBRATION_METHODS, INT8_FLAVOURS, Int8Quantizer
        from reviewkd.data import DATA_SEED, iter_run_batches

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--weights", required=True, type=Path)
    parser.add_argument("--data", required=True, type=Path)
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--calib-samples", type=int, default=512)
    parser.add_argument("--held-out", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--out", required=True, type=Path)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="reviewkd-int8-") as tmp_name:
        tmp = Path(tmp_name)
        run = tmp / "run"
        export_model(
            args.model,
            args.weights,
            (3, args.size, args.size),
            run,
            data_dir=args.data,
            formats=["onnx"],
            check_samples=256,
        )
        fp32 = run / FP32_FILE
        pairs = list(iter_run_batches(run, "val", 500))
        val = [p[0] for p in pairs]
        labels = np.concatenate([p[1] for p in pairs])
        fp32_pred = _predict(fp32, val, "deployed")
        data = split_training_images(
            iter_run_batches(run, "train", 256, args.calib_samples + args.held_out),
            args.calib_samples,
            args.held_out,
            seed=DATA_SEED,
        )
        held_reference = run_onnx(fp32, data.held_out)
        rows: list[dict[str, Any]] = []
        for flavour in INT8_FLAVOURS:
            for method in CALIBRATION_METHODS:
                path = tmp / f"{flavour}.{method}.onnx"
                started = time.perf_counter()
                with Int8Quantizer(fp32, data.calibration, flavour=flavour, method=method) as quantizer:
                    quantizer.write(path)
                seconds = time.perf_counter() - started
                held = score(path, held_reference, data.held_out, method)
                row: dict[str, Any] = {
                    "flavour": flavour,
                    "method": method,
                    "quantize_seconds": round(seconds, 1),
                    "held_out": held.as_dict(),
                }
                row["held_out_score"] = held
                for mode in ("deployed", "qdq"):
                    comparison = compare_predictions(labels, fp32_pred, _predict(path, val, mode))
                    row[mode] = {**comparison.as_dict(), "text": describe_drop(comparison)}
                rows.append(row)
                deployed, qdq = row["deployed"]["text"], row["qdq"]["text"]
                print(f"{flavour} {method}: {deployed} (Q/DQ: {qdq})", flush=True)
        for flavour in INT8_FLAVOURS:
            candidates = [r for r in rows if r["flavour"] == flavour]
            chosen = best_method([r.pop("held_out_score") for r in candidates])
            next(r for r in candidates if r["method"] == chosen.method)["auto_choice"] = True
        auto_cpu = next(r for r in rows if r["flavour"] == "cpu" and r.get("auto_choice"))
        speed = _speed(
            {"fp32": fp32, "int8": tmp / f"cpu.{auto_cpu['method']}.onnx"},
            np.concatenate(val)[:32],
            args.rounds,
        )
    result = {
        "model": args.model,
        "weights": str(args.weights),
        "test_images": len(labels),
        "fp32_top1": float(np.mean(fp32_pred == labels)),
        "calibration": {"images": args.calib_samples, "held_out": args.held_out, "seed": DATA_SEED},
        "rows": rows,
        "batch32_ms_one_thread": speed,
        "int8_speedup_batch32": speed["fp32"] / speed["int8"],
        "machine": {
            "cpu": platform.processor() or platform.machine(),
            "python": platform.python_version(),
            "torch": torch.__version__,
            "onnxruntime": ort.__version__,
        },
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"\nfp32 top-1 {100 * result['fp32_top1']:.2f}% on {len(labels)} images")
    print("| flavour | calibration | top-1 % | drop vs fp32 (95% CI), deployed | Q/DQ semantics | auto |")
    print("|---|---|---|---|---|---|")
    for row in rows:
        low, high = 100 * row["deployed"]["drop_low"], 100 * row["deployed"]["drop_high"]
        print(
            f"| {row['flavour']} | {row['method']} | {100 * row['deployed']['candidate_top1']:.2f}"
            f" | {100 * row['deployed']['drop']:.2f} ({low:.2f} to {high:.2f})"
            f" | {100 * row['qdq']['drop']:.2f} | {'yes' if row.get('auto_choice') else ''} |"
        )
    print(f"batch 32, one thread: {speed}; int8 {result['int8_speedup_batch32']:.2f}x fp32")


if __name__ == "__main__":
    main()
