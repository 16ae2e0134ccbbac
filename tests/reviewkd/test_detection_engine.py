"""Detection training beyond one plain process: DDP under torchrun (two gloo processes on the CPU),
the detections gathered across ranks before COCOeval, AMP reaching the detector's forward, and
honest selection (data.val_split: the best epoch on a carved val split, the test split scored once).

Two ranks do not reproduce one process at the doubled batch, and no test claims it: torchvision's
FCOS divides its losses by the foreground locations of each rank's batch, and BatchNorm normalises
by each rank's statistics. What DDP guarantees is what is held here: the ranks train as one
(rank 0's files, every image of the epoch once, the steps of an equal share), and the val mAP they
record is COCOeval's over the whole split, the number one process gets for the same weights.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, cast

import pytest
import torch
import torch.multiprocessing as mp
from torch import nn

from benchmarks.detection import validation_records
from deploy import run_layout
from deploy.manifest import read_manifest
from reviewkd.app.cli import main
from reviewkd.checkpoint import load_checkpoint
from reviewkd.config import load_config
from reviewkd.detection.data import read_rgb
from reviewkd.detection.engine import DetectionData, build_detection_data, create_detector, evaluate_detector
from reviewkd.detection.models import Detector
from reviewkd.run_record import read_metrics
from reviewkd.runtime import Runtime, runtime_session
from tests.helpers import free_port, launch_ranks
from tests.reviewkd.test_tasks import TINY_DETECTION, tiny_detection


class _ShiftedOracle(nn.Module):
    """Stands in for a Detector in eval mode: each image's ground-truth boxes, shifted right by
    (its index % 4) pixels, so the mAP is neither 0 nor 100 and depends on every image's detections
    reaching COCOeval with its own image."""

    def __init__(self, data: DetectionData) -> None:
        super().__init__()
        # The images are distinct random canvases: their pixel sums tell them apart.
        self.by_sum = {
            round(float(image.sum()), 3): (index, record)
            for index, record in enumerate(data.val.images)
            for image in [read_rgb(record.file)]
        }

    def forward(self, images: list[torch.Tensor]) -> list[dict[str, torch.Tensor]]:
        found = []
        for image in images:
            index, record = self.by_sum[round(float(image.sum()), 3)]
            boxes = torch.from_numpy(record.boxes.copy())
            boxes[:, 0::2] += index % 4
            scores = torch.full((len(boxes),), 0.9)
            found.append({"boxes": boxes, "scores": scores, "labels": torch.from_numpy(record.labels.copy())})
        return found


def _oracle(data: DetectionData) -> Detector:
    """evaluate_detector only calls its detector on a list of images in eval mode."""
    return cast(Detector, _ShiftedOracle(data))


def _tiny_config(data_root: Path, *extra: str) -> Any:
    return load_config("digits_detection", [f"data.root={data_root}", *TINY_DETECTION, *extra])


def _gather_worker(rank: int, port: int, data_root: Path, results: Path) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE="2", RANK=str(rank))
    config = _tiny_config(data_root, "train.threads=1")
    with runtime_session(config) as runtime:
        data = build_detection_data(config)
        scores = evaluate_detector(_oracle(data), data.val, runtime, batch_size=1)
    (results / f"rank{rank}").write_text(f"{scores['map']!r} {scores['ap50']!r} {scores['n']}")


@pytest.mark.slow
def test_two_ranks_score_the_whole_val_split_as_one_process_does(tmp_path: Path) -> None:
    data_root = tmp_path / "data"
    config = _tiny_config(data_root)
    data = build_detection_data(config)  # generated once, before the ranks read it
    alone = evaluate_detector(_oracle(data), data.val, Runtime(torch.device("cpu")))
    assert 0.0 < alone["map"] < 100.0 and alone["n"] == len(data.val.images)
    worker_args = (free_port(), data_root, tmp_path)
    mp.start_processes(_gather_worker, args=worker_args, nprocs=2, start_method="spawn")
    for rank in range(2):
        assert (tmp_path / f"rank{rank}").read_text() == f"{alone['map']!r} {alone['ap50']!r} {alone['n']}"


@pytest.mark.slow
def test_two_rank_gloo_detection_distill_trains_teacher_and_student_once(tmp_path: Path) -> None:
    out = tmp_path / "run"
    args = tiny_detection(tmp_path / "data", "train.threads=1", "train.batch_size=2", "train.epochs=2")
    results = launch_ranks("distill", "--out", out, *args, "teacher.epochs=1")
    for rank, result in enumerate(results):
        assert result.returncode == 0, f"rank {rank}: {result.stderr[-2000:]}"
    assert "student epoch 2/2" in results[0].stdout and results[1].stdout.strip() == ""  # rank 0 prints
    # 8 train canvases over 2 ranks: 4 each, 2 steps of 2 per epoch (one process: 4 steps of 2).
    assert load_checkpoint(out / run_layout.CHECKPOINT).scheduler["last_epoch"] == 4
    assert load_checkpoint(out / run_layout.TEACHER_DIR / run_layout.CHECKPOINT).scheduler["last_epoch"] == 2
    records = read_metrics(out / run_layout.METRICS)
    assert [record["epoch"] for record in records] == [1, 2]
    assert all(0.0 <= record["val_map"] <= 100.0 and record["hcl"] >= 0.0 for record in records)
    manifest = read_manifest(out)
    assert manifest["teacher"]["map"] is not None and manifest["student"]["map"] is not None
    assert len(manifest["student"]["sha256"]) == 64


@pytest.mark.parametrize(("amp", "expected"), [("none", torch.float32), ("bf16", torch.bfloat16)])
def test_train_amp_reaches_the_detectors_forward(tmp_path: Path, amp: str, expected: torch.dtype) -> None:
    seen: set[torch.dtype] = set()

    def record(module: nn.Module, _inputs: Any, output: Any) -> None:
        if isinstance(module, nn.Conv2d) and module.training:
            seen.add(output.dtype)

    handle = nn.modules.module.register_module_forward_hook(record)
    try:
        args = tiny_detection(tmp_path / "data", "method.name=plain", f"train.amp={amp}")
        assert main(["distill", "--out", str(tmp_path / "run"), *args]) == 0
    finally:
        handle.remove()
    assert seen == {expected}  # every convolution of the training forward ran in the AMP dtype
    (record_line,) = read_metrics(tmp_path / "run" / run_layout.METRICS)
    assert torch.isfinite(torch.tensor(record_line["loss"])) and "val_map" in record_line


def test_a_carved_val_split_selects_and_the_test_split_is_scored_once_at_the_end(tmp_path: Path) -> None:
    run, data_root = tmp_path / "run", tmp_path / "data"
    assert main(["run", "--out", str(run), *tiny_detection(data_root, "data.val_split=2")]) == 0
    manifest = read_manifest(run)
    data = manifest["data"]
    assert (data["val_split"], data["train_images"], data["val_images"], data["test_images"]) == (
        "train-holdout",
        6,
        2,
        4,
    )
    # The best epoch is chosen on the carved split; the test split is read only for the kept weights.
    records = read_metrics(run / run_layout.METRICS)
    student = manifest["student"]
    assert student["map"] == max(record["val_map"] for record in records)
    assert not any(key.startswith("test") for record in records for key in record)
    test = student["test"]
    assert (test["split"], test["n"]) == ("heldout", 4) and set(test) == {"split", "n", "map", "ap50"}
    config = _tiny_config(data_root, "data.val_split=2")
    held_out = build_detection_data(config).held_out
    kept = create_detector(config, config.student.arch, 10, run / run_layout.STUDENT_WEIGHTS)
    assert test["map"] == evaluate_detector(kept, held_out, Runtime(torch.device("cpu")))["map"]
    # What validate and bench check an exported detector on: the test split, not the training file.
    assert [record.file for record in validation_records(run, manifest)] == [r.file for r in held_out.images]
    # The teacher and the plain baseline are scored on the same test split, and the report states it.
    teacher, plain = manifest["teacher"], manifest["baselines"]["plain"]
    assert teacher["test"]["n"] == plain["test"]["n"] == 4
    report = json.loads((run / run_layout.REPORT_JSON).read_text())
    assert report["run"]["teacher"]["score"] == teacher["test"]["map"]
    assert report["run"]["student"]["score"] == test["map"]
    distillation = report["distillation"]
    scores = (distillation["student_score"], distillation["baseline_score"])
    assert scores == (test["map"], plain["test"]["map"])
