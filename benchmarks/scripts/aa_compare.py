"""How often does `reviewkd bench --compare` claim a difference between a file and itself?

    .venv/bin/python -m benchmarks.scripts.aa_compare RUN [--format onnxruntime/fp32] [--repeats 100]
        [--seconds 0.2] [--batch-size 1] [--out benchmarks/results/aa_compare.json]

An A/A check of the paired comparison (benchmarks.latency.compare_targets): each repetition opens
the run's file twice, as two formats A and B, warms both up, times them interleaved (A B, B A, ...) for
`--seconds` together and states the ratio of medians with its 95% interval. A repetition that says
`faster` or `slower` is a false difference; the goal is at most 5% of them. It also counts the
intervals that exclude a ratio of exactly 1, which the verdict ignores within
MIN_CLAIMED_DIFFERENCE (two sessions of one file differ slightly). Each repetition is
independent (fresh sessions), as separate `bench --compare` commands are. The script writes every
repetition's ratio, interval and verdict, the false-difference rate, the load average before and
after, and the machine (benchmarks.environment) to `--out`, and prints the summary.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any

from benchmarks.environment import collect_environment
from benchmarks.latency import compare_targets
from benchmarks.runs import run_targets
from benchmarks.stability import MIN_CLAIMED_DIFFERENCE
from deploy.errors import UsageError
from deploy.fileio import write_json_atomic

# The goal: an A/A comparison claims a difference in at most this share of repetitions.
FALSE_DIFFERENCE_GOAL = 0.05


def _load_average() -> list[float]:
    return [round(value, 2) for value in os.getloadavg()]


def run_aa(
    run: Path, key: str, repeats: int, seconds: float, batch_size: int, threads: int
) -> dict[str, Any]:
    """`repeats` A/A comparisons of format `key` of `run` against itself; returns the record."""
    targets = {target.key: target for target in run_targets(run, device="cpu", threads=threads)}
    if key not in targets:
        raise UsageError(f"--format {key}: not a format of {run}; it has {', '.join(targets)}")
    load_before = _load_average()
    repetitions = []
    for _ in range(repeats):
        entry = compare_targets(targets[key], targets[key], (batch_size,), seconds=seconds)
        if entry["status"] != "ok":
            raise RuntimeError(f"comparison {entry['status']}: {entry['reason']}")
        paired = entry["batches"][str(batch_size)]
        kept = ("pairs", "time_ratio", "time_ratio_ci", "verdict")
        repetitions.append({name: paired[name] for name in kept})
    false = sum(r["verdict"] != "no difference" for r in repetitions)
    # Without the smallest claimed difference: how many intervals exclude a ratio of exactly 1.
    excluding_one = sum(r["time_ratio_ci"][1] < 1 or r["time_ratio_ci"][0] > 1 for r in repetitions)
    ratios = sorted(r["time_ratio"] for r in repetitions)
    return {
        "format": key,
        "batch_size": batch_size,
        "repeats": repeats,
        "seconds_each": seconds,
        "threads": threads,
        "false_differences": false,
        "false_difference_rate": false / repeats,
        "intervals_excluding_1": excluding_one,
        "min_claimed_difference": MIN_CLAIMED_DIFFERENCE,
        "goal": FALSE_DIFFERENCE_GOAL,
        "met": false / repeats <= FALSE_DIFFERENCE_GOAL,
        "ratio_min_median_max": [ratios[0], ratios[len(ratios) // 2], ratios[-1]],
        "median_pairs": sorted(r["pairs"] for r in repetitions)[repeats // 2],
        "load_average_before": load_before,
        "load_average_after": _load_average(),
        "environment": collect_environment(threads),
        "repetitions": repetitions,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path, help="a run directory with exported files")
    parser.add_argument("--format", default="onnxruntime/fp32", help="the format compared with itself")
    parser.add_argument("--repeats", type=int, default=100)
    parser.add_argument("--seconds", type=float, default=0.2, help="timed seconds of each comparison")
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--threads", type=int, default=1, help="ONNX Runtime intra-op threads")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/aa_compare.json"))
    args = parser.parse_args(argv)
    if args.repeats < 1:
        parser.error("--repeats must be >= 1")
    record = run_aa(args.run, args.format, args.repeats, args.seconds, args.batch_size, args.threads)
    write_json_atomic(args.out, record)
    low, middle, high = record["ratio_min_median_max"]
    print(
        f"{record['format']} batch {record['batch_size']} against itself, {record['repeats']} repetitions of"
        f" {record['seconds_each']:g} s: {record['false_differences']} claimed a difference"
        f" ({record['false_difference_rate']:.0%}; goal <= {FALSE_DIFFERENCE_GOAL:.0%}: "
        f"{'met' if record['met'] else 'NOT met'}); {record['intervals_excluding_1']} intervals exclude 1;"
        f" ratios {low:.3f} / {middle:.3f} / {high:.3f} (min/median/max); load average"
        f" {record['load_average_before']} -> {record['load_average_after']}"
    )
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
