"""Quantization-aware ReviewKD (QAD): fine-tune a run's distilled student under int8 fake quantization.

The student of RUN (RUN/student.safetensors) gets BatchNorm folded and int8 fake quantizers placed
as TensorRT's explicit quantization wants them (reviewkd.fake_quant), its activation ranges are
calibrated on the same training images post-training int8 export calibrates on, and it is then
trained by the ordinary engine (reviewkd.engine.fit) against the run's teacher with method
"reviewkd+kd": HCL on the ABF-reviewed features plus KD on the logits, plus cross-entropy. The ABF
head starts from the run's own trained head (RUN/checkpoints/last.pt) when the run was a ReviewKD run.

The fine-tuning is a training run of its own in RUN/qad/ (config.yaml, metrics.jsonl,
checkpoints/last.pt, student.safetensors: the best epoch by fake-quantized validation top-1,
manifest.json), so --resume, SIGINT and SIGKILL behave as for `reviewkd distill`; beside it,
calibrated.safetensors holds the calibrated student before fine-tuning. Whichever of the two scores
the higher validation top-1 is selected. The run's own manifest gets a "qad" block (calibrated and
fine-tuned top-1, the selected weights, the quantizer placement); export.qad_export turns the
selected student into Q/DQ ONNX files.
"""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from deploy import run_layout
from deploy.errors import UsageError
from deploy.fileio import ensure_writable_dir, sha256_file
from deploy.manifest import (
    Manifest,
    artifact_path,
    forget_artifact,
    input_spec,
    model_block,
    read_manifest,
    record_artifact,
    verify_artifact,
    write_manifest,
)
from deploy.run_lock import locks_run
from reviewkd.checkpoint import CHECKPOINT_FILE, cpu_state, load_checkpoint
from reviewkd.config import Config, load_run_config
from reviewkd.data import build_data, iter_run_batches
from reviewkd.engine import evaluate, fit, load_teacher
from reviewkd.fake_quant import QuantizationPlan, calibrate, quantize_student
from reviewkd.models import create_model, read_state_dict
from reviewkd.run_record import STUDENT_FILE, TEACHER_FILE, save_weights
from reviewkd.runtime import setup_runtime

QAD_DIR = run_layout.QAD_DIR
CALIBRATED_FILE = "calibrated.safetensors"
QAD_METHOD = "reviewkd+kd"
# QAD's learning rate: this fraction of the run's optim.lr. With BatchNorm folded, 1% diverged within
# 40 steps on the CIFAR-10 preset's ReviewKD ResNet-20 (gradient norm 38 -> 450 -> NaN); 0.1% trains.
DEFAULT_LR_FACTOR = 0.001
DEFAULT_CALIB_SAMPLES = 512  # the images export calibrates post-training int8 on, by default


@dataclass
class QADResult:
    """What a QAD run produced (top-1 in percent, fake-quantized, on the validation split)."""

    weights: Path  # the selected weights: the best fine-tuned epoch, or the calibrated start
    calibrated_top1: float  # the calibrated fake-quant student before fine-tuning
    top1: float  # the best fine-tuned epoch
    epoch: int
    plan: QuantizationPlan


def qad_config(
    config: Config,
    run: Path,
    epochs: int,
    lr: float | None,
    teacher_weights: Path,
    device: str | None,
    kd_weight: float | None = None,
) -> Config:
    """The QAD run's config: the run's data, student and teacher, method reviewkd+kd (KD weighted by
    `kd_weight`, default the run's method.kd_weight), a short cosine schedule without warm-up from
    `lr` (default DEFAULT_LR_FACTOR x the run's learning rate), in fp32, without a weight average."""
    method = dataclasses.replace(
        config.method,
        name=QAD_METHOD,
        warmup_epochs=0.0,
        kd_weight=config.method.kd_weight if kd_weight is None else kd_weight,
    )
    return dataclasses.replace(
        config,
        student=dataclasses.replace(config.student, weights=str(run / STUDENT_FILE)),
        teacher=dataclasses.replace(config.teacher, weights=str(teacher_weights)),
        method=method,
        optim=dataclasses.replace(
            config.optim, lr=lr if lr is not None else config.optim.lr * DEFAULT_LR_FACTOR
        ),
        schedule=dataclasses.replace(
            config.schedule, name="cosine", min_lr=0.0, warmup_epochs=0.0, warmup_fraction=0.0
        ),
        train=dataclasses.replace(
            config.train,
            epochs=epochs,
            device=device or config.train.device,
            amp="none",  # fake quantization rounds at fp32 scales; bf16/fp16 activations would blur them
            compile=False,  # the quantizers' range updates stay eager
            # QAD keeps the better of its calibrated start and its fine-tuned student; an average of
            # weights trained under moving quantizer ranges would be a third, unchecked student.
            ema_decay=0.0,
        ),
        output=dataclasses.replace(config.output, dir=str(run / QAD_DIR)),
    )


def check_qad_options(
    epochs: int,
    lr: float | None,
    calib_samples: int = DEFAULT_CALIB_SAMPLES,
    kd_weight: float | None = None,
) -> None:
    """UsageError naming the option when `epochs`, `lr`, `calib_samples` or `kd_weight` cannot make a
    QAD run."""
    if kd_weight is not None and not (math.isfinite(kd_weight) and kd_weight >= 0):
        raise UsageError(f"--kd-weight must be a finite number >= 0, got {kd_weight}")
    if epochs < 1:
        raise UsageError(f"--epochs must be >= 1, got {epochs}")
    if lr is not None and not (math.isfinite(lr) and lr > 0):  # nan and inf diverge on the first step
        raise UsageError(f"--lr must be a finite number > 0, got {lr}")
    if calib_samples < 1:
        raise UsageError(f"--calib-samples must be >= 1, got {calib_samples}")


def _teacher_weights(run: Path, manifest: Manifest, teacher: Path | None) -> Path:
    """The teacher the run was distilled with: `teacher` (a file the user names with --teacher) or
    else the run's own RUN/teacher/teacher.safetensors, checked against the manifest's teacher.sha256.

    The path the manifest records under teacher.weights is never read: a copied run would silently
    use the original's teacher, and a hostile manifest could name any file to be read and hashed. A
    run distilled with a teacher from outside it (teacher.weights=FILE) therefore needs --teacher.
    """
    digest = model_block(manifest, "teacher").sha256
    if not digest:
        raise UsageError(
            f"{run / run_layout.MANIFEST}: QAD needs the run's teacher, and the manifest records none"
            " (no teacher.sha256): quantize a run distilled from a teacher"
        )
    if teacher is None:
        path = artifact_path(run, f"{run_layout.TEACHER_DIR}/{TEACHER_FILE}")  # refuses a link out
        if not path.is_file():
            raise UsageError(
                f"{run / run_layout.MANIFEST}: QAD needs the run's teacher; {path} does not exist (a"
                " run whose teacher came from outside it has none of its own): pass its weights with"
                " --teacher FILE"
            )
    else:
        path = teacher
        if not path.is_file():
            raise UsageError(f"--teacher {path}: no such file")
    if sha256_file(path) != digest:
        raise UsageError(
            f"{path}: sha256 does not match the teacher the run was distilled with (manifest"
            f" teacher.sha256 {digest[:12]}…); pass that teacher's weights"
        )
    return path


def _check_qad_state(run: Path, manifest: Manifest, resume: bool) -> None:
    """Refuse, before any work, to start over an existing QAD run without `resume`, or to resume one
    whose calibrated start is gone or changed, or that began from another student than the run's."""
    out = run / QAD_DIR
    if not (out / CHECKPOINT_FILE).is_file():
        return
    if not resume:
        raise UsageError(f"{out} already holds a QAD run; pass --resume to continue it or remove {out}")
    block = manifest.get("qad", {})
    calibrated = out / CALIBRATED_FILE
    if not calibrated.is_file() or block.get("calibrated_sha256") != sha256_file(calibrated):
        raise UsageError(f"{calibrated}: missing or changed; remove {out} and run QAD again")
    source, current = block.get("student_sha256"), model_block(manifest, "student").sha256
    if source and current and source != current:
        raise UsageError(
            f"{out}: fine-tuned from student {source[:12]}…, but the run's student is now {current[:12]}…"
            f" (retrained); remove {out} and run QAD again"
        )


def _trained_head(run: Path, config: Config) -> dict[str, torch.Tensor] | None:
    """The ABF head of the run's last checkpoint, when the run trained one."""
    if config.method.name not in ("reviewkd", "reviewkd+kd") or not (run / CHECKPOINT_FILE).is_file():
        return None
    head = load_checkpoint(run / CHECKPOINT_FILE).head
    return head or None


def calibration_batches(run: Path, samples: int, batch_size: int = 64) -> list[torch.Tensor]:
    """The run's first `samples` shuffled training images, preprocessed: those export calibrates on."""
    return [torch.from_numpy(images) for images, _ in iter_run_batches(run, "train", batch_size, samples)]


def load_qad_student(run: str | os.PathLike[str]) -> tuple[nn.Module, QuantizationPlan]:
    """The fake-quantized student QAD selected for RUN (the manifest's qad.weights), in eval mode.

    Raises:
        UsageError: no finished QAD run, or weights that differ from what the manifest recorded.
    """
    run = Path(run)
    manifest = read_manifest(run)
    block = manifest.get("qad", {})
    if not block.get("weights"):
        raise UsageError(f"{run / 'manifest.json'}: no QAD result; run `reviewkd quantize {run}` first")
    path = verify_artifact(run, manifest, block["weights"])
    student = model_block(manifest, "student")
    if not student.arch or not student.num_classes:
        raise UsageError(f"{run / 'manifest.json'}: the student block lacks arch or num_classes")
    model = create_model(student.arch, student.num_classes)
    quantized, plan = quantize_student(model, input_spec(manifest).shape)
    quantized.load_state_dict(read_state_dict(path))
    return quantized.eval().requires_grad_(False), plan


@locks_run("quantize")
def quantize_run(
    run_dir: str | os.PathLike[str],
    epochs: int,
    *,
    lr: float | None = None,
    calib_samples: int = DEFAULT_CALIB_SAMPLES,
    resume: bool = False,
    device: str | None = None,
    kd_weight: float | None = None,
    teacher_file: str | os.PathLike[str] | None = None,
) -> QADResult:
    """Fine-tune RUN's student under int8 fake quantization for `epochs` epochs into RUN/qad/.

    The teacher is `teacher_file`, else RUN/teacher/teacher.safetensors; either must be the one the run
    was distilled with (its sha256 in the manifest).

    Raises:
        UsageError: bad options; not a finished distillation run; no teacher, or not the one the
            run was distilled with; an existing QAD run without `resume`, or one resumed with other
            settings, without its calibrated start, or from a student since retrained.
        TrainingDivergedError: a non-finite loss (RUN/qad/checkpoints/last.pt keeps the last epoch).
        KeyboardInterrupt: after SIGINT, once the QAD checkpoint holds the interrupted step.
    """
    run = Path(run_dir)
    check_qad_options(epochs, lr, calib_samples, kd_weight)
    manifest = read_manifest(run)
    verify_artifact(run, manifest, STUDENT_FILE)
    _check_qad_state(run, manifest, resume)
    teacher_weights = _teacher_weights(run, manifest, None if teacher_file is None else Path(teacher_file))
    for folder in (run / QAD_DIR, run / run_layout.EXPORT_DIR):  # export_qad writes the second after QAD
        ensure_writable_dir(folder)
    base = load_run_config(run)
    config = qad_config(base, run, epochs, lr, teacher_weights, device, kd_weight)
    out = run / QAD_DIR
    runtime = setup_runtime(config)
    bundle = build_data(config)
    teacher, teacher_record = load_teacher(config, out, bundle, runtime, resume=False)
    resuming = resume and (out / CHECKPOINT_FILE).is_file()
    plans: list[QuantizationPlan] = []

    def prepare(student: nn.Module) -> nn.Module:
        quantized, plan = quantize_student(student, bundle.input_shape)
        plans.append(plan)
        if not resuming:  # on resume the checkpoint holds the ranges
            samples = calibrate(quantized, calibration_batches(run, calib_samples))
            scores = evaluate(quantized.to(runtime.device), bundle, runtime)
            out.mkdir(parents=True, exist_ok=True)
            save_weights(cpu_state(quantized), out / CALIBRATED_FILE, {"arch": config.student.arch})
            _update_qad_block(
                run,
                calibrated={"top1": scores["top1"], "top5": scores["top5"], "samples": samples},
                calibrated_sha256=sha256_file(out / CALIBRATED_FILE),
                student_sha256=model_block(manifest, "student").sha256,
            )
            print(f"qad: calibrated int8 student before fine-tuning: val top1 {scores['top1']:.2f}%")
        return quantized

    fit(
        config,
        out,
        teacher=teacher,
        teacher_record=teacher_record,
        resume=resume,
        runtime=runtime,
        bundle=bundle,
        prepare_student=prepare,
        initial_head=None if resuming else _trained_head(run, base),
        # Paths spelled from RUN: a run moved or named another way resumes; both files are checked
        # by sha256 above (_check_qad_state, _teacher_weights).
        resumable=("student.weights", "teacher.weights"),
    )
    best = read_manifest(out)["student"]
    block = read_manifest(run).get("qad", {})
    calibrated = block.get("calibrated")
    if not calibrated or block.get("calibrated_sha256") != sha256_file(out / CALIBRATED_FILE):
        raise UsageError(f"{out / CALIBRATED_FILE}: missing or changed; remove {out} and run QAD again")
    # The engine keeps the best epoch by validation top-1; the calibrated start competes on the same
    # terms, so QAD never hands export a student worse than the one it started from.
    fine_tuned = best["top1"] >= calibrated["top1"]
    selected = out / (STUDENT_FILE if fine_tuned else CALIBRATED_FILE)
    _update_qad_block(
        run,
        method=QAD_METHOD,
        kd_weight=config.method.kd_weight,
        epochs=config.train.epochs,
        lr=config.optim.lr,
        fine_tuned={k: best[k] for k in ("top1", "top5", "epoch", "sha256")},
        selected="fine_tuned" if fine_tuned else "calibrated",
        weights=selected.relative_to(run).as_posix(),
        quantizers=plans[0].as_dict(),
    )
    return QADResult(selected, calibrated["top1"], best["top1"], best["epoch"], plans[0])


def _update_qad_block(run: Path, **values: Any) -> None:
    """Merge `values` into the run manifest's "qad" block; record the selected weights as an artifact."""
    manifest = read_manifest(run)
    block = manifest.setdefault("qad", {})
    block.update(values)
    if "weights" in values:
        for rel in [rel for rel, entry in manifest["artifacts"].items() if entry.get("role") == "qad"]:
            forget_artifact(manifest, rel)  # an earlier QAD's selection
        record_artifact(run, manifest, values["weights"], "weights", role="qad")
    write_manifest(run, manifest)
