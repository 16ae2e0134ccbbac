"""`reviewkd validate`, `reviewkd bench` and `reviewkd report`: prove a run's files and measure them.

validate RUN   accuracy of the torch student and every exported file on the run's validation split,
               parity against torch/fp32 on the same images, and the gates per precision (exit 1
               naming each failing gate); writes RUN/report/validate.json.
bench RUN      latency per format and batch size after a warm-up; writes RUN/report/bench.json.
report RUN     RUN/report/report.json, report.md, report.html and plots; prints the final table.

The `reviewkd run` pipeline calls `validate_run`, `bench_run` and `report_run` directly, then
`benchmarks.validate.raise_for_gates` and `benchmarks.report.format_final_table`.
"""

from __future__ import annotations

import argparse
import functools
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.environment import collect_environment
from benchmarks.latency import (
    DEFAULT_BATCH_SIZES,
    DEFAULT_SECONDS,
    DEFAULT_WARMUP,
    benchmark_runners,
    parse_batch_sizes,
)
from benchmarks.report import (
    BENCH_FILE,
    VALIDATE_FILE,
    format_final_table,
    report_dir,
    save_result,
    write_report,
)
from benchmarks.targets import Target, artifact_formats
from benchmarks.validate import (
    GATE_METRICS,
    REFERENCE_KEY,
    Gates,
    apply_gate,
    default_gates,
    parse_gate,
    raise_for_gates,
    validate_runners,
)
from deploy.errors import MissingDependencyError, UsageError
from deploy.manifest import Manifest, read_manifest, verify_artifact
from deploy.run_lock import locks_run
from deploy.runners.base import Runner

PathLike = str | os.PathLike[str]
DEVICES = ("auto", "cpu", "cuda")
DEFAULT_VALIDATE_BATCH = 64
WEIGHTS_FILE = "student.safetensors"
# Dedicated gate flags: (flag, precision, gate name). --gate covers every other combination.
GATE_FLAGS: tuple[tuple[str, str, str], ...] = (
    ("--max-abs-diff-fp32", "fp32", "max_abs_diff"),
    ("--min-agreement-fp16", "fp16", "min_agreement"),
    ("--max-top1-drop-int8", "int8", "max_top1_drop"),
)


# ----------------------------------------------------------------------------- formats of a run


def resolve_device(device: str) -> str:
    """Return "cpu" or "cuda" for a --device value; "cuda" without a GPU is MissingDependencyError."""
    if device not in DEVICES:
        raise UsageError(f"--device {device!r}: expected one of {', '.join(DEVICES)}")
    import torch

    has_gpu = bool(torch.cuda.is_available())
    if device == "cuda" and not has_gpu:
        raise MissingDependencyError(
            f"--device cuda: torch {torch.__version__} sees no CUDA GPU; run on a machine with an NVIDIA GPU"
            " and a CUDA build of torch, or use --device cpu"
        )
    if device == "auto":
        return "cuda" if has_gpu else "cpu"
    return device


def _onnxruntime_device(device: str, explicit: bool) -> str:
    """ONNX Runtime's device: under --device auto, the GPU only where onnxruntime-gpu is installed."""
    if device == "cpu" or explicit:
        return device
    from deploy.runners import GPU_PROVIDERS, available_providers

    return "cuda" if any(p in GPU_PROVIDERS for p in available_providers()) else "cpu"


def _torch_opener(run: Path, manifest: Manifest, precision: str, device: str) -> Runner:
    if precision == "fp16" and device != "cuda":
        raise MissingDependencyError("torch fp16 runs on a CUDA GPU; none is in use here (device cpu)")
    from deploy.runners.torch_runner import TorchRunner
    from reviewkd.models import create_model

    if WEIGHTS_FILE in manifest.get("artifacts", {}):
        weights = verify_artifact(run, manifest, WEIGHTS_FILE)
    else:
        weights = run / WEIGHTS_FILE
    if not weights.is_file():
        raise UsageError(f"{weights}: no student weights; run `reviewkd distill` first")
    student = manifest.get("student", {})
    if not student.get("arch"):
        raise UsageError(f"{run / 'manifest.json'}: no student architecture recorded")
    shape = manifest.get("input", {}).get("shape")
    if not shape or len(shape) != 3:
        raise UsageError(f"{run / 'manifest.json'}: no input shape (C, H, W) recorded")
    num_classes = student.get("num_classes") or len(manifest.get("classes", []))
    if device == "cuda" and precision == "fp32":
        import torch

        # cuDNN convolutions default to TF32 on Ampere and newer, which is not the fp32 reference
        # the 1e-4 parity gate compares against.
        torch.backends.cudnn.allow_tf32 = False
        torch.backends.cuda.matmul.allow_tf32 = False
    model = create_model(student["arch"], int(num_classes), weights=weights)
    return TorchRunner(
        model, (int(shape[0]), int(shape[1]), int(shape[2])), device=device, precision=precision
    )


def _file_opener(run: Path, manifest: Manifest, relpath: str, device: str, threads: int | None) -> Runner:
    from deploy.runners import open_runner

    return open_runner(relpath, manifest=manifest, run_dir=run, device=device, threads=threads)


def _selected(key: str, backends: Sequence[str] | None) -> bool:
    return backends is None or any(key == b or key.split("/", 1)[0] == b for b in backends)


def run_targets(
    run_dir: PathLike,
    *,
    device: str = "auto",
    threads: int | None = None,
    backends: Sequence[str] | None = None,
    with_reference: bool = False,
) -> list[Target]:
    """Return the formats of a run: torch/fp32 and torch/fp16 (the student), then each model file.

    backends: keep only these keys ("onnxruntime/int8") or backends ("onnxruntime"); None keeps
        all. `with_reference` keeps torch/fp32 whatever the filter (validation compares with it).
    Files whose input is not float NCHW (export's uint8-input variant) are left out (see
    `benchmarks.targets.artifact_formats`). Nothing is opened here; each target's
    opener verifies its file's sha256 against the manifest when called.
    """
    run = Path(run_dir)
    manifest = read_manifest(run)
    resolved = resolve_device(device)
    ort_device = _onnxruntime_device(resolved, explicit=device != "auto")
    weights = manifest.get("artifacts", {}).get(WEIGHTS_FILE, {})
    weights_size = weights.get("size_bytes")
    if weights_size is None and (run / WEIGHTS_FILE).is_file():
        weights_size = (run / WEIGHTS_FILE).stat().st_size
    targets: list[Target] = []
    for precision in ("fp32", "fp16"):
        key = f"torch/{precision}"
        if _selected(key, backends) or (with_reference and key == REFERENCE_KEY):
            targets.append(
                Target(
                    key,
                    precision,
                    functools.partial(_torch_opener, run, manifest, precision, resolved),
                    file=WEIGHTS_FILE,
                    size_bytes=weights_size,
                    sha256=weights.get("sha256"),
                )
            )
    for key, (relpath, entry) in artifact_formats(manifest).items():
        if not _selected(key, backends):
            continue
        backend_device = ort_device if key.startswith("onnxruntime/") else resolved
        targets.append(
            Target(
                key,
                str(entry.get("precision") or "fp32"),
                functools.partial(_file_opener, run, manifest, relpath, backend_device, threads),
                file=relpath,
                size_bytes=entry.get("size_bytes"),
                sha256=entry.get("sha256"),
            )
        )
    if backends is not None:
        known = ["torch/fp32", "torch/fp16", *artifact_formats(manifest)]
        unknown = [b for b in backends if not any(_selected(k, [b]) for k in known)]
        if unknown:
            raise UsageError(f"--backends {','.join(unknown)}: not in this run; it has {', '.join(known)}")
    return targets


def parse_backends(text: str | None) -> list[str] | None:
    """Parse --backends "onnxruntime,torch/fp32" into a list; None or "all" keeps every format."""
    if text is None or text.strip() in ("", "all"):
        return None
    return [part.strip() for part in text.split(",") if part.strip()]


def _apply_threads(threads: int | None) -> None:
    if threads is None:
        return
    if threads < 1:
        raise UsageError(f"--threads must be >= 1, got {threads}")
    import torch

    # The torch student runs in this process: its intra-op pool gets the same budget as ONNX Runtime.
    torch.set_num_threads(threads)


# ----------------------------------------------------------------------------- the stages


@locks_run("validate")
def validate_run(
    run_dir: PathLike,
    *,
    backends: Sequence[str] | None = None,
    device: str = "auto",
    threads: int | None = None,
    batch_size: int = DEFAULT_VALIDATE_BATCH,
    limit: int | None = None,
    gates: Gates | None = None,
    batches: Iterable[tuple[np.ndarray, np.ndarray]] | None = None,
) -> dict[str, Any]:
    """Validate every format of a run and save RUN/report/validate.json; return its content.

    batches: the validation images; None reads the run's validation split with its evaluation
    preprocessing (reviewkd.data.iter_run_batches). Does not raise on a failed gate: the caller
    decides (`benchmarks.validate.raise_for_gates(result)`).
    """
    _apply_threads(threads)
    targets = run_targets(run_dir, device=device, threads=threads, backends=backends, with_reference=True)
    if batches is None:
        from reviewkd.data import iter_run_batches

        batches = iter_run_batches(run_dir, "val", batch_size, limit)
    result = validate_runners(targets, batches, reference=REFERENCE_KEY, gates=gates)
    result["settings"] = {"device": device, "threads": threads, "batch_size": batch_size, "limit": limit}
    result["environment"] = collect_environment(threads)
    save_result(run_dir, VALIDATE_FILE, result)
    return result


@locks_run("bench")
def bench_run(
    run_dir: PathLike,
    *,
    backends: Sequence[str] | None = None,
    device: str = "auto",
    threads: int | None = None,
    batch_sizes: Sequence[int] = DEFAULT_BATCH_SIZES,
    warmup: int = DEFAULT_WARMUP,
    iters: int | None = None,
    seconds: float | None = None,
    cuda_graphs: bool = True,
) -> dict[str, Any]:
    """Time every format of a run and save RUN/report/bench.json; return its content."""
    _apply_threads(threads)
    targets = run_targets(run_dir, device=device, threads=threads, backends=backends)
    result = benchmark_runners(
        targets,
        batch_sizes=batch_sizes,
        warmup=warmup,
        iters=iters,
        seconds=seconds,
        threads=threads,
        cuda_graphs=cuda_graphs,
    )
    result["settings"]["device"] = device
    save_result(run_dir, BENCH_FILE, result)
    return result


@locks_run("report")
def report_run(run_dir: PathLike) -> dict[str, Any]:
    """Write RUN/report/report.json, report.md, report.html and the plots; return the report."""
    return write_report(run_dir)


# ----------------------------------------------------------------------------- command line


def gates_from_args(args: argparse.Namespace) -> Gates:
    """The default gates, changed by the dedicated flags, then by each --gate in order."""
    gates = default_gates()
    for flag, precision, name in GATE_FLAGS:
        value = getattr(args, flag.lstrip("-").replace("-", "_"))
        if value is not None:
            apply_gate(gates, precision, name, value)
    for spec in args.gate or ():
        apply_gate(gates, *parse_gate(spec))
    return gates


def _add_common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run", type=Path, metavar="RUN", help="run directory")
    parser.add_argument(
        "--backends",
        default=None,
        metavar="LIST",
        help="comma-separated formats (onnxruntime/int8) or backends (onnxruntime, tensorrt, torch);"
        " default all",
    )
    parser.add_argument(
        "--device",
        choices=DEVICES,
        default="auto",
        help="auto (default): the GPU where torch sees one, else the CPU",
    )
    parser.add_argument(
        "--threads", type=int, default=None, help="intra-op threads for torch and ONNX Runtime"
    )


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add the validate, bench and report subcommands."""
    validate = subparsers.add_parser(
        "validate",
        help="accuracy, parity against torch/fp32 and gates for every format of a run",
        description="Measure top-1/top-5 of the torch student and every exported file on the run's"
        " validation split, their parity with torch/fp32 on the same images, and check the gates"
        " (defaults: fp32 max|diff| <= 1e-4 and 100% top-1 agreement; fp16 agreement >= 99%;"
        " int8 top-1 at most 1 point under torch/fp32). Exit 1 names every failing gate.",
    )
    _add_common(validate)
    validate.add_argument("--batch-size", type=int, default=DEFAULT_VALIDATE_BATCH, help="default 64")
    validate.add_argument("--limit", type=int, default=None, help="validate on at most this many images")
    for flag, precision, name in GATE_FLAGS:
        validate.add_argument(
            flag, type=float, default=None, metavar="X", help=f"same as --gate {precision}:{name}=X"
        )
    validate.add_argument(
        "--gate",
        action="append",
        metavar="PRECISION:NAME=VALUE",
        help=f"set a gate (VALUE 'off' removes it); NAME is one of {', '.join(GATE_METRICS)};"
        " a flavour such as int8-trt falls back to its family's gates. Repeatable.",
    )
    validate.set_defaults(handler=run_validate_command)

    bench = subparsers.add_parser(
        "bench",
        help="latency and throughput per format and batch size",
        description="Time every format of a run after a warm-up: p50/p90/p99/mean/std latency and"
        " images/s per batch size. CUDA events and CUDA graphs on a GPU where supported, a monotonic"
        " clock on the CPU.",
    )
    _add_common(bench)
    bench.add_argument("--batch-sizes", default="1,8,32", help="comma-separated (default 1,8,32)")
    bench.add_argument(
        "--warmup", type=int, default=DEFAULT_WARMUP, help=f"untimed calls first (default {DEFAULT_WARMUP})"
    )
    length = bench.add_mutually_exclusive_group()
    length.add_argument("--iters", type=int, default=None, help="timed calls per batch size")
    length.add_argument(
        "--seconds",
        type=float,
        default=None,
        help=f"timed seconds per batch size (default {DEFAULT_SECONDS:g})",
    )
    bench.add_argument("--no-cuda-graphs", action="store_true", help="never replay CUDA graphs")
    bench.set_defaults(handler=run_bench_command)

    report = subparsers.add_parser(
        "report",
        help="write report.json, report.md and report.html with plots; print the final table",
        description="Gather RUN/report/validate.json, bench.json, the manifest and metrics.jsonl into"
        " RUN/report/report.{json,md,html} and PNG plots. What was not measured is said so.",
    )
    report.add_argument("run", type=Path, metavar="RUN", help="run directory")
    report.set_defaults(handler=run_report_command)


def _validate_lines(result: Mapping[str, Any]) -> list[str]:
    lines = []
    for key, entry in result["results"].items():
        if entry["status"] != "ok":
            lines.append(f"{key:<24} {entry['status']}: {entry['reason']}")
            continue
        acc = entry["accuracy"]
        text = f"{key:<24} ok  top-1 {acc['top1']:.2f}%  top-5 {acc['top5']:.2f}%  n={acc['n']}"
        parity = entry.get("parity")
        if parity:
            text += f"  max|diff| {parity['max_abs_diff']:.3g}  agreement {parity['top1_agreement']:.2f}%"
        if entry["gates"]:
            text += "  gates " + ("pass" if all(g["passed"] for g in entry["gates"]) else "FAIL")
        lines.append(text)
    return lines


def run_validate_command(args: argparse.Namespace) -> int:
    """Handler of `reviewkd validate`."""
    if args.batch_size < 1:
        raise UsageError(f"--batch-size must be >= 1, got {args.batch_size}")
    result = validate_run(
        args.run,
        backends=parse_backends(args.backends),
        device=args.device,
        threads=args.threads,
        batch_size=args.batch_size,
        limit=args.limit,
        gates=gates_from_args(args),
    )
    print("\n".join(_validate_lines(result)))
    print(f"wrote {report_dir(args.run) / VALIDATE_FILE}")
    raise_for_gates(result)
    print(f"validation passed on {result['images']} images")
    return 0


def run_bench_command(args: argparse.Namespace) -> int:
    """Handler of `reviewkd bench`."""
    result = bench_run(
        args.run,
        backends=parse_backends(args.backends),
        device=args.device,
        threads=args.threads,
        batch_sizes=parse_batch_sizes(args.batch_sizes),
        warmup=args.warmup,
        iters=args.iters,
        seconds=args.seconds,
        cuda_graphs=not args.no_cuda_graphs,
    )
    for key, entry in result["results"].items():
        if entry["status"] != "ok":
            print(f"{key:<24} {entry['status']}: {entry['reason']}")
        for batch, stats in entry["latency"].items():
            print(
                f"{key:<24} batch {batch:>4}  p50 {stats['p50_ms']:.3f} ms  p90 {stats['p90_ms']:.3f} ms"
                f"  p99 {stats['p99_ms']:.3f} ms  {stats['throughput_ips']:.1f} images/s"
            )
    print(f"wrote {report_dir(args.run) / BENCH_FILE}")
    return 0


def run_report_command(args: argparse.Namespace) -> int:
    """Handler of `reviewkd report`."""
    report = report_run(args.run)
    print(format_final_table(report))
    print(f"wrote {report_dir(args.run) / 'report.html'}")
    return 0
