"""The training engine: teacher training, distillation, evaluation, checkpoints and resume.

A run directory (docs/METHOD.md section 5) is written only by rank 0:

    config.yaml            the resolved config
    metrics.jsonl          one JSON object per completed epoch, epochs numbered from 1
    checkpoints/last.pt    a TrainState (reviewkd.checkpoint): everything needed to continue
    student.safetensors    the best student by validation top-1 (teacher runs: teacher.safetensors);
                           with train.ema_decay, the moving average of its weights (reviewkd/ema.py)
    manifest.json          classes, input, student, teacher, method, data, artifacts

Ordering makes a SIGKILL at any moment recoverable: an epoch's metrics line is appended first, then
last.pt replaced atomically, then the best weights and the manifest are re-derived from what last.pt
holds. On resume, metrics lines beyond last.pt's epoch are dropped and the weights re-derived, so every
epoch appears exactly once. Sample order and augmentation are functions of (seed, epoch), so on the
CPU a resumed run ends with the same weights as an uninterrupted one.

The loop is `fit` -> `train_one_epoch` (-> one `_train_step` per batch) -> `_end_epoch`; a `Trainer`
holds the live objects and converts them to and from the checkpoint's TrainState.

Accuracies (top1, top5) are percentages, 0-100, everywhere: metrics.jsonl and the manifest.
"""

from __future__ import annotations

import copy
import dataclasses
import os
import random
import signal
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from deploy import run_layout
from deploy.errors import ReviewKDError, UsageError
from deploy.fileio import sha256_file
from deploy.manifest import read_manifest, verify_artifact
from deploy.optional import optional_import
from deploy.run_lock import locks_run
from deploy.tasks import TASKS
from reviewkd.checkpoint import (
    CHECKPOINT_FILE,
    TrainState,
    capture_rng_state,
    cpu_state,
    load_checkpoint,
    load_scaler_state,
    restore_rng_state,
    save_checkpoint,
)
from reviewkd.config import Config, config_to_dict, diff_configs, load_run_config, save_config
from reviewkd.data import DataBundle, build_data
from reviewkd.distiller import Distiller, build_distiller
from reviewkd.ema import WeightAverage
from reviewkd.models import check_model_name, create_model
from reviewkd.optim import distill_scale, lr_factor, make_optimizer
from reviewkd.run_record import (
    METRICS_FILE,
    TEACHER_FILE,
    append_metrics,
    read_metrics,
    record_test_scores,
    truncate_metrics,
    weights_file,
    write_best,
    write_run_manifest,
)
from reviewkd.runtime import Runtime, all_ranks_finite, runtime_session

TEACHER_SUBDIR = run_layout.TEACHER_DIR
# Keys a resumed run may change: they alter neither the data nor the model, only how long or where.
RESUMABLE_CHANGES = (
    "train.epochs",
    "train.device",
    "train.amp",
    "train.compile",
    "train.threads",
    "train.channels_last",
    "train.fuse_teacher",
    "train.sync_batchnorm",
    "train.find_unused_parameters",
    "train.eval_every",
    "data.cache",
    "data.num_workers",
    "output",
)


class TrainingDivergedError(ReviewKDError):
    """The loss became NaN or infinite; the last checkpoint on disk is the last good state."""

    exit_code = 1


def teacher_training_config(config: Config) -> Config:
    """The config of the teacher's own run: teacher.arch trained alone, by the task's baseline method
    (classification: cross-entropy).

    teacher.epochs and teacher.lr, where set, replace train.epochs and optim.lr; with teacher.full_data
    the teacher trains on the whole training split, whatever part of it the student sees.
    """
    data = config.data
    if config.teacher.full_data:
        data = dataclasses.replace(data, subset=None, first_per_class=None)
    derived = dataclasses.replace(
        config,
        data=data,
        student=dataclasses.replace(config.student, arch=config.teacher.arch, weights=None),
        method=dataclasses.replace(config.method, name=TASKS[config.task].baseline_method),
        train=dataclasses.replace(config.train, epochs=config.teacher.epochs or config.train.epochs),
        optim=dataclasses.replace(config.optim, lr=config.teacher.lr or config.optim.lr),
    )
    return derived


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
    with optional_import("training's progress bar"):
        from tqdm import tqdm

    return tqdm(
        total=total, desc=desc, leave=False, disable=not (enabled and sys.stderr.isatty()), dynamic_ncols=True
    )


def _log(runtime: Runtime, message: str) -> None:
    if runtime.is_main:
        print(message, flush=True)


@dataclass
class EpochSums:
    """Running sums of one epoch on this rank: each loss term and correct predictions, times images.

    A mid-epoch checkpoint keeps them as TrainState.accum (to_accum), so a resumed epoch reports
    the same averages as an uninterrupted one.
    """

    device: torch.device
    sums: dict[str, torch.Tensor] = field(default_factory=dict)
    images: int = 0
    seconds: float = 0.0

    @classmethod
    def from_accum(cls, accum: dict[str, Any], device: torch.device) -> EpochSums:
        """The sums a checkpoint's `accum` holds (empty at an epoch boundary)."""
        sums = {
            k: torch.tensor(v, dtype=torch.float64, device=device) for k, v in accum.get("sums", {}).items()
        }
        return cls(device, sums, int(accum.get("images", 0)), float(accum.get("seconds", 0.0)))

    def to_accum(self) -> dict[str, Any]:
        """Plain numbers for TrainState.accum."""
        return {
            "sums": {k: v.item() for k, v in self.sums.items()},
            "images": self.images,
            "seconds": self.seconds,
        }

    def add(self, name: str, value: torch.Tensor) -> None:
        """Add `value` to the sum `name` on the device (no host sync)."""
        zero = torch.zeros((), dtype=torch.float64, device=self.device)
        self.sums[name] = self.sums.get(name, zero) + value

    def totals(self, runtime: Runtime) -> tuple[dict[str, float], float]:
        """The sums and the image count over all ranks."""
        if not runtime.distributed:
            return {k: v.item() for k, v in self.sums.items()}, float(self.images)
        names = sorted(self.sums)
        images = torch.tensor(float(self.images), device=runtime.device, dtype=torch.float64)
        packed = torch.stack([self.sums[k] for k in names] + [images])
        dist.all_reduce(packed)
        return dict(zip(names, packed[:-1].tolist(), strict=True)), packed[-1].item()


@dataclass
class Trainer:
    """The live objects of one `fit`: what a TrainState is taken from and restored into."""

    config: Config
    runtime: Runtime
    bundle: DataBundle
    distiller: Distiller
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    scaler: torch.amp.GradScaler
    steps_per_epoch: int
    out_dir: Path
    role: str
    teacher_record: dict[str, Any]
    best: dict[str, Any] | None = None
    model: nn.Module | None = None  # the distiller as the step runs it: wrapped for DDP, compiled
    ema: WeightAverage | None = None  # train.ema_decay: the average that is validated and kept

    @property
    def checkpoint_path(self) -> Path:
        """OUT/checkpoints/last.pt."""
        return self.out_dir / CHECKPOINT_FILE

    def snapshot(
        self, epoch: int, step: int, aug_state: torch.Tensor | None, accum: dict[str, Any]
    ) -> TrainState:
        """The TrainState after `epoch` epochs and `step` steps of the next one."""
        return TrainState(
            epoch=epoch,
            step=step,
            aug_state=aug_state,
            accum=accum,
            student=cpu_state(self.distiller.student),
            head=cpu_state(self.distiller.head),
            optimizer=self.optimizer.state_dict(),
            scheduler=self.scheduler.state_dict(),
            scaler=self.scaler.state_dict(),
            rng=capture_rng_state(),
            best=self.best,
            config=config_to_dict(self.config),
            ema=self.ema.state_dict() if self.ema is not None else None,
        )

    def restore(self, state: TrainState) -> None:
        """Load weights, optimizer, schedules, scaler, RNGs and the best epoch from a TrainState."""
        self.distiller.student.load_state_dict(state.student)
        self.distiller.head.load_state_dict(state.head)
        self.optimizer.load_state_dict(state.optimizer)
        self.scheduler.load_state_dict(state.scheduler)
        load_scaler_state(self.scaler, state.scaler)
        restore_rng_state(state.rng)
        self.best = state.best
        if self.ema is not None and state.ema is not None:  # train.ema_decay cannot change on resume
            self.ema.load_state_dict(state.ema)


def _build_trainer(
    config: Config,
    out_dir: Path,
    role: str,
    teacher: nn.Module | None,
    teacher_record: dict[str, Any],
    runtime: Runtime,
    bundle: DataBundle,
    prepare_student: Callable[[nn.Module], nn.Module] | None = None,
    initial_head: dict[str, torch.Tensor] | None = None,
) -> Trainer:
    """Seeded student, distiller, optimizer, scheduler and scaler on the runtime's device.

    `prepare_student` turns the created student into the one that trains (QAD: BatchNorm folded,
    fake quantizers placed) before the distiller taps it; `initial_head` starts the ABF head from
    earlier weights instead of its seeded initialisation. A checkpoint, on resume, overrides both.
    """
    tc = config.train
    # Same initial weights (student and ABF head) for a given seed on every rank.
    torch.manual_seed(tc.seed)
    random.seed(tc.seed)
    np.random.seed(tc.seed % (1 << 32))
    student = create_model(config.student.arch, bundle.num_classes, weights=config.student.weights)
    if prepare_student is not None:
        student = prepare_student(student)
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
        teacher_pre_activation=config.method.teacher_pre_activation,
        fuse_teacher=config.train.fuse_teacher,
    )
    if initial_head is not None:
        distiller.head.load_state_dict(initial_head)
    distiller.to(runtime.device)
    if runtime.channels_last:
        distiller.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
    params = [p for p in [*distiller.student.parameters(), *distiller.head.parameters()] if p.requires_grad]
    optimizer = make_optimizer(config, params)
    steps_per_epoch = bundle.train_steps(tc.batch_size, runtime.world_size)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(config, s, steps_per_epoch))
    scaler = torch.amp.GradScaler("cuda", enabled=runtime.amp_dtype == torch.float16)
    return Trainer(
        config,
        runtime,
        bundle,
        distiller,
        optimizer,
        scheduler,
        scaler,
        steps_per_epoch,
        out_dir,
        role,
        teacher_record,
        ema=WeightAverage(distiller.student, tc.ema_decay) if tc.ema_decay > 0 else None,
    )


def _wrap_model(trainer: Trainer) -> nn.Module:
    """The distiller as the training step calls it: under DDP, compiled when train.compile is set."""
    runtime, tc = trainer.runtime, trainer.config.train
    model: nn.Module = trainer.distiller
    if runtime.distributed:
        if tc.sync_batchnorm:
            # In place below the top level: the parameters stay the ones the optimizer holds.
            nn.SyncBatchNorm.convert_sync_batchnorm(trainer.distiller.student)
            nn.SyncBatchNorm.convert_sync_batchnorm(trainer.distiller.head)
        model = nn.parallel.DistributedDataParallel(
            trainer.distiller,
            device_ids=[runtime.device.index] if runtime.device.type == "cuda" else None,
            find_unused_parameters=tc.find_unused_parameters,
        )
    if tc.compile:
        model = torch.compile(model)  # type: ignore[assignment]
    return model


def _check_finite(
    losses: dict[str, torch.Tensor], runtime: Runtime, epoch: int, step: int, out_dir: Path
) -> None:
    """Raise TrainingDivergedError on every rank when a loss is not finite on any rank."""
    if all_ranks_finite(list(losses.values()), runtime):
        return
    parts = ", ".join(f"{k}={v.item():.4g}" for k, v in losses.items())
    raise TrainingDivergedError(
        f"epoch {epoch + 1} step {step + 1}: the loss is not finite (rank {runtime.rank}: {parts}); "
        f"{out_dir / CHECKPOINT_FILE} keeps the last completed epoch ({epoch}); "
        "lower optim.lr or the distillation weights"
    )


def _train_step(
    trainer: Trainer, epoch: int, step: int, images: torch.Tensor, labels: torch.Tensor, sums: EpochSums
) -> None:
    """One optimizer step on one batch, its losses and correct predictions added to `sums`."""
    runtime, distiller, spe = trainer.runtime, trainer.distiller, trainer.steps_per_epoch
    assert trainer.model is not None
    distiller.distill_scale = distill_scale(trainer.config, epoch * spe + step, spe)
    x = _to_input(images, trainer.bundle, runtime)
    y = labels.to(runtime.device, non_blocking=True)
    with runtime.autocast():
        out = trainer.model(x, y)
    loss = out["loss"].float()
    losses = {k: out[k].detach().float() for k in ("loss", "ce", "hcl", "kd") if k in out}
    check_every = 1 if runtime.device.type == "cpu" else 25  # a host sync per check costs GPU speed
    if step % check_every == 0 or step == spe - 1:
        _check_finite(losses, runtime, epoch, step, trainer.out_dir)
    trainer.optimizer.zero_grad(set_to_none=True)
    trainer.scaler.scale(loss).backward()
    trainer.scaler.step(trainer.optimizer)
    trainer.scaler.update()
    trainer.scheduler.step()
    if trainer.ema is not None:
        trainer.ema.update(distiller.student)
    n = y.numel()
    for k, v in losses.items():
        sums.add(k, v * n)
    sums.add("correct", (out["logits"].detach().argmax(1) == y).sum())
    sums.images += n


def train_one_epoch(
    trainer: Trainer,
    epoch: int,
    start_step: int,
    aug_state: torch.Tensor | None,
    accum: dict[str, Any],
    sigint: _SigintFlag,
) -> EpochSums:
    """Train epoch `epoch` (0-based) from `start_step`; return its running sums.

    After SIGINT, the step in flight finishes, rank 0 saves the mid-epoch TrainState to last.pt and
    KeyboardInterrupt is raised.
    """
    tc, runtime = trainer.config.train, trainer.runtime
    trainer.distiller.train()
    batches = trainer.bundle.train_batches(
        epoch, tc.seed, tc.batch_size, runtime.rank, runtime.world_size, start_step, aug_state
    )
    sums = EpochSums.from_accum(accum, runtime.device)
    t0 = time.perf_counter()
    bar = _progress(len(batches), f"{trainer.role} {epoch + 1}/{tc.epochs}", runtime.is_main)
    for step, (images, labels) in enumerate(batches, start=start_step):
        _train_step(trainer, epoch, step, images, labels, sums)
        bar.update(1)
        if sigint.raised:
            sums.seconds += time.perf_counter() - t0
            if runtime.is_main:
                state = trainer.snapshot(epoch, step + 1, batches.aug_state, sums.to_accum())
                save_checkpoint(trainer.checkpoint_path, state)
            bar.close()
            _log(
                runtime,
                f"{trainer.role}: interrupted; {trainer.checkpoint_path} holds epoch {epoch + 1} "
                f"step {step + 1}, continue with --resume",
            )
            raise KeyboardInterrupt
    bar.close()
    sums.seconds += time.perf_counter() - t0
    return sums


def validates_epoch(config: Config, epoch: int) -> bool:
    """Whether epoch `epoch` (0-based) is scored on the validation split: every train.eval_every-th
    epoch and always the last."""
    return (epoch + 1) % config.train.eval_every == 0 or epoch + 1 == config.train.epochs


def _end_epoch(trainer: Trainer, epoch: int, sums: EpochSums) -> None:
    """Validate, then append the metrics line, save last.pt and re-derive the best weights, in that order.

    An epoch that train.eval_every skips gets no val_* keys and cannot become the best.
    """
    runtime, distiller, tc = trainer.runtime, trainer.distiller, trainer.config.train
    totals, seen = sums.totals(runtime)
    if runtime.distributed:
        # Each rank's last forward updated its own BatchNorm statistics: take rank 0's, which
        # are the ones saved, so that validation scores the weights written to disk.
        for buffer in distiller.student.buffers():
            dist.broadcast(buffer, 0)
        if trainer.ema is not None:
            for averaged in trainer.ema.weights.values():
                dist.broadcast(averaged, 0)
    denom = max(seen, 1.0)
    record: dict[str, Any] = {"epoch": epoch + 1}
    record.update({k: totals[k] / denom for k in ("loss", "ce", "hcl", "kd") if k in totals})
    record["train_top1"] = 100.0 * totals.get("correct", 0.0) / denom
    val: dict[str, float] | None = None
    if validates_epoch(trainer.config, epoch):
        t_val = time.perf_counter()
        batch_size = max(tc.batch_size, 256)
        if trainer.ema is not None:
            live = evaluate(distiller.student, trainer.bundle, runtime, batch_size=batch_size)
            record.update(live_val_top1=live["top1"], live_val_top5=live["top5"])
            with trainer.ema.applied(distiller.student):
                val = evaluate(distiller.student, trainer.bundle, runtime, batch_size=batch_size)
        else:
            val = evaluate(distiller.student, trainer.bundle, runtime, batch_size=batch_size)
        record.update(val_top1=val["top1"], val_top5=val["top5"], val_loss=val["loss"])
        record["val_time_s"] = time.perf_counter() - t_val
    record.update(
        lr=trainer.optimizer.param_groups[0]["lr"],
        distill_scale=distiller.distill_scale,
        images_per_s=seen / max(sums.seconds, 1e-9),
        epoch_time_s=sums.seconds,
        time=time.time(),
    )
    improved = val is not None and (trainer.best is None or val["top1"] > trainer.best["top1"])
    if val is not None and improved:
        trainer.best = {"top1": val["top1"], "top5": val["top5"], "epoch": epoch + 1}
        if trainer.ema is not None:
            trainer.best["state"] = trainer.ema.state_dict()["weights"]
        else:
            trainer.best["state"] = cpu_state(distiller.student)
    if runtime.is_main:
        append_metrics(trainer.out_dir / METRICS_FILE, record)
        save_checkpoint(trainer.checkpoint_path, trainer.snapshot(epoch + 1, 0, None, {}))
        if improved:
            assert trainer.best is not None
            args = (trainer.out_dir, trainer.config, trainer.bundle, trainer.role, trainer.teacher_record)
            write_best(*args, trainer.best)
    scores = f"val top1 {val['top1']:.2f}% top5 {val['top5']:.2f}% " if val is not None else ""
    if "live_val_top1" in record:
        scores += f"(EMA; live weights {record['live_val_top1']:.2f}%) "
    _log(
        runtime,
        f"{trainer.role} epoch {epoch + 1}/{tc.epochs}: loss {record['loss']:.4f} {scores}"
        f"({record['images_per_s']:.0f} img/s, {sums.seconds:.1f}s)",
    )


def _check_resume_config(out_dir: Path, config: Config, resumable: Sequence[str]) -> None:
    saved_path = out_dir / run_layout.CONFIG
    if not saved_path.is_file():
        return
    allowed = (*RESUMABLE_CHANGES, *resumable)
    changed = diff_configs(load_run_config(out_dir), config, ignore=allowed)
    if changed:
        raise UsageError(
            f"{saved_path}: --resume with a different config ({', '.join(changed)} changed); "
            f"only {', '.join(allowed)} may change on resume"
        )


def _has_trained(out_dir: Path, role: str) -> bool:
    """True when out_dir holds trained epochs: best weights, or more metrics lines than one kill can leave."""
    return (out_dir / weights_file(role)).exists() or len(read_metrics(out_dir / METRICS_FILE)) > 1


def check_run_dir(
    out_dir: Path, config: Config, resume: bool, role: str, resumable: Sequence[str] = ()
) -> None:
    """Refuse to train over an existing run without --resume, to resume a run whose checkpoint is
    missing (that would retrain from scratch over its finished epochs), or to resume with another config."""
    checkpoint = out_dir / CHECKPOINT_FILE
    if not resume and (checkpoint.exists() or _has_trained(out_dir, role)):
        found = CHECKPOINT_FILE if checkpoint.exists() else weights_file(role)
        raise UsageError(
            f"{out_dir} already holds a training run ({found}); "
            "pass --resume to continue it or choose another --out"
        )
    if resume and not checkpoint.is_file() and _has_trained(out_dir, role):
        raise UsageError(
            f"{checkpoint}: missing, but {out_dir} holds trained epochs ({weights_file(role)}, "
            f"{METRICS_FILE}); --resume would retrain from scratch over them; restore the checkpoint "
            "or train into another --out"
        )
    if resume:
        _check_resume_config(out_dir, config, resumable)


def check_model_names(config: Config, *, teacher: bool) -> None:
    """Check student.arch, and teacher.arch when `teacher`, before any work (models.check_model_name)."""
    check_model_name(config.student.arch)
    if teacher:
        check_model_name(config.teacher.arch)


def _prepare_run_dir(trainer: Trainer, epochs_done: int) -> None:
    """Write config.yaml, cut metrics.jsonl back to the checkpoint, re-derive the best weights."""
    out_dir = trainer.out_dir
    out_dir.mkdir(parents=True, exist_ok=True)
    save_config(trainer.config, out_dir / run_layout.CONFIG)
    truncate_metrics(out_dir / METRICS_FILE, epochs_done)
    args = (out_dir, trainer.config, trainer.bundle, trainer.role, trainer.teacher_record)
    if trainer.best is not None:
        write_best(*args, trainer.best)
    else:
        write_run_manifest(*args, None)


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
    prepare_student: Callable[[nn.Module], nn.Module] | None = None,
    initial_head: dict[str, torch.Tensor] | None = None,
    resumable: Sequence[str] = (),
) -> Path:
    """Train config.student.arch with config.method (against `teacher`) into `out_dir`.

    `role` "teacher" names the result teacher.safetensors and records it as the manifest's teacher.
    `prepare_student` and `initial_head` adapt the student and the ABF head before training
    (see _build_trainer; reviewkd.qad uses them). `resumable` names config keys, besides
    RESUMABLE_CHANGES, that may differ on resume (a caller that checks those files itself).
    Returns the path of the best weights file.

    Raises:
        UsageError: an existing run without resume, an incompatible resume, bad data or models.
        TrainingDivergedError: a NaN or infinite loss (last.pt keeps the last completed epoch).
        KeyboardInterrupt: after SIGINT, once last.pt holds the state at the interrupted step.
    """
    if runtime is None:
        with runtime_session(config) as session:
            return fit(
                config,
                out_dir,
                role=role,
                teacher=teacher,
                teacher_record=teacher_record,
                resume=resume,
                runtime=session,
                bundle=bundle,
                prepare_student=prepare_student,
                initial_head=initial_head,
                resumable=resumable,
            )
    out_dir = Path(out_dir)
    teacher_record = teacher_record or {"arch": None, "sha256": None, "top1": None, "top5": None}
    check_run_dir(out_dir, config, resume, role, resumable)
    bundle = bundle or build_data(config)
    trainer = _build_trainer(
        config, out_dir, role, teacher, teacher_record, runtime, bundle, prepare_student, initial_head
    )
    start_epoch, start_step, aug_state, accum = 0, 0, None, {}
    if resume and trainer.checkpoint_path.is_file():
        state = load_checkpoint(trainer.checkpoint_path)
        trainer.restore(state)
        start_epoch, start_step, aug_state, accum = (
            state.epoch,
            state.step,
            state.aug_state,
            dict(state.accum),
        )
        _log(
            runtime,
            f"{role}: resuming {out_dir} after epoch {start_epoch}"
            + (f" step {start_step}" if start_step else ""),
        )
    if runtime.is_main:
        _prepare_run_dir(trainer, start_epoch)
    trainer.model = _wrap_model(trainer)
    with _SigintFlag(enabled=not runtime.distributed) as sigint:
        for epoch in range(start_epoch, config.train.epochs):
            sums = train_one_epoch(trainer, epoch, start_step, aug_state, accum, sigint)
            _end_epoch(trainer, epoch, sums)
            start_step, aug_state, accum = 0, None, {}
    if bundle.test is not None and trainer.best is not None:
        _score_test(trainer)
    if runtime.distributed:
        dist.barrier()
    return out_dir / weights_file(role)


def _score_test(trainer: Trainer) -> None:
    """Score the kept weights on the test split once, after training, and record it in the manifest.

    Only runs that carved their validation split (data.val_split) have a test split apart: every
    choice (best epoch, recipe screens) read the val split, so this number is read by nothing that
    chooses. Every rank takes part (evaluate sums the counts under DDP); rank 0 writes.
    """
    assert trainer.best is not None and trainer.bundle.test_name is not None
    model = copy.deepcopy(trainer.distiller.student)
    model.load_state_dict(trainer.best["state"])
    batch_size = max(trainer.config.train.batch_size, 256)
    scores = evaluate(model, trainer.bundle, trainer.runtime, batch_size=batch_size, split="test")
    if trainer.runtime.is_main:
        record_test_scores(
            trainer.out_dir, trainer.config.task, trainer.role, trainer.bundle.test_name, scores
        )
    _log(
        trainer.runtime,
        f"{trainer.role}: test split {trainer.bundle.test_name} ({scores['n']} images), scored once with"
        f" the epoch-{trainer.best['epoch']} weights: top1 {scores['top1']:.2f}% top5 {scores['top5']:.2f}%",
    )


# ------------------------------------------------------------------------------------------------- stages


def teacher_is_complete(out_dir: Path, config: Config) -> bool:
    """True when out_dir holds a finished teacher run of exactly this config, its weights verified."""
    ckpt_path = out_dir / CHECKPOINT_FILE
    required = (ckpt_path, out_dir / run_layout.CONFIG, out_dir / run_layout.MANIFEST)
    if not all(path.is_file() for path in required):
        return False
    if diff_configs(load_run_config(out_dir), config, ignore=RESUMABLE_CHANGES):
        return False
    try:
        verify_artifact(out_dir, read_manifest(out_dir), TEACHER_FILE)
    except UsageError:
        return False
    state = load_checkpoint(ckpt_path)
    return state.epoch >= config.train.epochs and state.step == 0


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
    check_model_names(derived, teacher=False)
    if teacher_is_complete(out, derived):
        if runtime is None or runtime.is_main:
            print(f"teacher: reusing the finished run in {out}", flush=True)
        return out / TEACHER_FILE
    if derived.data != config.data:  # teacher.full_data: the student's bundle is a part of the teacher's
        bundle = None
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
    previous = read_manifest(out_dir).get("teacher", {}) if (out_dir / run_layout.MANIFEST).is_file() else {}
    batch_size = max(config.train.batch_size, 256)
    if previous.get("sha256") == digest and previous.get("top1") is not None:
        record.update(top1=previous["top1"], top5=previous["top5"])
    else:
        scores = evaluate(teacher, bundle, runtime, batch_size=batch_size)
        record.update(top1=scores["top1"], top5=scores["top5"])
    _log(runtime, f"teacher {config.teacher.arch}: val top1 {record['top1']:.2f}% top5 {record['top5']:.2f}%")
    if bundle.test is not None:
        # The teacher is chosen by nothing here, so its test score is read once, like the student's,
        # for the report to compare the three models on the same unseen images.
        if previous.get("sha256") == digest and isinstance(previous.get("test"), dict):
            record["test"] = previous["test"]
        else:
            scores = evaluate(teacher, bundle, runtime, batch_size=batch_size, split="test")
            record["test"] = {
                "split": bundle.test_name,
                "n": scores["n"],
                "top1": scores["top1"],
                "top5": scores["top5"],
            }
    return teacher, record


@locks_run("distill", run_arg="out_dir", create=True)
def distill(config: Config, out_dir: str | os.PathLike[str], *, resume: bool = False) -> Path:
    """Distil config.student.arch from the teacher with config.method; return out_dir/student.safetensors.

    method "ce" trains the student alone (no teacher). Otherwise the teacher comes from teacher.weights,
    or is trained first into out_dir/teacher/ (reused when that run is already finished).
    """
    out = Path(out_dir)
    check_model_names(config, teacher=config.method.name != "ce")
    check_run_dir(out, config, resume, "student")
    with runtime_session(config) as runtime:
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
