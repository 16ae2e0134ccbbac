"""The training engine: teacher training, distillation, evaluation, checkpoints and resume.

A run directory (DESIGN.md section 3) is written only by rank 0:

    config.yaml            the resolved config
    metrics.jsonl          one JSON object per completed epoch, epochs numbered from 1
    checkpoints/last.pt    everything needed to continue: student, head, optimizer, scheduler, scaler,
                           epoch, RNG states, the best student so far (loadable with weights_only=True)
    student.safetensors    the best student by validation top-1 (teacher runs: teacher.safetensors)
    manifest.json          classes, input, student, teacher, method, data, artifacts

Ordering makes a SIGKILL at any moment recoverable: an epoch's metrics line is appended first, then
last.pt replaced atomically, then the best weights and the manifest are re-derived from what last.pt
holds. On resume, metrics lines beyond last.pt's epoch are dropped and the weights re-derived, so every
epoch appears exactly once. Sample order and augmentation are functions of (seed, epoch), so on the
CPU a resumed run ends with the same weights as an uninterrupted one.

Accuracies (top1, top5) are percentages, 0-100, everywhere: metrics.jsonl and the manifest.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import random
import signal
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from deploy.errors import MissingDependencyError, ReviewKDError, UsageError
from deploy.fileio import atomic_output, sha256_file, write_text_atomic
from deploy.manifest import new_manifest, read_manifest, record_artifact, verify_artifact, write_manifest
from deploy.run_lock import locks_run
from reviewkd.config import Config, config_to_dict, diff_configs, load_run_config, save_config
from reviewkd.data import DataBundle, build_data
from reviewkd.distiller import Distiller, build_distiller
from reviewkd.models import create_model
from reviewkd.models.weights import describe_torch_load_error

CHECKPOINT_FORMAT = 1
STUDENT_FILE = "student.safetensors"
TEACHER_FILE = "teacher.safetensors"
TEACHER_SUBDIR = "teacher"
METRICS_FILE = "metrics.jsonl"
CHECKPOINT_FILE = Path("checkpoints") / "last.pt"
# Keys a resumed run may change: they alter neither the data nor the model, only how long or where.
RESUMABLE_CHANGES = (
    "train.epochs",
    "train.device",
    "train.amp",
    "train.compile",
    "train.threads",
    "train.channels_last",
    "train.fuse_teacher",
    "data.cache",
    "data.num_workers",
    "output",
)


class TrainingDivergedError(ReviewKDError):
    """The loss became NaN or infinite; the last checkpoint on disk is the last good state."""

    exit_code = 1


@dataclass
class Runtime:
    """Where this process trains: device, distributed rank and mixed precision."""

    device: torch.device
    rank: int = 0
    world_size: int = 1
    amp_dtype: torch.dtype | None = None
    channels_last: bool = False

    @property
    def is_main(self) -> bool:
        """Only rank 0 writes files and prints."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        """True under torchrun with more than one process."""
        return self.world_size > 1

    def autocast(self) -> contextlib.AbstractContextManager[Any]:
        """Autocast to the AMP dtype, or a no-op context."""
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.amp_dtype)


def setup_runtime(config: Config) -> Runtime:
    """Pick the device and AMP mode from config.train and join torchrun's process group if launched so.

    Raises:
        MissingDependencyError: train.device=cuda without a usable CUDA GPU.
        UsageError: train.amp=fp16 without CUDA.
    """
    tc = config.train
    if tc.threads:
        torch.set_num_threads(tc.threads)
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    cuda = torch.cuda.is_available()
    if tc.device == "cuda" and not cuda:
        raise MissingDependencyError(
            "train.device=cuda (--device cuda) but no CUDA GPU is usable here; "
            "use --device cpu, or install a CUDA build of torch on a machine with an NVIDIA GPU"
        )
    use_cuda = tc.device == "cuda" or (tc.device == "auto" and cuda)
    if use_cuda:
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    amp = tc.amp
    if amp == "auto":
        amp = "bf16" if use_cuda and torch.cuda.is_bf16_supported() else "none"
    if amp == "fp16" and not use_cuda:
        raise UsageError("config key train.amp: fp16 needs CUDA; use train.amp=bf16 or none on the CPU")
    amp_dtype = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}[amp]
    return Runtime(device, rank, world_size, amp_dtype, channels_last=tc.channels_last)


def teacher_training_config(config: Config) -> Config:
    """The config of the teacher's own run: cross-entropy training of teacher.arch.

    teacher.epochs and teacher.lr, where set, replace train.epochs and optim.lr.
    """
    derived = dataclasses.replace(
        config,
        student=dataclasses.replace(config.student, arch=config.teacher.arch, weights=None),
        method=dataclasses.replace(config.method, name="ce"),
        train=dataclasses.replace(config.train, epochs=config.teacher.epochs or config.train.epochs),
        optim=dataclasses.replace(config.optim, lr=config.teacher.lr or config.optim.lr),
    )
    return derived


def _method_params(config: Config) -> dict[str, Any]:
    """The hyper-parameters the configured method actually uses (for the manifest)."""
    m = config.method
    params: dict[str, Any] = {}
    if m.name == "ce":
        return params
    params["warmup_epochs"] = m.warmup_epochs
    if m.name in ("kd", "reviewkd+kd"):
        params.update(kd_weight=m.kd_weight, temperature=m.temperature)
    if m.name in ("reviewkd", "reviewkd+kd"):
        params.update(hcl_weight=m.hcl_weight, student_taps=m.student_taps, teacher_taps=m.teacher_taps)
    return params


# --------------------------------------------------------------------------------------------- evaluation


@torch.no_grad()
def evaluate(
    model: nn.Module, bundle: DataBundle, runtime: Runtime, batch_size: int = 256, split: str = "val"
) -> dict[str, float]:
    """Top-1 and top-5 (percent), mean cross-entropy and n of `model` on a split, in eval mode.

    Under DDP each rank scores its share and the counts are summed, so every rank gets the totals.
    """
    was_training = model.training
    model.eval()
    sums = torch.zeros(4, dtype=torch.float64, device=runtime.device)
    k = min(5, bundle.num_classes)
    for images, labels in bundle.eval_batches(split, batch_size, runtime.rank, runtime.world_size):
        x = _to_input(images, bundle, runtime)
        y = labels.to(runtime.device, non_blocking=True)
        with runtime.autocast():
            logits = model(x)
        logits = logits.float()
        topk = logits.topk(k, dim=1).indices
        sums[0] += (topk[:, 0] == y).sum()
        sums[1] += (topk == y[:, None]).any(dim=1).sum()
        sums[2] += torch.nn.functional.cross_entropy(logits, y, reduction="sum")
        sums[3] += y.numel()
    if runtime.distributed:
        dist.all_reduce(sums)
    model.train(was_training)
    n = max(sums[3].item(), 1.0)
    return {
        "top1": 100.0 * sums[0].item() / n,
        "top5": 100.0 * sums[1].item() / n,
        "loss": sums[2].item() / n,
        "n": int(sums[3].item()),
    }


def _to_input(images: torch.Tensor, bundle: DataBundle, runtime: Runtime) -> torch.Tensor:
    x = bundle.normalize(images.to(runtime.device, non_blocking=True))
    return x.contiguous(memory_format=torch.channels_last) if runtime.channels_last else x


# ------------------------------------------------------------------------------------------ optim / sched


def _make_optimizer(config: Config, params: list[nn.Parameter]) -> torch.optim.Optimizer:
    oc = config.optim
    if oc.name == "adamw":
        return torch.optim.AdamW(params, lr=oc.lr, weight_decay=oc.weight_decay)
    settings: dict[str, Any] = {
        "lr": oc.lr,
        "momentum": oc.momentum,
        "nesterov": oc.nesterov and oc.momentum > 0,
        "weight_decay": oc.weight_decay,
    }
    # The fused kernel is one pass over the parameters instead of several; torch versions or devices
    # without it reject fused=True when the optimizer is built, and then the plain loop is used.
    try:
        return torch.optim.SGD(params, fused=True, **settings)
    except (RuntimeError, TypeError, ValueError):
        return torch.optim.SGD(params, **settings)


def lr_factor(config: Config, step: int, steps_per_epoch: int) -> float:
    """The learning-rate multiplier at optimizer step `step` (0-based, counted over the whole run)."""
    sc = config.schedule
    if sc.name == "step":
        epoch = step // steps_per_epoch
        return float(sc.gamma ** sum(1 for m in sc.milestones if epoch >= m))
    total = max(1, config.train.epochs * steps_per_epoch)
    floor = sc.min_lr / config.optim.lr
    return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * min(step, total) / total))


def distill_scale(config: Config, step: int, steps_per_epoch: int) -> float:
    """The warm-up factor of the distillation terms: linear from 0 to 1 over method.warmup_epochs."""
    warmup_steps = config.method.warmup_epochs * steps_per_epoch
    return 1.0 if warmup_steps <= 0 else min(1.0, step / warmup_steps)


# ---------------------------------------------------------------------------------------------- state I/O


def _rng_state() -> dict[str, Any]:
    """RNG states as tensors and plain types, so that torch.load(weights_only=True) reads them."""
    name, keys, pos, has_gauss, cached = np.random.get_state(legacy=True)
    return {
        "python": random.getstate(),
        "numpy": [name, torch.from_numpy(np.asarray(keys, dtype=np.int64)), pos, has_gauss, cached],
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def _set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), *rest))
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])


def _cpu_state(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().clone() for k, v in module.state_dict().items()}


def save_weights(state: dict[str, torch.Tensor], path: Path, metadata: dict[str, str]) -> None:
    """Write a state_dict as safetensors, atomically."""
    from safetensors.torch import save_file

    with atomic_output(path) as tmp:
        save_file({k: v.contiguous() for k, v in state.items()}, str(tmp), metadata=metadata)


def load_checkpoint(path: Path) -> dict[str, Any]:
    """Read a last.pt with weights_only=True; a damaged file is a UsageError naming it."""
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for a damaged pickle or zip
        raise UsageError(f"{path}: cannot read the checkpoint ({describe_torch_load_error(exc)})") from exc
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        raise UsageError(f"{path}: not a reviewkd training checkpoint (format {CHECKPOINT_FORMAT})")
    return ckpt


def _append_metrics(path: Path, record: dict[str, Any]) -> None:
    with open(path, "a", encoding="utf-8") as handle:
        handle.write(json.dumps(record) + "\n")
        handle.flush()
        os.fsync(handle.fileno())


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """The complete JSON lines of metrics.jsonl (a line cut short by a kill is skipped)."""
    if not path.is_file():
        return []
    records = []
    for line in path.read_text(encoding="utf-8").splitlines():
        with contextlib.suppress(json.JSONDecodeError):
            record = json.loads(line)
            if isinstance(record, dict) and "epoch" in record:
                records.append(record)
    return records


def _truncate_metrics(path: Path, epochs_done: int) -> None:
    """Keep one line per epoch up to `epochs_done`: the state last.pt holds."""
    kept: dict[int, dict[str, Any]] = {}
    for record in read_metrics(path):
        if record["epoch"] <= epochs_done:
            kept[record["epoch"]] = record
    if path.exists() or kept:
        write_text_atomic(path, "".join(json.dumps(kept[e]) + "\n" for e in sorted(kept)))


# ------------------------------------------------------------------------------------------------- manifest


def _write_run_manifest(
    out_dir: Path,
    config: Config,
    bundle: DataBundle,
    role: str,
    teacher_record: dict[str, Any],
    best: dict[str, Any] | None,
) -> None:
    """(Re)write manifest.json from the config, the data and the best model in last.pt."""
    path = out_dir / "manifest.json"
    manifest = read_manifest(out_dir) if path.is_file() else new_manifest()
    manifest["classes"] = list(bundle.classes)
    manifest["input"] = bundle.manifest_input()
    manifest["data"] = bundle.manifest_data()
    weights_file = STUDENT_FILE if role == "student" else TEACHER_FILE
    record: dict[str, Any] = {"arch": config.student.arch, "num_classes": bundle.num_classes}
    if best is not None:
        entry = record_artifact(out_dir, manifest, weights_file, "weights", role=role)
        record.update(
            weights=weights_file,
            sha256=entry["sha256"],
            top1=best["top1"],
            top5=best["top5"],
            epoch=best["epoch"],
        )
    if role == "student":
        manifest["method"] = {"name": config.method.name, "params": _method_params(config)}
        manifest["teacher"] = teacher_record
        manifest["student"] = record
    else:
        manifest["method"] = {"name": "ce", "params": {}}
        manifest["teacher"] = record
    write_manifest(out_dir, manifest)


def _materialise_best(
    out_dir: Path,
    config: Config,
    bundle: DataBundle,
    role: str,
    teacher_record: dict[str, Any],
    best: dict[str, Any],
) -> None:
    weights_path = out_dir / (STUDENT_FILE if role == "student" else TEACHER_FILE)
    meta = {"arch": config.student.arch, "num_classes": str(bundle.num_classes), "role": role}
    save_weights(best["state"], weights_path, meta)
    _write_run_manifest(out_dir, config, bundle, role, teacher_record, best)


# ------------------------------------------------------------------------------------------------ training


class _SigintFlag:
    """Turns SIGINT into a flag the loop checks after each step (single process, main thread only)."""

    def __init__(self, enabled: bool) -> None:
        self.raised = False
        # signal.signal only works in the main thread; elsewhere Ctrl-C keeps its default behaviour.
        self._enabled = enabled and threading.current_thread() is threading.main_thread()
        self._previous: Any = None

    def __enter__(self) -> _SigintFlag:
        if self._enabled:
            self._previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def _handle(self, _signum: int, _frame: Any) -> None:
        if self.raised:  # a second Ctrl-C: stop without waiting for the step to finish
            raise KeyboardInterrupt
        self.raised = True

    def __exit__(self, *exc: object) -> None:
        if self._enabled:
            signal.signal(signal.SIGINT, self._previous)


def _progress(total: int, desc: str, enabled: bool) -> Any:
    from tqdm import tqdm

    return tqdm(
        total=total, desc=desc, leave=False, disable=not (enabled and sys.stderr.isatty()), dynamic_ncols=True
    )


def _log(runtime: Runtime, message: str) -> None:
    if runtime.is_main:
        print(message, flush=True)


def _check_resume_config(out_dir: Path, config: Config) -> None:
    saved_path = out_dir / "config.yaml"
    if not saved_path.is_file():
        return
    changed = diff_configs(load_run_config(out_dir), config, ignore=RESUMABLE_CHANGES)
    if changed:
        raise UsageError(
            f"{saved_path}: --resume with a different config ({', '.join(changed)} changed); "
            f"only {', '.join(RESUMABLE_CHANGES)} may change on resume"
        )


def fit(
    config: Config,
    out_dir: Path,
    *,
    role: str = "student",
    teacher: nn.Module | None = None,
    teacher_record: dict[str, Any] | None = None,
    resume: bool = False,
    runtime: Runtime | None = None,
    bundle: DataBundle | None = None,
) -> Path:
    """Train config.student.arch with config.method (against `teacher`) into `out_dir`.

    `role` "teacher" names the result teacher.safetensors and records it as the manifest's teacher.
    Returns the path of the best weights file.

    Raises:
        UsageError: an existing run without resume, an incompatible resume, bad data or models.
        TrainingDivergedError: a NaN or infinite loss (last.pt keeps the last completed epoch).
        KeyboardInterrupt: after SIGINT, once last.pt holds the state at the interrupted step.
    """
    runtime = runtime or setup_runtime(config)
    out_dir = Path(out_dir)
    ckpt_path = out_dir / CHECKPOINT_FILE
    metrics_path = out_dir / METRICS_FILE
    teacher_record = teacher_record or {"arch": None, "sha256": None, "top1": None, "top5": None}
    if ckpt_path.exists() and not resume:
        raise UsageError(
            f"{out_dir} already holds a training run ({CHECKPOINT_FILE}); pass --resume to continue it "
            "or choose another --out"
        )
    if resume:
        _check_resume_config(out_dir, config)
    bundle = bundle or build_data(config)
    tc = config.train

    # Same initial weights (student and ABF head) for a given seed on every rank.
    torch.manual_seed(tc.seed)
    random.seed(tc.seed)
    np.random.seed(tc.seed % (1 << 32))
    student = create_model(config.student.arch, bundle.num_classes, weights=config.student.weights)
    distiller = build_distiller(
        config.method.name,
        student,
        teacher,
        bundle.input_shape,
        hcl_weight=config.method.hcl_weight,
        kd_weight=config.method.kd_weight,
        temperature=config.method.temperature,
        student_taps=config.method.student_taps,
        teacher_taps=config.method.teacher_taps,
        fuse_teacher=config.train.fuse_teacher,
    )
    distiller.to(runtime.device)
    if runtime.channels_last:
        distiller.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
    params = [p for p in [*distiller.student.parameters(), *distiller.head.parameters()] if p.requires_grad]
    optimizer = _make_optimizer(config, params)
    steps_per_epoch = bundle.train_steps(tc.batch_size, runtime.world_size)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(config, s, steps_per_epoch))
    scaler = torch.amp.GradScaler("cuda", enabled=runtime.amp_dtype == torch.float16)

    start_epoch, start_step, aug_state = 0, 0, None
    accum: dict[str, Any] = {}
    best: dict[str, Any] | None = None
    if resume and ckpt_path.is_file():
        ckpt = load_checkpoint(ckpt_path)
        distiller.student.load_state_dict(ckpt["student"])
        distiller.head.load_state_dict(ckpt["head"])
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
        scaler.load_state_dict(ckpt["scaler"])
        _set_rng_state(ckpt["rng"])
        start_epoch, start_step, aug_state = ckpt["epoch"], ckpt["step"], ckpt["aug_state"]
        accum = dict(ckpt["accum"])
        best = ckpt["best"]
        _log(
            runtime,
            f"{role}: resuming {out_dir} after epoch {start_epoch}"
            + (f" step {start_step}" if start_step else ""),
        )

    if runtime.is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
        save_config(config, out_dir / "config.yaml")
        _truncate_metrics(metrics_path, start_epoch)
        if best is not None:
            _materialise_best(out_dir, config, bundle, role, teacher_record, best)
        else:
            _write_run_manifest(out_dir, config, bundle, role, teacher_record, None)

    model: nn.Module = distiller
    if runtime.distributed:
        model = nn.parallel.DistributedDataParallel(
            distiller, device_ids=[runtime.device.index] if runtime.device.type == "cuda" else None
        )
    if tc.compile:
        model = torch.compile(model)  # type: ignore[assignment]

    check_every = 1 if runtime.device.type == "cpu" else 25  # a host sync per check costs GPU speed
    with _SigintFlag(enabled=not runtime.distributed) as sigint:
        for epoch in range(start_epoch, tc.epochs):
            distiller.train()
            batches = bundle.train_batches(
                epoch, tc.seed, tc.batch_size, runtime.rank, runtime.world_size, start_step, aug_state
            )
            sums = {
                k: torch.tensor(v, dtype=torch.float64, device=runtime.device)
                for k, v in accum.get("sums", {}).items()
            }
            seen = int(accum.get("images", 0))
            elapsed = float(accum.get("seconds", 0.0))
            t0 = time.perf_counter()
            bar = _progress(len(batches), f"{role} {epoch + 1}/{tc.epochs}", runtime.is_main)
            step = start_step
            for step, (images, labels) in enumerate(batches, start=start_step):
                global_step = epoch * steps_per_epoch + step
                distiller.distill_scale = distill_scale(config, global_step, steps_per_epoch)
                x = _to_input(images, bundle, runtime)
                y = labels.to(runtime.device, non_blocking=True)
                with runtime.autocast():
                    out = model(x, y)
                loss = out["loss"].float()
                losses = {k: out[k].detach().float() for k in ("loss", "ce", "hcl", "kd") if k in out}
                if step % check_every == 0 or step == steps_per_epoch - 1:
                    _check_finite(losses, epoch, step, out_dir)
                optimizer.zero_grad(set_to_none=True)
                scaler.scale(loss).backward()
                scaler.step(optimizer)
                scaler.update()
                scheduler.step()
                n = y.numel()
                for k, v in losses.items():
                    sums[k] = sums.get(k, torch.zeros((), dtype=torch.float64, device=runtime.device)) + v * n
                correct = (out["logits"].detach().argmax(1) == y).sum()
                sums["correct"] = (
                    sums.get("correct", torch.zeros((), dtype=torch.float64, device=runtime.device)) + correct
                )
                seen += n
                bar.update(1)
                if sigint.raised:
                    elapsed += time.perf_counter() - t0
                    state = {
                        "sums": {k: v.item() for k, v in sums.items()},
                        "images": seen,
                        "seconds": elapsed,
                    }
                    if runtime.is_main:
                        _save_checkpoint(
                            ckpt_path,
                            distiller,
                            optimizer,
                            scheduler,
                            scaler,
                            config,
                            epoch,
                            step + 1,
                            batches.aug_state,
                            state,
                            best,
                        )
                    bar.close()
                    _log(
                        runtime,
                        f"{role}: interrupted; {ckpt_path} holds epoch {epoch + 1} step {step + 1}, "
                        "continue with --resume",
                    )
                    raise KeyboardInterrupt
            bar.close()
            elapsed += time.perf_counter() - t0
            if runtime.distributed:
                packed = torch.stack(
                    [sums[k] for k in sorted(sums)]
                    + [torch.tensor(float(seen), device=runtime.device, dtype=torch.float64)]
                )
                dist.all_reduce(packed)
                totals = dict(zip(sorted(sums), packed[:-1].tolist(), strict=True))
                seen_all = packed[-1].item()
            else:
                totals = {k: v.item() for k, v in sums.items()}
                seen_all = float(seen)
            if runtime.distributed:
                # Each rank's last forward updated its own BatchNorm statistics: take rank 0's, which
                # are the ones saved, so that validation scores the weights written to disk.
                for buffer in distiller.student.buffers():
                    dist.broadcast(buffer, 0)
            t_val = time.perf_counter()
            val = evaluate(distiller.student, bundle, runtime, batch_size=max(tc.batch_size, 256))
            val_seconds = time.perf_counter() - t_val
            denom = max(seen_all, 1.0)
            record: dict[str, Any] = {"epoch": epoch + 1}
            record.update({k: totals[k] / denom for k in ("loss", "ce", "hcl", "kd") if k in totals})
            record.update(
                train_top1=100.0 * totals.get("correct", 0.0) / denom,
                val_top1=val["top1"],
                val_top5=val["top5"],
                val_loss=val["loss"],
                lr=optimizer.param_groups[0]["lr"],
                distill_scale=distiller.distill_scale,
                images_per_s=seen_all / max(elapsed, 1e-9),
                epoch_time_s=elapsed,
                val_time_s=val_seconds,
                time=time.time(),
            )
            improved = best is None or val["top1"] > best["top1"]
            if improved:
                best = {
                    "top1": val["top1"],
                    "top5": val["top5"],
                    "epoch": epoch + 1,
                    "state": _cpu_state(distiller.student),
                }
            if runtime.is_main:
                _append_metrics(metrics_path, record)
                _save_checkpoint(
                    ckpt_path, distiller, optimizer, scheduler, scaler, config, epoch + 1, 0, None, {}, best
                )
                if improved:
                    assert best is not None
                    _materialise_best(out_dir, config, bundle, role, teacher_record, best)
            _log(
                runtime,
                f"{role} epoch {epoch + 1}/{tc.epochs}: loss {record['loss']:.4f} "
                f"val top1 {val['top1']:.2f}% top5 {val['top5']:.2f}% "
                f"({record['images_per_s']:.0f} img/s, {elapsed:.1f}s)",
            )
            start_step, aug_state, accum = 0, None, {}
    if runtime.distributed:
        dist.barrier()
    return out_dir / (STUDENT_FILE if role == "student" else TEACHER_FILE)


def _check_finite(losses: dict[str, torch.Tensor], epoch: int, step: int, out_dir: Path) -> None:
    if all(math.isfinite(v.item()) for v in losses.values()):
        return
    parts = ", ".join(f"{k}={v.item():.4g}" for k, v in losses.items())
    raise TrainingDivergedError(
        f"epoch {epoch + 1} step {step + 1}: the loss is not finite ({parts}); "
        f"{out_dir / CHECKPOINT_FILE} keeps the last completed epoch ({epoch}); "
        "lower optim.lr or the distillation weights"
    )


def _save_checkpoint(
    path: Path,
    distiller: Distiller,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    scaler: torch.amp.GradScaler,
    config: Config,
    epoch: int,
    step: int,
    aug_state: torch.Tensor | None,
    accum: dict[str, Any],
    best: dict[str, Any] | None,
) -> None:
    ckpt = {
        "format": CHECKPOINT_FORMAT,
        "epoch": epoch,
        "step": step,
        "aug_state": aug_state,
        "accum": accum,
        "student": _cpu_state(distiller.student),
        "head": _cpu_state(distiller.head),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "scaler": scaler.state_dict(),
        "rng": _rng_state(),
        "best": best,
        "config": config_to_dict(config),
    }
    with atomic_output(path) as tmp:
        torch.save(ckpt, tmp)


# ------------------------------------------------------------------------------------------------- stages


def _teacher_is_complete(out_dir: Path, config: Config) -> bool:
    """True when out_dir holds a finished teacher run of exactly this config, its weights verified."""
    ckpt_path = out_dir / CHECKPOINT_FILE
    if not (
        ckpt_path.is_file() and (out_dir / "config.yaml").is_file() and (out_dir / "manifest.json").is_file()
    ):
        return False
    if diff_configs(load_run_config(out_dir), config, ignore=RESUMABLE_CHANGES):
        return False
    try:
        verify_artifact(out_dir, read_manifest(out_dir), TEACHER_FILE)
    except UsageError:
        return False
    ckpt = load_checkpoint(ckpt_path)
    return bool(ckpt["epoch"] >= config.train.epochs and ckpt["step"] == 0)


@locks_run("teacher", run_arg="out_dir", create=True)
def train_teacher(
    config: Config,
    out_dir: str | os.PathLike[str],
    *,
    resume: bool = False,
    runtime: Runtime | None = None,
    bundle: DataBundle | None = None,
) -> Path:
    """Train config.teacher.arch with cross-entropy into out_dir; return out_dir/teacher.safetensors.

    teacher.epochs and teacher.lr replace train.epochs and optim.lr (teacher_training_config).
    A finished teacher run of the same config in out_dir is reused as it is.
    """
    out = Path(out_dir)
    derived = teacher_training_config(config)
    if _teacher_is_complete(out, derived):
        if runtime is None or runtime.is_main:
            print(f"teacher: reusing the finished run in {out}", flush=True)
        return out / TEACHER_FILE
    return fit(derived, out, role="teacher", resume=resume, runtime=runtime, bundle=bundle)


def load_teacher(
    config: Config, out_dir: Path, bundle: DataBundle, runtime: Runtime, *, resume: bool
) -> tuple[nn.Module, dict[str, Any]]:
    """The frozen teacher for a distillation run and its manifest record (arch, weights, sha256, top-1/5).

    Without teacher.weights a teacher is trained first into out_dir/teacher/. The teacher's validation
    accuracy is measured here, before distillation (or taken from the run's manifest when it already
    recorded the same weights).
    """
    if config.teacher.weights:
        weights = Path(config.teacher.weights)
        if not weights.is_file():
            raise UsageError(f"config key teacher.weights: {weights} does not exist")
    else:
        weights = train_teacher(
            config, out_dir / TEACHER_SUBDIR, resume=resume, runtime=runtime, bundle=bundle
        )
    digest = sha256_file(weights)
    teacher = create_model(config.teacher.arch, bundle.num_classes, weights=weights).to(runtime.device)
    teacher.eval()
    record: dict[str, Any] = {"arch": config.teacher.arch, "weights": str(weights), "sha256": digest}
    previous = read_manifest(out_dir).get("teacher", {}) if (out_dir / "manifest.json").is_file() else {}
    if previous.get("sha256") == digest and previous.get("top1") is not None:
        record.update(top1=previous["top1"], top5=previous["top5"])
    else:
        scores = evaluate(teacher, bundle, runtime, batch_size=max(config.train.batch_size, 256))
        record.update(top1=scores["top1"], top5=scores["top5"])
    _log(runtime, f"teacher {config.teacher.arch}: val top1 {record['top1']:.2f}% top5 {record['top5']:.2f}%")
    return teacher, record


@locks_run("distill", run_arg="out_dir", create=True)
def distill(config: Config, out_dir: str | os.PathLike[str], *, resume: bool = False) -> Path:
    """Distil config.student.arch from the teacher with config.method; return out_dir/student.safetensors.

    method "ce" trains the student alone (no teacher). Otherwise the teacher comes from teacher.weights,
    or is trained first into out_dir/teacher/ (reused when that run is already finished).
    """
    out = Path(out_dir)
    if (out / CHECKPOINT_FILE).exists() and not resume:
        raise UsageError(
            f"{out} already holds a training run ({CHECKPOINT_FILE}); pass --resume to continue it "
            "or choose another --out"
        )
    if resume:
        _check_resume_config(out, config)
    runtime = setup_runtime(config)
    bundle = build_data(config)
    teacher, record = None, None
    if config.method.name != "ce":
        teacher, record = load_teacher(config, out, bundle, runtime, resume=resume)
    return fit(
        config,
        out,
        role="student",
        teacher=teacher,
        teacher_record=record,
        resume=resume,
        runtime=runtime,
        bundle=bundle,
    )


def iter_metrics(run_dir: str | os.PathLike[str]) -> Iterator[dict[str, Any]]:
    """The per-epoch records of a run's metrics.jsonl, in order."""
    yield from read_metrics(Path(run_dir) / METRICS_FILE)
