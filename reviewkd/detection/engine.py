"""Training detectors: the teacher, the ReviewKD student and the plain student, scored by COCO mAP.

The run directory is a classification run's (docs/METHOD.md section 5, deploy.run_layout's names):
config.yaml, metrics.jsonl (one line per epoch, val_map and val_ap50 on the scored ones),
checkpoints/last.pt (a reviewkd.checkpoint TrainState), the best weights by val mAP
(student.safetensors, or teacher.safetensors for a teacher run) and manifest.json, which records
"task": "detection". The weights file holds the torchvision model's own state_dict (what
reviewkd.detection.models.build_detector loads as a user's weights), so the student's holds no ABF.

The generic pieces are the classification engine's: reviewkd.optim's optimizer and schedules,
reviewkd.runtime's device and seed, reviewkd.checkpoint's save and load (weights_only), the run
directory checks and the teacher-reuse test of reviewkd.engine, deploy.run_lock. Ordering is theirs
too: an epoch's metrics line is appended, then last.pt replaced, then the best weights and the
manifest re-derived. A run continues (--resume) from the last completed epoch; sample order and
augmentation are functions of (seed, epoch), so on the CPU a resumed run ends where an
uninterrupted one does.

Under torchrun (DDP, as classification: reviewkd.runtime joins the group) each rank trains on a
strided share of the epoch's image order, every rank the same number of steps, and DDP averages
the gradients; the loss sums are all-reduced, the finite-loss check is collective, rank 0's
BatchNorm statistics are broadcast before validation, and validation scores each rank's share of
the val images and gathers the detections so that COCOeval runs once over the whole split. Only
rank 0 writes files and prints. train.amp autocasts the forward passes (bf16 on the CPU; fp16 with
a GradScaler on CUDA), as classification does.

With data.val_split N, as for classification, N training images (picked with the fixed DATA_SEED,
not train.seed) are carved out as the val split that best-epoch choice reads, and the data set's
held-out split becomes the test split, scored once after training with the kept weights and recorded
as the model block's "test" in the manifest (reviewkd.run_record.record_test_scores).

mAP and AP50 are percentages (0-100) in metrics.jsonl and the manifest, like top-1.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import math
import os
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from deploy import run_layout
from deploy.detection.annotations import DetectionDataset, read_coco, read_yolo
from deploy.detection.coco_metric import Detections, coco_metrics
from deploy.errors import UsageError
from deploy.fileio import sha256_file
from deploy.manifest import read_manifest
from deploy.run_lock import locks_run
from deploy.tasks import DETECTION, TASKS
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
from reviewkd.config import Config, config_to_dict, save_config
from reviewkd.data import DATA_SEED
from reviewkd.detection.data import BoxAugment, DetectionImages, collate_detection
from reviewkd.detection.distiller import DetectionReviewKD, PlainDetection
from reviewkd.detection.models import Detector, build_detector, list_detectors
from reviewkd.detection.synthetic import DigitsDetectionSpec, ensure_digits_detection
from reviewkd.distiller import Distiller
from reviewkd.engine import (
    TEACHER_SUBDIR,
    TrainingDivergedError,
    check_run_dir,
    teacher_is_complete,
    teacher_training_config,
    validates_epoch,
)
from reviewkd.optim import distill_scale, lr_factor, make_optimizer
from reviewkd.run_record import (
    METRICS_FILE,
    RunData,
    append_metrics,
    record_test_scores,
    record_trained_model,
    save_weights,
    truncate_metrics,
    weights_file,
)
from reviewkd.runtime import Runtime, all_ranks_finite, runtime_session

# Where the embedded digits set is generated when data.root is not set: $REVIEWKD_CACHE, else this.
CACHE_ENV = "REVIEWKD_CACHE"
DEFAULT_CACHE = Path.home() / ".cache" / "reviewkd"
EVAL_BATCH_SIZE = 32
# The split names a run's manifest gives the carved val split and the test split (data.val_split).
CARVED_VAL_SPLIT = "train-holdout"
TEST_SPLIT = "heldout"


@dataclass(frozen=True)
class DetectionData:
    """The splits of a detection run, the image size the detectors are built for, and the manifest's
    data block.

    `val` is what training selects on: carved from the training images with data.val_split (then
    `test` is the data set's held-out split, scored once at the end), else the held-out split itself.
    """

    train: DetectionDataset
    val: DetectionDataset
    image_size: tuple[int, int]
    record: dict[str, Any]
    test: DetectionDataset | None = None

    @property
    def held_out(self) -> DetectionDataset:
        """The split no selection reads when data.val_split carved one (the test split), else val."""
        return self.test if self.test is not None else self.val

    @property
    def classes(self) -> tuple[str, ...]:
        return self.train.class_names

    @property
    def num_classes(self) -> int:
        return self.train.num_classes


def digits_spec(config: Config) -> DigitsDetectionSpec:
    """The embedded digits set that config.detection asks for."""
    dc = config.detection
    return DigitsDetectionSpec(
        seed=dc.digits_seed,
        train_images=dc.digits_train_images,
        val_images=dc.digits_val_images,
        height=dc.height,
        width=dc.width,
    )


def digits_root(config: Config) -> Path:
    """data.root, or a cache folder named by the set's spec (so runs of other specs never share one)."""
    if config.data.root:
        return Path(config.data.root)
    spec = json.dumps(dataclasses.asdict(digits_spec(config)), sort_keys=True)
    cache = Path(os.environ.get(CACHE_ENV) or DEFAULT_CACHE)
    return cache / f"digits_detection-{hashlib.sha256(spec.encode()).hexdigest()[:12]}"


def _split_path(root: Path, relative: str | None) -> Path | None:
    return root / relative if relative else None


def build_detection_data(config: Config) -> DetectionData:
    """Read (for digits: generate first, once) the train and val splits config.detection names.

    Raises:
        UsageError: a missing or malformed data set, a split without a single box, or splits whose
            classes differ.
    """
    dc = config.detection
    if dc.format == "digits":
        root = digits_root(config)
        paths = ensure_digits_detection(root, digits_spec(config))
        train, val = read_coco(paths["train"]), read_coco(paths["val"])
    else:
        root = Path(str(config.data.root))
        splits = []
        for name, split, images in (("train", dc.train, dc.train_images), ("val", dc.val, dc.val_images)):
            if dc.format == "coco":
                annotations = _split_path(root, split)
                if annotations is None:
                    raise UsageError(f"config key detection.{name}: detection.format=coco needs the JSON")
                splits.append(read_coco(annotations, _split_path(root, images)))
            else:
                splits.append(read_yolo(root / "images" / split if split else root / "images"))
        train, val = splits
    for name, dataset in (("train", train), ("val", val)):
        # Images without boxes are negatives beside the others; a split of nothing but negatives gives
        # a detector nothing to learn from, or an mAP of nothing (COCOeval's -1, a NaN).
        if dataset.num_boxes == 0:
            raise UsageError(
                f"{dataset.source}: none of its {len(dataset.images)} images holds a box; the {name} split"
                " needs annotated objects"
            )
    if train.class_names != val.class_names:
        raise UsageError(
            f"{val.source}: classes {list(val.class_names)} differ from the train split's"
            f" {list(train.class_names)} ({train.source})"
        )
    test: DetectionDataset | None = None
    if config.data.val_split is not None:
        test = val
        train, val = carve_val_split(train, config.data.val_split)
    record = {
        "dataset": dc.format,
        "root": str(root),
        "train": str(train.source),
        "val": str(val.source),
        "train_images": len(train.images),
        "val_images": len(val.images),
        "val_split": CARVED_VAL_SPLIT if test is not None else "val",
        "test": str(test.source) if test is not None else None,
        "test_images": len(test.images) if test is not None else None,
    }
    return DetectionData(train, val, (dc.height, dc.width), record, test)


def carve_val_split(train: DetectionDataset, count: int) -> tuple[DetectionDataset, DetectionDataset]:
    """(the rest, `count` training images) in file order, picked with the fixed DATA_SEED, never
    train.seed, so that every seed and method of a comparison selects on the same images.

    Raises:
        UsageError: `count` is not below the number of training images.
    """
    total = len(train.images)
    if count >= total:
        raise UsageError(
            f"config key data.val_split: {count} is not fewer than the {total} training images"
            f" ({train.source})"
        )
    carved = set(np.random.default_rng(DATA_SEED).choice(total, size=count, replace=False).tolist())
    rest = tuple(image for index, image in enumerate(train.images) if index not in carved)
    picked = tuple(image for index, image in enumerate(train.images) if index in carved)
    return dataclasses.replace(train, images=rest), dataclasses.replace(train, images=picked)


def build_data_once(config: Config, runtime: Runtime) -> DetectionData:
    """build_detection_data; under torchrun rank 0 first, and the other ranks once it is done, so
    that only rank 0 ever generates the embedded digits set (two writers would race for its folder).
    """
    if runtime.distributed and not runtime.is_main:
        dist.barrier()
    data = build_detection_data(config)
    if runtime.distributed and runtime.is_main:
        dist.barrier()
    return data


def check_detector_names(config: Config, *, teacher: bool) -> None:
    """Check student.arch (and teacher.arch) against the detectors known, before any work."""
    known = list_detectors()
    for key, name in (("student.arch", config.student.arch), ("teacher.arch", config.teacher.arch)):
        if key == "teacher.arch" and not teacher:
            continue
        if name not in known:
            raise UsageError(
                f"config key {key}: detector '{name}' is unknown; expected one of {', '.join(known)}"
            )


def create_detector(
    config: Config, arch: str, num_classes: int, weights: str | os.PathLike[str] | None
) -> Detector:
    """The detector `arch` for this config's image size and anchors, with a weights file if given."""
    dc = config.detection
    return build_detector(
        arch, num_classes, weights, image_size=(dc.height, dc.width), anchor_scale=dc.anchor_scale
    )


@torch.no_grad()
def evaluate_detector(
    detector: Detector, dataset: DetectionDataset, runtime: Runtime, batch_size: int = EVAL_BATCH_SIZE
) -> dict[str, float]:
    """COCO mAP@[.5:.95] and AP50 (percent) of `detector` on `dataset` in eval mode, and n images.

    Under DDP a collective: each rank detects on every world_size-th image, the detections are
    gathered, rank 0 scores the whole split once with COCOeval and every rank returns its numbers.
    """
    was_training = detector.training
    detector.eval()
    images = DetectionImages(dataset)
    mine = list(range(runtime.rank, len(images), runtime.world_size))
    found: list[Detections] = []
    for start in range(0, len(mine), batch_size):
        batch, _ = collate_detection([images[i] for i in mine[start : start + batch_size]])
        with runtime.autocast():
            outputs = detector([image.to(runtime.device) for image in batch])
        found.extend(
            Detections(
                boxes=output["boxes"].float().cpu().numpy(),
                scores=output["scores"].float().cpu().numpy(),
                labels=output["labels"].cpu().numpy(),
            )
            for output in outputs
        )
    detector.train(was_training)
    if not runtime.distributed:
        metrics = coco_metrics(dataset.images, found, dataset.num_classes)
        return {"map": 100.0 * metrics.map, "ap50": 100.0 * metrics.ap50, "n": len(found)}
    every = _gather_detections(found, mine, len(images), runtime)
    scores = torch.zeros(2, dtype=torch.float64, device=runtime.device)
    if runtime.is_main:
        metrics = coco_metrics(dataset.images, every, dataset.num_classes)
        scores[:] = torch.tensor([100.0 * metrics.map, 100.0 * metrics.ap50], dtype=torch.float64)
    dist.broadcast(scores, 0)
    return {"map": scores[0].item(), "ap50": scores[1].item(), "n": len(every)}


# A gathered detection's row: image index, x1, y1, x2, y2, score, class index. float64 holds the
# detector's float32 boxes and scores and the indices exactly.
_ROW_WIDTH = 7


def _gather_detections(
    found: list[Detections], indices: list[int], total: int, runtime: Runtime
) -> list[Detections]:
    """Every rank's detections (found[k] is image indices[k]'s), as one list over all `total` images
    in image order; a collective."""
    rows = [
        np.column_stack([np.full(len(d.scores), index), d.boxes, d.scores, d.labels])
        for index, d in zip(indices, found, strict=True)
    ]
    local = torch.from_numpy(np.concatenate(rows) if rows else np.zeros((0, _ROW_WIDTH)))
    local = local.to(runtime.device, torch.float64)
    counts = [torch.zeros(1, dtype=torch.int64, device=runtime.device) for _ in range(runtime.world_size)]
    dist.all_gather(counts, torch.tensor([len(local)], dtype=torch.int64, device=runtime.device))
    sizes = [int(count.item()) for count in counts]
    # all_gather moves tensors of one shape: pad every rank's rows to the longest (at least one row).
    padded = torch.zeros((max(*sizes, 1), _ROW_WIDTH), dtype=torch.float64, device=runtime.device)
    padded[: len(local)] = local
    gathered = [torch.empty_like(padded) for _ in sizes]
    dist.all_gather(gathered, padded)
    table = torch.cat([part[:size] for part, size in zip(gathered, sizes, strict=True)]).cpu().numpy()
    table = table[np.argsort(table[:, 0], kind="stable")]  # stable: each image keeps its score order
    bounds = np.searchsorted(table[:, 0], np.arange(total + 1))
    return [
        Detections(
            boxes=table[bounds[i] : bounds[i + 1], 1:5].astype(np.float32),
            scores=table[bounds[i] : bounds[i + 1], 5].astype(np.float32),
            labels=table[bounds[i] : bounds[i + 1], 6].astype(np.int64),
        )
        for i in range(total)
    ]


def _log(runtime: Runtime | None, message: str) -> None:
    """Print on rank 0 only (no runtime: a single process)."""
    if runtime is None or runtime.is_main:
        print(message, flush=True)


# ---------------------------------------------------------------------------------------------- run record


def _method_params(config: Config) -> dict[str, Any]:
    if config.method.name == TASKS[DETECTION].baseline_method:
        return {}
    return {"hcl_weight": config.method.hcl_weight, "warmup_epochs": config.method.warmup_epochs}


def write_detection_manifest(
    out_dir: Path,
    config: Config,
    data: DetectionData,
    role: str,
    teacher_record: dict[str, Any],
    best: dict[str, Any] | None,
) -> None:
    """(Re)write manifest.json: the task, classes, input size, data, the model(s) and their val mAP."""
    height, width = data.image_size
    # The detectors take RGB pixels in 0-1 and normalise them themselves.
    input_block = {
        "shape": [3, height, width],
        "layout": "NCHW",
        "dtype": "float32",
        "mean": [0.0, 0.0, 0.0],
        "std": [1.0, 1.0, 1.0],
        "resize": None,
    }
    run_data = RunData(list(data.classes), input_block, dict(data.record))
    record = {
        "arch": config.student.arch,
        "num_classes": data.num_classes,
        "anchor_scale": config.detection.anchor_scale,
    }
    params = _method_params(config)
    record_trained_model(out_dir, config, role, run_data, record, teacher_record, best, params)


def _write_best(
    out_dir: Path,
    config: Config,
    data: DetectionData,
    role: str,
    teacher_record: dict[str, Any],
    best: dict[str, Any],
) -> None:
    meta = {
        "arch": config.student.arch,
        "num_classes": str(data.num_classes),
        "role": role,
        "task": DETECTION,
    }
    save_weights(best["state"], out_dir / weights_file(role), meta)
    write_detection_manifest(out_dir, config, data, role, teacher_record, best)


# ------------------------------------------------------------------------------------------------ training


@dataclass
class _DetectionTrainer:
    """The live objects of one `fit_detector`, and their conversion to and from last.pt."""

    config: Config
    runtime: Runtime
    data: DetectionData
    distiller: Distiller
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    scaler: torch.amp.GradScaler
    steps_per_epoch: int
    out_dir: Path
    role: str
    teacher_record: dict[str, Any]
    best: dict[str, Any] | None = None
    model: nn.Module | None = None  # the distiller as the step runs it: wrapped for DDP under torchrun

    def snapshot(self, epoch: int) -> TrainState:
        return TrainState(
            epoch=epoch,
            step=0,
            aug_state=None,
            accum={},
            student=cpu_state(self.distiller.student),
            head=cpu_state(self.distiller.head),
            optimizer=self.optimizer.state_dict(),
            scheduler=self.scheduler.state_dict(),
            scaler=self.scaler.state_dict(),
            rng=capture_rng_state(),
            best=self.best,
            config=config_to_dict(self.config),
        )

    def restore(self, state: TrainState) -> None:
        self.distiller.student.load_state_dict(state.student)
        self.distiller.head.load_state_dict(state.head)
        self.optimizer.load_state_dict(state.optimizer)
        self.scheduler.load_state_dict(state.scheduler)
        load_scaler_state(self.scaler, state.scaler)
        restore_rng_state(state.rng)
        self.best = state.best

    def write_record(self) -> None:
        args = (self.out_dir, self.config, self.data, self.role, self.teacher_record)
        if self.best is not None:
            _write_best(*args, self.best)
        else:
            write_detection_manifest(*args, None)


def _build_trainer(
    config: Config,
    out_dir: Path,
    role: str,
    teacher: Detector | None,
    teacher_record: dict[str, Any],
    runtime: Runtime,
    data: DetectionData,
) -> _DetectionTrainer:
    # Same initial weights (student and ABF head) for a given seed on every rank.
    torch.manual_seed(config.train.seed)
    random.seed(config.train.seed)
    np.random.seed(config.train.seed % (1 << 32))
    student = create_detector(config, config.student.arch, data.num_classes, config.student.weights)
    distiller: Distiller
    if teacher is None:
        distiller = PlainDetection(student)
    else:
        distiller = DetectionReviewKD(student, teacher, data.image_size, hcl_weight=config.method.hcl_weight)
    distiller.to(runtime.device)
    params = [p for p in [*distiller.student.parameters(), *distiller.head.parameters()] if p.requires_grad]
    optimizer = make_optimizer(config, params)
    steps = math.ceil(_share_size(len(data.train.images), runtime) / config.train.batch_size)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(config, s, steps))
    scaler = torch.amp.GradScaler("cuda", enabled=runtime.amp_dtype == torch.float16)
    return _DetectionTrainer(
        config, runtime, data, distiller, optimizer, scheduler, scaler, steps, out_dir, role, teacher_record
    )


def _share_size(images: int, runtime: Runtime) -> int:
    """The training images each rank takes per epoch: all of them in one process; under DDP an equal
    share, so every rank runs the same steps (the last world_size - 1 of an epoch's order may wait
    for the next epoch's).

    Raises:
        UsageError: fewer training images than ranks.
    """
    if images < runtime.world_size:
        raise UsageError(
            f"the detection train split has {images} images, fewer than the {runtime.world_size}"
            " torchrun processes; launch fewer processes"
        )
    return images // runtime.world_size


def _wrap_model(trainer: _DetectionTrainer) -> nn.Module:
    """The distiller as the training step calls it: under DDP (train.sync_batchnorm and
    train.find_unused_parameters as for classification), else as it is."""
    runtime, tc = trainer.runtime, trainer.config.train
    if not runtime.distributed:
        return trainer.distiller
    if tc.sync_batchnorm:
        # In place below the top level: the parameters stay the ones the optimizer holds.
        nn.SyncBatchNorm.convert_sync_batchnorm(trainer.distiller.student)
        nn.SyncBatchNorm.convert_sync_batchnorm(trainer.distiller.head)
    return nn.parallel.DistributedDataParallel(
        trainer.distiller,
        device_ids=[runtime.device.index] if runtime.device.type == "cuda" else None,
        find_unused_parameters=tc.find_unused_parameters,
    )


def _train_epoch(
    trainer: _DetectionTrainer, epoch: int, images: DetectionImages
) -> tuple[dict[str, float], int, float]:
    """One epoch in the (seed, epoch) order, this rank's strided share of it; the loss terms summed
    over the images of all ranks, their count, seconds."""
    config, runtime, distiller = trainer.config, trainer.runtime, trainer.distiller
    batch_size, spe = config.train.batch_size, trainer.steps_per_epoch
    assert trainer.model is not None
    images.set_epoch(epoch)
    order = np.random.default_rng((config.train.seed, epoch)).permutation(len(images))
    share = order[runtime.rank :: runtime.world_size][: _share_size(len(images), runtime)]
    distiller.train()
    sums: dict[str, float] = {}
    seen = 0
    started = time.perf_counter()
    for step in range(spe):
        batch, targets = collate_detection(
            [images[int(i)] for i in share[step * batch_size : (step + 1) * batch_size]]
        )
        device = runtime.device
        batch = [image.to(device) for image in batch]
        targets = [{key: value.to(device) for key, value in target.items()} for target in targets]
        distiller.distill_scale = distill_scale(config, epoch * spe + step, spe)
        with runtime.autocast():
            out = trainer.model(batch, targets)
        if not all_ranks_finite(list(out.values()), runtime):
            parts = ", ".join(f"{key}={float(value.detach().float()):.4g}" for key, value in out.items())
            raise TrainingDivergedError(
                f"epoch {epoch + 1} step {step + 1}: the loss is not finite (rank {runtime.rank}: {parts});"
                f" {trainer.out_dir / CHECKPOINT_FILE} keeps the last completed epoch ({epoch});"
                " lower optim.lr or method.hcl_weight"
            )
        losses = {key: float(value.detach().float()) for key, value in out.items()}
        trainer.optimizer.zero_grad(set_to_none=True)
        trainer.scaler.scale(out["loss"].float()).backward()
        trainer.scaler.step(trainer.optimizer)
        trainer.scaler.update()
        trainer.scheduler.step()
        for key, value in losses.items():
            sums[key] = sums.get(key, 0.0) + value * len(batch)
        seen += len(batch)
    seconds = time.perf_counter() - started
    if not runtime.distributed:
        return sums, seen, seconds
    names = sorted(sums)
    values = [sums[name] for name in names] + [float(seen)]
    packed = torch.tensor(values, dtype=torch.float64, device=runtime.device)
    dist.all_reduce(packed)
    totals = packed.tolist()
    return dict(zip(names, totals[:-1], strict=True)), int(totals[-1]), seconds


def _end_epoch(
    trainer: _DetectionTrainer, epoch: int, sums: dict[str, float], seen: int, seconds: float
) -> None:
    """Validate (every train.eval_every epochs and the last), then metrics line, last.pt, best weights
    (rank 0 alone writes and prints)."""
    config, runtime = trainer.config, trainer.runtime
    if runtime.distributed:
        # Each rank's last forward updated its own BatchNorm statistics: take rank 0's, which are
        # the ones saved, so that validation scores the weights written to disk.
        for buffer in trainer.distiller.student.buffers():
            dist.broadcast(buffer, 0)
    record: dict[str, Any] = {"epoch": epoch + 1}
    record.update({key: value / max(seen, 1) for key, value in sums.items()})
    val: dict[str, float] | None = None
    if validates_epoch(config, epoch):
        started = time.perf_counter()
        assert isinstance(trainer.distiller.student, Detector)
        val = evaluate_detector(trainer.distiller.student, trainer.data.val, runtime)
        record.update(val_map=val["map"], val_ap50=val["ap50"], val_time_s=time.perf_counter() - started)
    record.update(
        lr=trainer.optimizer.param_groups[0]["lr"],
        distill_scale=trainer.distiller.distill_scale,
        images_per_s=seen / max(seconds, 1e-9),
        epoch_time_s=seconds,
        time=time.time(),
    )
    # NaN (no ground truth in val) never compares greater, so such an epoch is never the best.
    improved = val is not None and (trainer.best is None or val["map"] > trainer.best["map"])
    if val is not None and improved:
        model = trainer.distiller.student.get_submodule("model")
        trainer.best = {"map": val["map"], "ap50": val["ap50"], "epoch": epoch + 1, "state": cpu_state(model)}
    if not runtime.is_main:
        return
    append_metrics(trainer.out_dir / METRICS_FILE, record)
    save_checkpoint(trainer.out_dir / CHECKPOINT_FILE, trainer.snapshot(epoch + 1))
    if improved:
        trainer.write_record()
    scores = f"val mAP {val['map']:.2f} AP50 {val['ap50']:.2f} " if val is not None else ""
    _log(
        runtime,
        f"{trainer.role} epoch {epoch + 1}/{config.train.epochs}: loss {record['loss']:.4f} {scores}"
        f"({record['images_per_s']:.1f} img/s, {seconds:.1f}s)",
    )


def fit_detector(
    config: Config,
    out_dir: Path,
    *,
    role: str = "student",
    teacher: Detector | None = None,
    teacher_record: dict[str, Any] | None = None,
    resume: bool = False,
    runtime: Runtime | None = None,
    data: DetectionData | None = None,
) -> Path:
    """Train config.student.arch (PlainDetection, or DetectionReviewKD against `teacher`) into out_dir.

    `role` "teacher" names the result teacher.safetensors and records it as the manifest's teacher.
    Returns the path of the best weights file.

    Raises:
        UsageError: an existing run without resume, an incompatible resume, bad data or detectors.
        TrainingDivergedError: a NaN or infinite loss on any rank (last.pt keeps the last completed
            epoch).
    """
    if runtime is None:
        with runtime_session(config) as session:
            return fit_detector(
                config,
                out_dir,
                role=role,
                teacher=teacher,
                teacher_record=teacher_record,
                resume=resume,
                runtime=session,
                data=data,
            )
    out_dir = Path(out_dir)
    teacher_record = teacher_record or {"arch": None, "sha256": None, "map": None, "ap50": None}
    check_run_dir(out_dir, config, resume, role)
    data = data or build_data_once(config, runtime)
    trainer = _build_trainer(config, out_dir, role, teacher, teacher_record, runtime, data)
    start_epoch = 0
    checkpoint = out_dir / CHECKPOINT_FILE
    if resume and checkpoint.is_file():
        state = load_checkpoint(checkpoint)
        trainer.restore(state)
        start_epoch = state.epoch
        _log(runtime, f"{role}: resuming {out_dir} after epoch {start_epoch}")
    if runtime.is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
        save_config(config, out_dir / run_layout.CONFIG)
        truncate_metrics(out_dir / METRICS_FILE, start_epoch)
        trainer.write_record()
    trainer.model = _wrap_model(trainer)
    dc = config.detection
    augment = BoxAugment(flip_probability=dc.flip_probability, min_scale=dc.min_scale, max_scale=dc.max_scale)
    images = DetectionImages(data.train, augment, seed=config.train.seed)
    for epoch in range(start_epoch, config.train.epochs):
        sums, seen, seconds = _train_epoch(trainer, epoch, images)
        _end_epoch(trainer, epoch, sums, seen, seconds)
    if data.test is not None and trainer.best is not None:
        _score_test(trainer, data.test)
    if runtime.distributed:
        dist.barrier()
    return out_dir / weights_file(role)


def _score_test(trainer: _DetectionTrainer, test: DetectionDataset) -> None:
    """Score the kept weights on the test split once, after training, and record it in the manifest.

    Only runs that carved their val split (data.val_split) have a test split apart: every choice read
    the val split, so this number is read by nothing that chooses. Every rank takes part (a
    collective under DDP); rank 0 writes.
    """
    assert trainer.best is not None
    kept = copy.deepcopy(trainer.distiller.student)
    assert isinstance(kept, Detector)
    kept.get_submodule("model").load_state_dict(trainer.best["state"])
    scores = evaluate_detector(kept, test, trainer.runtime)
    if trainer.runtime.is_main:
        record_test_scores(trainer.out_dir, DETECTION, trainer.role, TEST_SPLIT, scores)
    _log(
        trainer.runtime,
        f"{trainer.role}: test split {TEST_SPLIT} ({scores['n']} images), scored once with the"
        f" epoch-{trainer.best['epoch']} weights: mAP {scores['map']:.2f} AP50 {scores['ap50']:.2f}",
    )


# -------------------------------------------------------------------------------------------------- stages


@locks_run("teacher", run_arg="out_dir", create=True)
def train_detection_teacher(
    config: Config,
    out_dir: str | os.PathLike[str],
    *,
    resume: bool = False,
    runtime: Runtime | None = None,
    data: DetectionData | None = None,
) -> Path:
    """Train the teacher detector alone into out_dir; return out_dir/teacher.safetensors.

    teacher.epochs and teacher.lr replace train.epochs and optim.lr (teacher_training_config); a
    finished teacher run of the same config in out_dir is reused as it is.
    """
    out = Path(out_dir)
    derived = teacher_training_config(config)
    check_detector_names(derived, teacher=False)
    if teacher_is_complete(out, derived):
        _log(runtime, f"teacher: reusing the finished run in {out}")
        return out / weights_file("teacher")
    return fit_detector(derived, out, role="teacher", resume=resume, runtime=runtime, data=data)


def load_detection_teacher(
    config: Config, out_dir: Path, data: DetectionData, runtime: Runtime, *, resume: bool
) -> tuple[Detector, dict[str, Any]]:
    """The frozen teacher detector and its manifest record (arch, weights, sha256, val mAP and AP50,
    and with data.val_split its test split's scores as "test").

    Without teacher.weights a teacher is trained first into out_dir/teacher/. Its scores are measured
    here (or taken from the run's manifest when it already recorded the same weights).
    """
    if config.teacher.weights:
        weights = Path(config.teacher.weights)
        if not weights.is_file():
            raise UsageError(f"config key teacher.weights: {weights} does not exist")
    else:
        weights = train_detection_teacher(
            config, out_dir / TEACHER_SUBDIR, resume=resume, runtime=runtime, data=data
        )
    digest = sha256_file(weights)
    teacher = create_detector(config, config.teacher.arch, data.num_classes, weights).to(runtime.device)
    teacher.eval()
    record: dict[str, Any] = {"arch": config.teacher.arch, "weights": str(weights), "sha256": digest}
    manifest_file = run_layout.run_path(out_dir, run_layout.MANIFEST)
    previous = read_manifest(out_dir).get("teacher", {}) if manifest_file.is_file() else {}
    same = previous.get("sha256") == digest
    if same and previous.get("map") is not None:
        record.update(map=previous["map"], ap50=previous["ap50"])
    else:
        scores = evaluate_detector(teacher, data.val, runtime)
        record.update(map=scores["map"], ap50=scores["ap50"])
    if data.test is not None:
        if same and previous.get("test") is not None:
            record["test"] = previous["test"]
        else:
            scores = evaluate_detector(teacher, data.test, runtime)
            metrics = {key: scores[key] for key, _ in TASKS[DETECTION].model_metrics}
            record["test"] = {"split": TEST_SPLIT, "n": scores["n"], **metrics}
    _log(runtime, f"teacher {config.teacher.arch}: val mAP {record['map']:.2f} AP50 {record['ap50']:.2f}")
    return teacher, record


@locks_run("distill", run_arg="out_dir", create=True)
def distill_detector(config: Config, out_dir: str | os.PathLike[str], *, resume: bool = False) -> Path:
    """Train the student detector with config.method into out_dir; return out_dir/student.safetensors.

    method "plain" trains it alone; "reviewkd" distils it from the teacher (teacher.weights, or one
    trained first into out_dir/teacher/, reused when that run is already finished).
    """
    out = Path(out_dir)
    plain = config.method.name == TASKS[DETECTION].baseline_method
    check_detector_names(config, teacher=not plain)
    check_run_dir(out, config, resume, "student")
    with runtime_session(config) as runtime:
        data = build_data_once(config, runtime)
        teacher, record = None, None
        if not plain:
            teacher, record = load_detection_teacher(config, out, data, runtime, resume=resume)
        return fit_detector(
            config,
            out,
            role="student",
            teacher=teacher,
            teacher_record=record,
            resume=resume,
            runtime=runtime,
            data=data,
        )
