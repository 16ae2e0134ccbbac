"""`reviewkd validate`, `reviewkd bench` and `reviewkd report`: prove a run's files and measure them.

validate RUN   accuracy of the torch student and every exported file on the run's validation split,
               parity against torch/fp32 (without torch: against the fp32 ONNX file) on the same
               images, and the gates per precision (exit 1 naming each failing gate); writes
               RUN/report/validate.json.
bench RUN      latency per format and batch size after a warm-up; writes RUN/report/bench.json.
report RUN     RUN/report/report.json, report.md, report.html and plots; prints the final table.

The work is benchmarks.runs'; this module parses, calls and prints.
"""

from __future__ import annotations

import argparse
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from benchmarks.detection import DEFAULT_BENCH_SECONDS as DETECTION_BENCH_SECONDS
from benchmarks.latency import (
    DEFAULT_SECONDS,
    DEFAULT_WARMUP,
    comparison_text,
    parse_batch_sizes,
    parse_compare,
)
from benchmarks.machine_state import field_text, is_unknown, state_lines, usage_text
from benchmarks.measured import source_text
from benchmarks.report import format_final_table, report_dir
from benchmarks.report.document import number_text
from benchmarks.runs import (
    DEFAULT_VALIDATE_BATCH,
    DEVICES,
    bench_run,
    parse_backends,
    report_run,
    validate_run,
)
from benchmarks.tasks import own_evaluation
from benchmarks.trt_breakdown import breakdown_text
from benchmarks.validate import raise_for_gates
from deploy import run_layout
from deploy.errors import UsageError
from deploy.gates import GATE_METRICS, GateTable, default_gates, parse_gate, set_gate
from deploy.tasks import require_deployable_run, run_task

# Dedicated gate flags: (flag, precision, gate name). --gate covers every other combination.
GATE_FLAGS: tuple[tuple[str, str, str], ...] = (
    ("--max-abs-diff-fp32", "fp32", "max_abs_diff"),
    ("--min-agreement-fp16", "fp16", "min_agreement"),
    ("--max-top1-drop-int8", "int8", "max_top1_drop"),
)


def gates_from_args(args: argparse.Namespace, base: GateTable | None = None) -> GateTable:
    """The default gates (`base`: a task's own table), changed by the dedicated flags, then by each
    --gate in order (all checked)."""
    gates = default_gates() if base is None else {precision: dict(g) for precision, g in base.items()}
    for flag, precision, name in GATE_FLAGS:
        value = getattr(args, flag.lstrip("-").replace("-", "_"))
        if value is not None:
            set_gate(gates, precision, name, value, flag)
    for spec in args.gate or ():
        set_gate(gates, *parse_gate(spec), f"--gate {spec!r}")
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
        help="auto (default): the GPU where one is found, else the CPU",
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
    validate.add_argument(
        "--data",
        type=Path,
        default=None,
        metavar="FOLDER",
        help="validate on these images (one sub-folder per class, named as the run's classes) instead"
        " of the run's validation split",
    )
    for flag, precision, name in GATE_FLAGS:
        validate.add_argument(
            flag, type=float, default=None, metavar="X", help=f"same as --gate {precision}:{name}=X"
        )
    validate.add_argument(
        "--fail-inconclusive",
        action="store_true",
        help="fail a top-1 drop gate whose 95%% interval straddles the budget (default: it passes, marked"
        " inconclusive with the images that would resolve it)",
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
        description="Time every format of a run after a warm-up that ends at a steady state:"
        " p50/p90/p99 (with bootstrap 95%% intervals), mean, std, CV and images/s per batch size,"
        " each measurement marked stable or noisy. CUDA events and CUDA graphs on a GPU where"
        " supported, a monotonic clock on the CPU. --compare A,B times two formats interleaved"
        " and states the ratio of their medians with a 95%% interval.",
    )
    _add_common(bench)
    bench.add_argument("--batch-sizes", default="1,8,32", help="comma-separated (default 1,8,32)")
    bench.add_argument(
        "--warmup",
        type=int,
        default=DEFAULT_WARMUP,
        help=f"the fewest untimed calls first; the warm-up goes on to a steady state (default"
        f" {DEFAULT_WARMUP}; 0: none)",
    )
    length = bench.add_mutually_exclusive_group()
    length.add_argument("--iters", type=int, default=None, help="timed calls per batch size")
    length.add_argument(
        "--seconds",
        type=float,
        default=None,
        help=f"timed seconds per batch size (default {DEFAULT_SECONDS:g}; each file of a detection run:"
        f" {DETECTION_BENCH_SECONDS:g})",
    )
    bench.add_argument("--no-cuda-graphs", action="store_true", help="never replay CUDA graphs")
    bench.add_argument(
        "--compare",
        metavar="A,B",
        default=None,
        help="time only formats A and B, interleaved in pairs (A B, B A, ...), at each batch size"
        " (--iters counts pairs, --seconds is both together); print and record the ratio of their"
        " medians with a 95%% interval and faster, slower or no difference (within 2%%)",
    )
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
        if acc.get("top1_drop_ci"):
            low, high = acc["top1_drop_ci"]
            text += f"  drop {acc['top1_drop']:.2f} (95% CI {low:.2f} to {high:.2f})"
        if entry["gates"]:
            text += "  gates " + ("pass" if all(g["passed"] for g in entry["gates"]) else "FAIL")
        lines.append(text)
        lines += [
            f"{'':<24} {check['reason']}"
            for check in entry["gates"]
            if check.get("verdict") == "inconclusive"
        ]
    return lines


def _merge_lines(result: Mapping[str, Any]) -> list[str]:
    """What saving the result kept from earlier measurements of the same kind, and what it dropped."""
    lines = []
    kept = result.get("kept_from_earlier") or []
    if kept:
        lines.append(f"kept from an earlier measurement of the same kind: {', '.join(kept)}")
    others = result.get("other_measurements") or []
    if others:
        lines.append(f"kept beside it: {len(others)} measurement(s) of other inputs or references")
    lines += [f"note: {line}" for line in result.get("discarded") or []]
    return lines


def _comparison_lines(result: Mapping[str, Any]) -> list[str]:
    """Each `bench --compare` pair measured: its ratio per batch size, and what in the machine's
    state undermined it."""
    lines = []
    for entry in (result.get("comparisons") or {}).values():
        if entry["status"] != "ok":
            lines.append(f"{entry['a']} vs {entry['b']}: {entry['status']}: {entry['reason']}")
        for batch in entry["batches"]:
            lines.append(comparison_text(entry, batch))
            flags = [*entry["batches"][batch].get("machine_flags", []), *entry.get("machine_flags", [])]
            lines += [f"  machine: {flag}" for flag in flags]
    return lines


def _refuse_unsupported(args: argparse.Namespace) -> None:
    """A task with its own evaluation runs every ONNX file with ONNX Runtime on the CPU: a request
    for certain backends or a GPU is refused rather than silently not honoured."""
    if args.backends is not None or args.device == "cuda":
        raise UsageError(
            f"{args.run}: this run's task is validated and benchmarked with ONNX Runtime on the CPU"
            " (every ONNX file); --backends and --device cuda are not available for it yet"
        )


def run_validate_command(args: argparse.Namespace) -> int:
    """Handler of `reviewkd validate`."""
    require_deployable_run(args.run, "validate")
    own = own_evaluation(args.run)
    if own is not None:
        _refuse_unsupported(args)
        spec = run_task(args.run)
        result = own.validate(
            args.run,
            threads=args.threads,
            batch_size=args.batch_size,
            limit=args.limit,
            gates=gates_from_args(args, spec.gates if spec is not None else None),
            inconclusive_passes=not args.fail_inconclusive,
        )
        print("\n".join(own.lines(result)))
        print(f"wrote {report_dir(args.run) / run_layout.VALIDATE_FILE}")
        own.raise_for_gates(result)
        print(f"validation passed on {result['images']} images")
        return 0
    gates = gates_from_args(args)
    result = validate_run(
        args.run,
        backends=parse_backends(args.backends),
        device=args.device,
        threads=args.threads,
        batch_size=args.batch_size,
        limit=args.limit,
        gates=gates,
        data=args.data,
        inconclusive_passes=not args.fail_inconclusive,
    )
    note = result.get("reference_note")
    print(f"reference: {result['reference']}" + (f" ({note})" if note else ""))
    print(f"images: {source_text(result)}")
    print("\n".join(_validate_lines(result)))
    for line in _merge_lines(result):
        print(line)
    print(f"wrote {report_dir(args.run) / run_layout.VALIDATE_FILE}")
    raise_for_gates(result)
    print(f"validation passed on {result['images']} images")
    return 0


def _with_interval(stats: Mapping[str, Any], name: str) -> str:
    """"1.234 ms [1.200-1.250]": a percentile and its bootstrap 95% interval."""
    low, high = stats[f"{name}_ci_ms"]
    return f"{stats[f'{name}_ms']:.3f} ms [{low:.3f}-{high:.3f}]"


def _energy_lines(entry: Mapping[str, Any]) -> list[str]:
    """Each measurement's energy per image, or once per format why it was not measured."""
    lines, unmeasured = [], set()
    for batch, stats in entry["latency"].items():
        energy = stats.get("energy")
        if is_unknown(energy):
            unmeasured.add(f"energy: {field_text(energy)}")
        elif energy:
            total = field_text(energy["total_mj_per_image"])
            lines.append(f"energy batch {batch}: {total} mJ/image above idle ({energy['total_of']})")
    return lines + sorted(unmeasured)


def run_bench_command(args: argparse.Namespace) -> int:
    """Handler of `reviewkd bench`."""
    require_deployable_run(args.run, "bench")
    own = own_evaluation(args.run)
    if own is not None:
        _refuse_unsupported(args)
        measured = own.bench(
            args.run,
            threads=args.threads,
            batch_sizes=parse_batch_sizes(args.batch_sizes),
            seconds=args.seconds,
            iters=args.iters,
            warmup=args.warmup,
            compare=None if args.compare is None else parse_compare(args.compare),
        )
        for key, entry in measured["results"].items():
            if entry["status"] != "ok":
                print(f"{key:<24} {entry['status']}: {entry['reason']}")
            for batch, stats in entry.get("latency", {}).items():
                parts = "  ".join(f"{name} {ms:.3f} ms" for name, ms in stats["parts_p50_ms"].items())
                print(f"{key:<24} batch {batch:>4}  p50 {_with_interval(stats, 'p50')}  ({parts})")
        for line in [*_comparison_lines(measured), *_merge_lines(measured)]:
            print(line)
        print(f"wrote {report_dir(args.run) / run_layout.BENCH_FILE}")
        return 0
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
        compare=None if args.compare is None else parse_compare(args.compare),
    )
    for key, entry in result["results"].items():
        if entry["status"] != "ok":
            print(f"{key:<24} {entry['status']}: {entry['reason']}")
        for batch, stats in entry["latency"].items():
            print(
                f"{key:<24} batch {batch:>4}  p50 {_with_interval(stats, 'p50')}"
                f"  p90 {_with_interval(stats, 'p90')}  p99 {_with_interval(stats, 'p99')}"
                f"  CV {number_text(stats.get('cv'), 3)}  n {stats['iters']}  warm-up {stats['warmup_iters']}"
                f"  {number_text(stats['throughput_ips'], 1)} images/s"
                f"  other load {usage_text(stats.get('cpu_usage') or {})}  {stats['verdict']}"
            )
            if stats.get("noisy_because"):
                print(f"{'':<24} noisy: {stats['noisy_because']}")
        for line in state_lines(entry["machine_state"]) if entry.get("machine_state") else ():
            print(f"{'':<24} {line}")
        for line in _energy_lines(entry):
            print(f"{'':<24} {line}")
        for batch, summary in (entry.get("trt_breakdown") or {}).items():
            print(f"{'':<24} TensorRT breakdown batch {batch}: {breakdown_text(summary)}")
    for line in [*_comparison_lines(result), *_merge_lines(result)]:
        print(line)
    print(f"wrote {report_dir(args.run) / run_layout.BENCH_FILE}")
    return 0


def run_report_command(args: argparse.Namespace) -> int:
    """Handler of `reviewkd report`: write the run's report and print its final table."""
    report = report_run(args.run)
    print(format_final_table(report))
    print(f"wrote {run_layout.run_path(args.run, run_layout.REPORT_HTML)}")
    return 0
