"""Time one ReviewKD training step: our implementation next to the official code's way (issue 2).

A step is: teacher forward (no gradients), student forward and backward, the ABF review chain,
HCL, cross-entropy and an SGD step. Both implementations train the same models (identical
initial weights) on the same batch on the same CPU. Each repetition runs every contender once,
in an order that rotates between repetitions, so load from other processes hits all of them
alike; medians and inter-quartile ranges are reported, and ratios are only meaningful within
one run.

The "official" contender is benchmarks/scripts/reference_reviewkd.py (the official code's ABF,
`hcl` and review chain), run at fp32 in the default (NCHW) memory format, the teacher under
torch.no_grad, with a plain SGD optimizer.

Unlike the other benchmarks (which import only `deploy`) this script times the training code
itself, so it imports `reviewkd`.

    .venv/bin/python -m benchmarks.scripts.train_step_speed --steps 30 --markdown benchmarks/RESULTS.md
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import os
import statistics
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from tabulate import tabulate
from torch import nn

from benchmarks.environment import cpu_model, library_versions
from benchmarks.scripts.reference_reviewkd import OfficialDistillation
from deploy.fileio import write_json_atomic, write_text_atomic
from reviewkd.distiller import ReviewKD
from reviewkd.models import create_model

SECTION_TITLE = "## ReviewKD training step speed (issue 2)"
RESULTS_TITLE = "# Benchmark results"
BATCH = 32
NUM_CLASSES = 10
HCL_WEIGHT = 1.0
GOAL_RATIO = 0.85
NOTES = """\
Rows: `official` is the reference-style step (`benchmarks/scripts/reference_reviewkd.py`, run
as the module docstring of `benchmarks/scripts/train_step_speed.py` says); `ours` is our step
with the options the training engine passes (`channels_last`: models, ABF and inputs in
torch.channels_last; `fuse_teacher`: `ReviewKD(..., fuse_teacher=True)`, BatchNorm folded into
the teacher's convolutions;
`fused_sgd`: `torch.optim.SGD(..., fused=True)`); `ours-bf16` adds
`torch.autocast("cpu", dtype=torch.bfloat16)`; the other rows switch on one option at a time
(`ours-plain`: none). Every row shares the core changes of issue 2: the ABF computes the residual's
half of its attention 1x1 conv at the residual's own resolution instead of concatenating, and HCL
pools the difference s - t once. "paired ratio" is the median over repetitions of ours/official
for steps run back to back; "CPU" columns are process CPU time, which the other users of the
machine disturb less than wall time. `--threads 1` keeps one intra-op thread: with 2 threads on 2
busy shared cores, a preempted OpenMP thread stalls every parallel region and step times
scattered 5x."""


@dataclass(frozen=True)
class Pair:
    """A teacher -> student pair at one input shape."""

    name: str
    teacher: str
    student: str
    input_shape: tuple[int, int, int]


PAIRS: dict[str, Pair] = {
    "resnet34->resnet18": Pair(
        "resnet34->resnet18", "torchvision:resnet34", "torchvision:resnet18", (3, 64, 64)
    ),
    "cifar_resnet56->cifar_resnet20": Pair(
        "cifar_resnet56->cifar_resnet20", "cifar_resnet56", "cifar_resnet20", (3, 32, 32)
    ),
}


@dataclass(frozen=True)
class Options:
    """How our step runs: the settings a training engine passes in."""

    channels_last: bool = False
    fuse_teacher: bool = False
    foreach: bool = False
    fused_sgd: bool = False
    bf16: bool = False

    def label(self) -> str:
        """A short description for tables."""
        on = [name for name, value in asdict(self).items() if value]
        return "+".join(on) if on else "defaults"


# -------------------------------------------------------------------------------------- contenders


def _sgd(params: list[nn.Parameter], foreach: bool = False, fused: bool = False) -> torch.optim.SGD:
    # The paper's CIFAR recipe; foreach=None is torch's default (the per-tensor loop on the CPU).
    return torch.optim.SGD(
        params,
        lr=0.01,
        momentum=0.9,
        nesterov=True,
        weight_decay=5e-4,
        foreach=True if foreach else None,
        fused=True if fused else None,
    )


def official_step(
    pair: Pair, teacher: nn.Module, student: nn.Module
) -> Callable[[torch.Tensor, torch.Tensor], float]:
    """Build the reference-style training step; returns step(images, targets) -> loss."""
    reference = OfficialDistillation(student, teacher, pair.input_shape, HCL_WEIGHT)
    model = reference.model.train()
    optimizer = _sgd(list(model.parameters()))

    def step(images: torch.Tensor, targets: torch.Tensor) -> float:
        loss = reference.loss(images, targets)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        return float(loss.detach())

    return step


def ours_step(
    pair: Pair, teacher: nn.Module, student: nn.Module, options: Options
) -> Callable[[torch.Tensor, torch.Tensor], float]:
    """Build our training step with `options`, as the training engine runs it."""
    distiller = ReviewKD(
        student,
        teacher,
        input_shape=pair.input_shape,
        hcl_weight=HCL_WEIGHT,
        fuse_teacher=options.fuse_teacher,
    )
    if options.channels_last:
        distiller.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
    distiller.train()
    optimizer = _sgd(
        list(distiller.student.parameters()) + list(distiller.head.parameters()),
        options.foreach,
        options.fused_sgd,
    )
    autocast = (
        (lambda: torch.autocast("cpu", dtype=torch.bfloat16)) if options.bf16 else contextlib.nullcontext
    )

    def step(images: torch.Tensor, targets: torch.Tensor) -> float:
        if options.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        with autocast():
            out = distiller(images, targets)
        optimizer.zero_grad(set_to_none=True)
        out["loss"].float().backward()
        optimizer.step()
        return float(out["loss"].detach())

    return step


# -------------------------------------------------------------------------------------------- timing


def _quartiles(values: Sequence[float]) -> tuple[float, float, float]:
    q1, q2, q3 = statistics.quantiles(values, n=4, method="inclusive")
    return q1, q2, q3


def time_pair(
    pair: Pair, contenders: dict[str, Options | None], steps: int, warmup: int, seed: int = 0
) -> dict[str, Any]:
    """Time every contender (None = official style) on `pair`, interleaved; return per-contender stats."""
    torch.manual_seed(seed)
    teacher = create_model(pair.teacher, NUM_CLASSES).eval()
    student = create_model(pair.student, NUM_CLASSES)
    generator = torch.Generator().manual_seed(seed)
    images = torch.randn(BATCH, *pair.input_shape, generator=generator)
    targets = torch.randint(0, NUM_CLASSES, (BATCH,), generator=generator)
    runners: dict[str, Callable[[torch.Tensor, torch.Tensor], float]] = {}
    for name, options in contenders.items():
        # Each contender trains its own copy from the same initial weights.
        t, s = copy.deepcopy(teacher), copy.deepcopy(student)
        torch.manual_seed(seed + 1)  # same ABF initialisation everywhere
        runners[name] = official_step(pair, t, s) if options is None else ours_step(pair, t, s, options)
    wall: dict[str, list[float]] = {name: [] for name in runners}
    cpu: dict[str, list[float]] = {name: [] for name in runners}
    names = list(runners)
    for rep in range(warmup + steps):
        shift = rep % len(names)
        for name in names[shift:] + names[:shift]:
            start, start_cpu = time.perf_counter(), time.process_time()
            loss = runners[name](images, targets)
            elapsed, elapsed_cpu = time.perf_counter() - start, time.process_time() - start_cpu
            if not torch.isfinite(torch.tensor(loss)):
                raise RuntimeError(f"{pair.name}/{name}: loss {loss}")
            if rep >= warmup:
                wall[name].append(elapsed * 1e3)
                cpu[name].append(elapsed_cpu * 1e3)
    stats: dict[str, Any] = {}
    for name in names:
        q1, median, q3 = _quartiles(wall[name])
        cpu_q1, cpu_median, cpu_q3 = _quartiles(cpu[name])
        stats[name] = {
            "options": None if contenders[name] is None else asdict(contenders[name]),  # type: ignore[arg-type]
            "median_ms": median,
            "q1_ms": q1,
            "q3_ms": q3,
            "iqr_ms": q3 - q1,
            "images_per_s": BATCH / median * 1e3,
            "cpu_median_ms": cpu_median,
            "cpu_iqr_ms": cpu_q3 - cpu_q1,
            "ratio_to_official": median / statistics.median(wall["official"]),
            "cpu_ratio_to_official": cpu_median / statistics.median(cpu["official"]),
            # Ratio of steps run back to back: robust to load that drifts over the run.
            "paired_ratio_median": statistics.median(
                a / b for a, b in zip(wall[name], wall["official"], strict=True)
            ),
            "steps_ms": wall[name],
            "steps_cpu_ms": cpu[name],
        }
    return stats


def contenders_for(ablation: bool) -> dict[str, Options | None]:
    """The official-style step, ours as the engine runs it (fp32 and bf16), and optionally ablations."""
    engine = Options(channels_last=True, fuse_teacher=True, fused_sgd=True)
    contenders: dict[str, Options | None] = {"official": None, "ours": engine}
    if ablation:
        contenders["ours-plain"] = Options()
        contenders["ours-channels_last"] = Options(channels_last=True)
        contenders["ours-fuse_teacher"] = Options(fuse_teacher=True)
        contenders["ours-foreach"] = Options(foreach=True)
        contenders["ours-fused_sgd"] = Options(fused_sgd=True)
    contenders["ours-bf16"] = Options(**{**asdict(engine), "bf16": True})
    return contenders


# ------------------------------------------------------------------------------------------- reports


def environment() -> dict[str, Any]:
    """The machine and versions the numbers were measured with."""
    return {
        "cpu": cpu_model(),
        "logical_cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "avx512_bf16": "avx512_bf16" in Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace")
        if Path("/proc/cpuinfo").is_file()
        else None,
        "versions": {k: v for k, v in library_versions(("torch", "torchvision")).items()},
        "python": sys.version.split()[0],
    }


def table(results: dict[str, Any]) -> str:
    """A Markdown table: one row per pair and contender."""
    header = (
        "pair", "step", "options", "median ms/step", "IQR ms", "images/s", "ours / official (medians)",
        "paired ratio", "CPU ms/step", "CPU-time ratio",
    )  # fmt: skip
    rows = []
    for pair_name, stats in results["pairs"].items():
        for name, s in stats.items():
            options = (
                "reference (fp32, NCHW, no_grad)" if s["options"] is None else Options(**s["options"]).label()
            )
            rows.append(
                (
                    pair_name,
                    name,
                    options,
                    f"{s['median_ms']:.1f}",
                    f"{s['iqr_ms']:.1f}",
                    f"{s['images_per_s']:.1f}",
                    f"{s['ratio_to_official']:.3f}",
                    f"{s['paired_ratio_median']:.3f}",
                    f"{s['cpu_median_ms']:.1f}",
                    f"{s['cpu_ratio_to_official']:.3f}",
                )
            )
    align = ("left", "left", "left", *("right" for _ in header[3:]))
    return tabulate(rows, header, tablefmt="pipe", colalign=align, disable_numparse=True)


def markdown_section(results: dict[str, Any]) -> str:
    """Our section of benchmarks/RESULTS.md."""
    env = results["environment"]
    versions = ", ".join(f"{k} {v}" for k, v in env["versions"].items())
    parts = [
        SECTION_TITLE,
        "",
        f"One ReviewKD training step (teacher forward, student forward + backward, ABF chain, HCL, "
        f"SGD step), batch {BATCH}, {NUM_CLASSES} classes; {results['steps']} timed steps per contender "
        f"after {results['warmup']} warm-up steps, interleaved in rotating order. Goal: ours <= "
        f"{GOAL_RATIO} x official at fp32.",
        "",
        table(results),
        "",
        f"- Machine: {env['cpu']}, {env['logical_cpus']} logical CPUs, torch threads "
        f"{env['torch_threads']}, avx512_bf16: {env['avx512_bf16']}; {versions}, Python {env['python']}.",
        f"- Command: `{results['command']}`",
        "- The CPU's 2 cores were shared with other work while this ran: absolute times are noisy; "
        "quote ratios only between rows of the same run.",
    ]
    parts += ["", NOTES]
    return "\n".join(parts) + "\n"


def update_results_md(path: Path, section: str) -> None:
    """Replace (or append) our section of `path`, leaving every other section as it was."""
    text = path.read_text(encoding="utf-8") if path.is_file() else RESULTS_TITLE + "\n"
    start = text.find(SECTION_TITLE)
    if start < 0:
        text = text.rstrip("\n") + "\n\n" + section
    else:
        end = text.find("\n## ", start + len(SECTION_TITLE))
        tail = "" if end < 0 else text[end + 1 :]
        text = text[:start] + section + ("\n" + tail if tail else "")
    write_text_atomic(path, text)


@contextlib.contextmanager
def _threads(count: int | None) -> Iterator[None]:
    previous = torch.get_num_threads()
    if count:
        torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark; print the table, write JSON and optionally our RESULTS.md section."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", nargs="+", choices=sorted(PAIRS), default=list(PAIRS))
    parser.add_argument("--steps", type=int, default=30, help="timed steps per contender")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps per contender first")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--ablation", action="store_true", help="also time each engine option alone")
    parser.add_argument("--json", type=Path, default=Path("benchmarks/results/train_step_speed.json"))
    parser.add_argument("--markdown", type=Path, default=None, help="update our section of this file")
    args = parser.parse_args(argv)
    if args.steps < 4:
        parser.error("--steps must be at least 4 (quartiles)")

    with _threads(args.threads):
        results: dict[str, Any] = {
            "command": " ".join(
                [".venv/bin/python -m benchmarks.scripts.train_step_speed", *(argv or sys.argv[1:])]
            ),
            "batch": BATCH,
            "steps": args.steps,
            "warmup": args.warmup,
            "environment": environment(),
            "pairs": {},
        }
        for name in args.pairs:
            print(f"timing {name} ...", file=sys.stderr, flush=True)
            results["pairs"][name] = time_pair(
                PAIRS[name], contenders_for(args.ablation), args.steps, args.warmup
            )
    print(table(results))
    args.json.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(args.json, results)
    if args.markdown is not None:
        update_results_md(args.markdown, markdown_section(results))
    print(json.dumps({"json": str(args.json), "markdown": str(args.markdown)}), file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
