"""The training stage on a CUDA GPU (issue 3): ReviewKD step speed and memory, then a digits run.

    .venv/bin/python -m benchmarks.scripts.gpu_train_check [--steps 300] [--warmup 30] [--out DIR]

Prepared for a lent GPU machine (no internet needed; any torch >= 2.4 with CUDA). Two parts:

1. A few hundred ReviewKD training steps of resnet32x4 -> resnet8x4 (CIFAR-100 shapes: 3x32x32,
   100 classes, hcl_weight 5.0 as in the paper) at batch 128, on synthetic GPU-resident batches,
   in four variants: fp32, fp32 + channels_last, bf16 autocast, bf16 autocast + channels_last.
   A step is what the engine runs: frozen teacher forward, student forward, the ABF review chain,
   HCL + cross-entropy, backward and an SGD (Nesterov) step. For each it records images/s over
   the timed steps (after warm-up, between CUDA synchronisations) and the peak memory
   (torch.cuda.max_memory_allocated, reset per variant).
2. `reviewkd distill` on the embedded digits config with --device cuda for two epochs (teacher
   trained for three epochs first), checking that the run directory is complete.

It prints the card's name, a Markdown table and writes DIR/gpu_train_check.json. Without a usable
CUDA GPU it says so and exits with 3 (the CLI's code for a missing GPU) before doing anything.

Like train_step_speed, this script times the training code itself, so it imports `reviewkd`;
nothing imports it.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from deploy.errors import MissingDependencyError
from deploy.fileio import write_json_atomic
from reviewkd.distiller import build_distiller
from reviewkd.models import create_model

REPO = Path(__file__).resolve().parents[1]
TEACHER, STUDENT = "resnet32x4", "resnet8x4"
NUM_CLASSES = 100
INPUT_SHAPE = (3, 32, 32)
HCL_WEIGHT = 5.0  # the paper's weight for this pair
# (label, autocast dtype name or None, channels_last)
VARIANTS: tuple[tuple[str, str | None, bool], ...] = (
    ("fp32", None, False),
    ("fp32 + channels_last", None, True),
    ("bf16 AMP", "bfloat16", False),
    ("bf16 AMP + channels_last", "bfloat16", True),
)
DIGITS_EPOCHS = 2
DIGITS_TEACHER_EPOCHS = 3


def require_cuda() -> None:
    """Raise MissingDependencyError unless a CUDA GPU is usable."""
    if not torch.cuda.is_available():
        built = torch.version.cuda or "none (a CPU-only build)"
        raise MissingDependencyError(
            f"no CUDA GPU is usable here (torch {torch.__version__}, CUDA build {built}); "
            "run this script on a machine with an NVIDIA GPU and a CUDA build of torch"
        )


@torch.no_grad()
def calibrate_batchnorm(model: nn.Module, batches: list[torch.Tensor]) -> nn.Module:
    """Set the BatchNorm running statistics of a randomly initialised model from `batches`.

    With its initial statistics (mean 0, var 1) an untrained teacher's activations grow stage by
    stage in eval mode, and HCL against them reaches the thousands; with statistics of the
    batches its features have the scale a trained teacher's have, so the steps timed here train
    as a real run would instead of risking overflow.
    """
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    momenta = [m.momentum for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # a cumulative average over the batches
    model.train()
    for x in batches:
        model(x)
    for m, momentum in zip(norms, momenta, strict=True):
        m.momentum = momentum
    return model.eval()


def time_variant(
    label: str,
    amp_dtype: str | None,
    channels_last: bool,
    steps: int,
    warmup: int,
    batch: int,
    device: torch.device | None = None,
) -> dict[str, Any]:
    """Train ReviewKD for `warmup` + `steps` steps on synthetic data; images/s and peak memory.

    `device` defaults to the current CUDA device; another device (the CPU) serves only to check
    the code path, and records no peak memory.
    """
    device = device or torch.device("cuda")
    cuda = device.type == "cuda"

    def synchronize() -> None:
        if cuda:
            torch.cuda.synchronize(device)

    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    # A small pool of GPU-resident batches: the step is timed, not host-to-device copies.
    gen = torch.Generator(device="cpu").manual_seed(0)
    pool = [
        (
            torch.randn((batch, *INPUT_SHAPE), generator=gen)
            .to(device)
            .contiguous(memory_format=memory_format),
            torch.randint(0, NUM_CLASSES, (batch,), generator=gen).to(device),
        )
        for _ in range(8)
    ]
    torch.manual_seed(0)
    teacher = calibrate_batchnorm(create_model(TEACHER, NUM_CLASSES).to(device), [x for x, _ in pool])
    student = create_model(STUDENT, NUM_CLASSES)
    distiller = build_distiller("reviewkd", student, teacher, INPUT_SHAPE, hcl_weight=HCL_WEIGHT).to(device)
    distiller.to(memory_format=memory_format)  # type: ignore[call-overload]
    distiller.train()
    params = [*distiller.student.parameters(), *distiller.head.parameters()]
    optimizer = torch.optim.SGD(params, lr=0.05, momentum=0.9, nesterov=True, weight_decay=5e-4)
    dtype = getattr(torch, amp_dtype) if amp_dtype else None
    autocast = (
        (lambda: torch.autocast(device_type=device.type, dtype=dtype))
        if dtype is not None
        else contextlib.nullcontext
    )

    def step(i: int) -> torch.Tensor:
        images, targets = pool[i % len(pool)]
        with autocast():
            out = distiller(images, targets)
        loss = out["loss"].float()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        return loss.detach()

    synchronize()
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    for i in range(warmup):
        step(i)
    synchronize()
    t0 = time.perf_counter()
    losses = [step(i) for i in range(steps)]
    synchronize()
    seconds = time.perf_counter() - t0
    finite = bool(torch.isfinite(torch.stack(losses)).all().item())
    result = {
        "variant": label,
        "amp": amp_dtype or "none",
        "channels_last": channels_last,
        "batch_size": batch,
        "steps": steps,
        "warmup_steps": warmup,
        "seconds": seconds,
        "images_per_s": steps * batch / seconds,
        "ms_per_step": 1000.0 * seconds / steps,
        "peak_memory_mib": torch.cuda.max_memory_allocated(device) / 2**20 if cuda else None,
        "first_loss": losses[0].item(),
        "last_loss": losses[-1].item(),
        "all_losses_finite": finite,
    }
    return result


def run_digits(out_dir: Path) -> dict[str, Any]:
    """`reviewkd distill` on digits with --device cuda; the run's metrics and manifest summary."""
    run_dir = out_dir / "digits"
    command = [
        sys.executable,
        "-m",
        "reviewkd.cli",
        "distill",
        "--out",
        str(run_dir),
        "--device",
        "cuda",
        "--epochs",
        str(DIGITS_EPOCHS),
        f"teacher.epochs={DIGITS_TEACHER_EPOCHS}",
    ]
    if (run_dir / "checkpoints" / "last.pt").is_file():
        command.append("--resume")
    print("$ " + " ".join(["reviewkd", *command[3:]]), flush=True)
    t0 = time.perf_counter()
    done = subprocess.run(command, cwd=REPO, check=False)
    seconds = time.perf_counter() - t0
    result: dict[str, Any] = {"command": command[3:], "exit_code": done.returncode, "seconds": seconds}
    if done.returncode != 0:
        return result
    metrics_path = run_dir / "metrics.jsonl"
    metrics = [json.loads(line) for line in metrics_path.read_text(encoding="utf-8").splitlines() if line]
    manifest = json.loads((run_dir / "manifest.json").read_text(encoding="utf-8"))
    expected = ["config.yaml", "manifest.json", "metrics.jsonl", "student.safetensors", "checkpoints/last.pt"]
    missing = [name for name in expected if not (run_dir / name).is_file()]
    result.update(
        epochs=[m["epoch"] for m in metrics],
        val_top1=[m["val_top1"] for m in metrics],
        images_per_s=[m["images_per_s"] for m in metrics],
        student_top1=manifest.get("student", {}).get("top1"),
        teacher_top1=manifest.get("teacher", {}).get("top1"),
        missing_files=missing,
        ok=not missing and [m["epoch"] for m in metrics] == list(range(1, DIGITS_EPOCHS + 1)),
    )
    return result


def render(results: list[dict[str, Any]]) -> str:
    """A Markdown table of the step timings."""
    rows = [
        "| variant | images/s | ms/step | peak memory (MiB) | loss first -> last |",
        "|---|---|---|---|---|",
    ]
    for r in results:
        rows.append(
            f"| {r['variant']} | {r['images_per_s']:,.0f} | {r['ms_per_step']:.2f} | "
            f"{r['peak_memory_mib']:,.0f} | {r['first_loss']:.3f} -> {r['last_loss']:.3f} |"
        )
    return "\n".join(rows)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--steps", type=int, default=300, help="timed steps per variant")
    parser.add_argument("--warmup", type=int, default=30, help="untimed steps per variant first")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument(
        "--out",
        type=Path,
        default=Path(os.environ.get("OUT", REPO / "runs" / "gpu_train_check")),
        help="folder for gpu_train_check.json and the digits run (default $OUT, else runs/gpu_train_check)",
    )
    parser.add_argument("--skip-digits", action="store_true", help="only the step timings")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Check for CUDA, time the variants, run digits on CUDA, print and write the results."""
    args = parse_args(argv)
    try:
        require_cuda()
    except MissingDependencyError as exc:
        print(f"gpu_train_check: {exc}", file=sys.stderr)
        return exc.exit_code
    # The engine's defaults on CUDA: cuDNN autotuning on; TF32 left as torch ships it.
    torch.backends.cudnn.benchmark = True
    props = torch.cuda.get_device_properties(0)
    card = torch.cuda.get_device_name(0)
    memory_gib = props.total_memory / 2**30
    print(
        f"GPU: {card} (compute capability {props.major}.{props.minor}, {memory_gib:.1f} GiB); "
        f"torch {torch.__version__}, CUDA {torch.version.cuda}, cuDNN {torch.backends.cudnn.version()}",
        flush=True,
    )
    print(f"ReviewKD {TEACHER} -> {STUDENT}, batch {args.batch_size}, {args.steps} timed steps", flush=True)
    timings = []
    for label, amp, channels_last in VARIANTS:
        result = time_variant(label, amp, channels_last, args.steps, args.warmup, args.batch_size)
        print(
            f"  {label}: {result['images_per_s']:,.0f} images/s, peak {result['peak_memory_mib']:,.0f} MiB",
            flush=True,
        )
        timings.append(result)
        torch.cuda.empty_cache()  # the variant's models are gone: start the next one from a clean pool
    table = render(timings)
    print(table, flush=True)
    digits = None if args.skip_digits else run_digits(args.out)
    if digits is not None:
        print(
            f"digits on CUDA: {json.dumps({k: v for k, v in digits.items() if k != 'command'})}", flush=True
        )
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / "gpu_train_check.json"
    write_json_atomic(
        path,
        {
            "gpu": {
                "name": card,
                "compute_capability": f"{props.major}.{props.minor}",
                "memory_gib": memory_gib,
            },
            "torch": torch.__version__,
            "cuda": torch.version.cuda,
            "cudnn": torch.backends.cudnn.version(),
            "cudnn_allow_tf32": torch.backends.cudnn.allow_tf32,
            "matmul_allow_tf32": torch.backends.cuda.matmul.allow_tf32,
            "python": platform.python_version(),
            "pair": {
                "teacher": TEACHER,
                "student": STUDENT,
                "num_classes": NUM_CLASSES,
                "hcl_weight": HCL_WEIGHT,
            },
            "timings": timings,
            "table_markdown": table,
            "digits": digits,
            "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        },
    )
    print(f"wrote {path}")
    return 0 if digits is None or digits.get("ok") else 1


if __name__ == "__main__":
    sys.exit(main())
