"""Time one ReviewKD training step: our implementation next to the official code's way (issue 2).

A step is: teacher forward (no gradients), student forward and backward, the ABF review chain,
HCL, cross-entropy and an SGD step. Both implementations train the same models (identical
initial weights) on the same batch on the same CPU. Each repetition runs every contender once,
in an order that rotates between repetitions, so load from other processes hits all of them
alike; medians and inter-quartile ranges are reported, and ratios are only meaningful within
one run.

The "official" contender follows github.com/dvlab-research/ReviewKD: its ABF interpolates the
residual at every fusing level, its `hcl` pools student and teacher maps separately at every
pyramid level, fp32, the default (NCHW) memory format, the teacher under torch.no_grad, and a
plain SGD optimizer. Our models have no `is_feat` switch, so its features come from forward
hooks, as ours do.

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
import torch.nn.functional as F
from torch import nn

from benchmarks.environment import cpu_model, library_versions
from deploy.fileio import write_json_atomic, write_text_atomic
from reviewkd.distiller import ReviewKD
from reviewkd.models import create_model
from reviewkd.taps import default_taps

SECTION_TITLE = "## ReviewKD training step speed (issue 2)"
RESULTS_TITLE = "# Benchmark results"
BATCH = 32
NUM_CLASSES = 10
HCL_WEIGHT = 1.0
GOAL_RATIO = 0.85
NOTES = """\
Rows: `official` is the reference-style step (see the module docstring of
`benchmarks/scripts/train_step_speed.py`); `ours` is our step with the options the training engine passes
(`channels_last`: models, ABF and inputs in torch.channels_last; `fuse_teacher`:
`ReviewKD(..., fuse_teacher=True)`, BatchNorm folded into the teacher's convolutions;
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


# ---------------------------------------------------------------------------------- official style


class OfficialABF(nn.Module):
    """ABF as the reference code writes it: square shapes, the residual interpolated every time."""

    def __init__(self, in_channel: int, mid_channel: int, out_channel: int, fuse: bool) -> None:
        super().__init__()
        project = nn.Conv2d(in_channel, mid_channel, kernel_size=1, bias=False)
        expand = nn.Conv2d(mid_channel, out_channel, kernel_size=3, stride=1, padding=1, bias=False)
        self.conv1 = nn.Sequential(project, nn.BatchNorm2d(mid_channel))
        self.conv2 = nn.Sequential(expand, nn.BatchNorm2d(out_channel))
        self.att_conv = (
            nn.Sequential(nn.Conv2d(mid_channel * 2, 2, kernel_size=1), nn.Sigmoid()) if fuse else None
        )
        nn.init.kaiming_uniform_(project.weight, a=1)
        nn.init.kaiming_uniform_(expand.weight, a=1)

    def forward(
        self, x: torch.Tensor, y: torch.Tensor | None = None, shape: int = 0, out_shape: int = 0
    ) -> tuple[torch.Tensor, torch.Tensor]:
        n, _, h, w = x.shape
        x = self.conv1(x)
        if self.att_conv is not None:
            assert y is not None
            y = F.interpolate(y, (shape, shape), mode="nearest")
            z = self.att_conv(torch.cat([x, y], dim=1))
            x = x * z[:, 0].view(n, 1, h, w) + y * z[:, 1].view(n, 1, h, w)
        if x.shape[-1] != out_shape:
            x = F.interpolate(x, (out_shape, out_shape), mode="nearest")
        return self.conv2(x), x


def official_hcl(fstudent: Sequence[torch.Tensor], fteacher: Sequence[torch.Tensor]) -> torch.Tensor:
    """The reference `hcl`: each pyramid level pools the student and the teacher map separately."""
    loss_all = torch.zeros(())
    for fs, ft in zip(fstudent, fteacher, strict=True):
        h = fs.shape[2]
        loss = F.mse_loss(fs, ft, reduction="mean")
        cnt, tot = 1.0, 1.0
        for level in (4, 2, 1):
            if level >= h:
                continue
            tmpfs = F.adaptive_avg_pool2d(fs, (level, level))
            tmpft = F.adaptive_avg_pool2d(ft, (level, level))
            cnt /= 2.0
            loss = loss + F.mse_loss(tmpfs, tmpft, reduction="mean") * cnt
            tot += cnt
        loss_all = loss_all + loss / tot
    return loss_all


class HookedFeatures:
    """Logits plus the outputs of `taps`, recorded by forward hooks (the stand-in for is_feat)."""

    def __init__(self, model: nn.Module, taps: Sequence[str]) -> None:
        self.model = model
        self.taps = list(taps)
        self.features: dict[str, torch.Tensor] = {}
        modules = dict(model.named_modules())
        for tap in self.taps:
            modules[tap].register_forward_hook(self._hook(tap))

    def _hook(self, tap: str) -> Callable[..., None]:
        def hook(_module: nn.Module, _inputs: Any, output: torch.Tensor) -> None:
            self.features[tap] = output

        return hook

    def __call__(self, x: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
        logits = self.model(x)
        feats = [self.features[tap] for tap in self.taps]
        feats = [f.view(f.shape[0], f.shape[1], 1, 1) if f.dim() == 2 else f for f in feats]
        return feats, logits


class OfficialReviewKD(nn.Module):
    """The reference ReviewKD wrapper: student features reversed, the ABF chain deepest first."""

    def __init__(
        self,
        student: nn.Module,
        taps: Sequence[str],
        in_channels: Sequence[int],
        out_channels: Sequence[int],
        shapes: Sequence[int],
        out_shapes: Sequence[int],
        mid_channel: int,
    ) -> None:
        super().__init__()
        self.student = student
        self.hooked = HookedFeatures(student, taps)
        self.shapes = list(shapes)[::-1]
        self.out_shapes = list(out_shapes)[::-1]
        abfs = nn.ModuleList(
            OfficialABF(c, mid_channel, out_channels[i], i < len(in_channels) - 1)
            for i, c in enumerate(in_channels)
        )
        self.abfs = abfs[::-1]

    def forward(self, x: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
        feats, logit = self.hooked(x)
        feats = feats[::-1]
        results = []
        out_features, res_features = self.abfs[0](feats[0], out_shape=self.out_shapes[0])
        results.append(out_features)
        for features, abf, shape, out_shape in zip(
            feats[1:], self.abfs[1:], self.shapes[1:], self.out_shapes[1:], strict=True
        ):
            out_features, res_features = abf(features, res_features, shape, out_shape)
            results.insert(0, out_features)
        return results, logit


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
    taps_s = default_taps(student, pair.input_shape)
    taps_t = default_taps(teacher, pair.input_shape)
    hooked_teacher = HookedFeatures(teacher.eval().requires_grad_(False), taps_t)
    probe = torch.zeros(2, *pair.input_shape)
    with torch.no_grad():
        t_feats, _ = hooked_teacher(probe)
        student.eval()
        s_feats, _ = HookedFeatures(copy.deepcopy(student), taps_s)(probe)
    model = OfficialReviewKD(
        student,
        taps_s,
        in_channels=[f.shape[1] for f in s_feats],
        out_channels=[f.shape[1] for f in t_feats],
        shapes=[f.shape[-1] for f in s_feats],
        out_shapes=[f.shape[-1] for f in t_feats],
        mid_channel=min(512, s_feats[-1].shape[1]),
    ).train()
    optimizer = _sgd(list(model.parameters()))

    def step(images: torch.Tensor, targets: torch.Tensor) -> float:
        with torch.no_grad():
            teacher_feats, _ = hooked_teacher(images)
        results, logit = model(images)
        loss = F.cross_entropy(logit, targets) + HCL_WEIGHT * official_hcl(results, teacher_feats)
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
    lines = [
        "| pair | step | options | median ms/step | IQR ms | images/s | ours / official (medians) "
        "| paired ratio | CPU ms/step | CPU-time ratio |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for pair_name, stats in results["pairs"].items():
        for name, s in stats.items():
            options = (
                "reference (fp32, NCHW, no_grad)" if s["options"] is None else Options(**s["options"]).label()
            )
            lines.append(
                f"| {pair_name} | {name} | {options} | {s['median_ms']:.1f} | {s['iqr_ms']:.1f} | "
                f"{s['images_per_s']:.1f} | {s['ratio_to_official']:.3f} | {s['paired_ratio_median']:.3f} | "
                f"{s['cpu_median_ms']:.1f} | {s['cpu_ratio_to_official']:.3f} |"
            )
    return "\n".join(lines)


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
