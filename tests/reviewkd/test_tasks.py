"""The task registry (deploy.tasks, reviewkd.tasks), the config's `task`, and detection training end to
end on a tiny embedded digits set: `reviewkd run`, the run directory it writes, and resume."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from deploy import run_layout
from deploy.errors import UsageError
from deploy.manifest import new_manifest, read_manifest
from deploy.task_serving import SERVING
from deploy.tasks import CLASSIFICATION, DETECTION, TASKS, task_of
from reviewkd.app.cli import main
from reviewkd.checkpoint import load_checkpoint
from reviewkd.config import Config, load_config
from reviewkd.detection import engine as detection_engine
from reviewkd.detection.models import build_detector
from reviewkd.run_record import read_metrics
from reviewkd.tasks import TRAINING_TASKS, training_task

# The embedded detection default at its smallest: 8 train and 4 val canvases, batches of 4, one epoch,
# selecting on the held-out canvases (the default carves 128 of its 640 training canvases).
TINY_DETECTION = [
    "data.val_split=null",
    "detection.digits_train_images=8",
    "detection.digits_val_images=4",
    "train.batch_size=4",
    "train.epochs=1",
    "train.eval_every=1",
    "train.device=cpu",
]


def tiny_detection(data_root: Path, *extra: str) -> list[str]:
    return ["--config", "digits_detection", f"data.root={data_root}", *TINY_DETECTION, *extra]


# ---- the registry and the config


def test_every_task_has_exactly_one_training_side() -> None:
    assert TRAINING_TASKS.keys() == TASKS.keys()
    for name, task in TRAINING_TASKS.items():
        assert task.spec is TASKS[name]
        assert task.spec.baseline_method in task.spec.methods
        assert task.spec.model_metrics[0] == (task.spec.metric_key, task.spec.metric_label)


def test_a_manifest_without_a_task_is_a_classification_run() -> None:
    assert task_of(new_manifest()).name == CLASSIFICATION
    assert task_of({**new_manifest(), "task": "detection"}).name == DETECTION
    with pytest.raises(UsageError, match="manifest: task: 'segmentation' is not one of"):
        task_of({**new_manifest(), "task": "segmentation"})


def test_the_config_names_its_task() -> None:
    assert Config().task == load_config("digits").task == CLASSIFICATION
    detection = load_config("digits_detection")
    assert detection.task == DETECTION and training_task(detection) is TRAINING_TASKS[DETECTION]
    assert detection.student.arch == "fcos_small_student" and detection.method.name == "reviewkd"
    with pytest.raises(UsageError, match="config key task: 'segmentation' is not one of"):
        load_config("digits", ["task=segmentation"])
    # Each task has its own methods: the detection baseline is "plain", classification's is "ce".
    with pytest.raises(UsageError, match=r"config key method\.name: 'plain' is not one of ce, kd"):
        load_config("digits", ["method.name=plain"])
    with pytest.raises(UsageError, match=r"config key method\.name: 'ce' is not one of plain, reviewkd"):
        load_config("digits_detection", ["method.name=ce"])
    with pytest.raises(UsageError, match=r"detection\.min_scale and detection\.max_scale"):
        load_config("digits_detection", ["detection.min_scale=1.5"])
    with pytest.raises(UsageError, match=r"config key train\.ema_decay: not available for task detection"):
        load_config("digits_detection", ["train.ema_decay=0.9"])


def test_the_coco_config_mirrors_the_paper_and_is_valid() -> None:
    config = load_config("coco_fasterrcnn_r50_mobilenetv3", ["data.root=coco"])
    assert config.task == DETECTION and config.detection.format == "coco"
    assert config.teacher.arch.startswith("torchvision:fasterrcnn") and config.method.name == "reviewkd"
    # Both detection configs choose epochs on a split carved from their training images.
    assert config.data.val_split == 5000 and load_config("digits_detection").data.val_split == 128


# ---- detection training end to end


@pytest.fixture(scope="module", name="run")
def detection_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`reviewkd run --config digits_detection` on the tiny set: teacher, ReviewKD and plain students."""
    folder = tmp_path_factory.mktemp("detection")
    run = folder / "run"
    assert main(["run", "--out", str(run), *tiny_detection(folder / "data")]) == 0
    return run


def test_a_detection_run_trains_teacher_reviewkd_and_plain(
    run: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    manifest = read_manifest(run)
    assert manifest["task"] == DETECTION
    assert manifest["classes"] == [str(digit) for digit in range(10)]
    assert manifest["input"]["shape"] == [3, 64, 96]
    assert manifest["method"]["name"] == "reviewkd"
    student, teacher = manifest["student"], manifest["teacher"]
    assert (student["arch"], teacher["arch"]) == ("fcos_small_student", "fcos_small_teacher")
    for block in (student, teacher, manifest["baselines"]["plain"]):
        assert 0.0 <= block["map"] <= block["ap50"] <= 100.0
        assert len(block["sha256"]) == 64
    assert manifest["artifacts"][run_layout.STUDENT_WEIGHTS]["sha256"] == student["sha256"]
    teacher_manifest = read_manifest(run / run_layout.TEACHER_DIR)
    assert teacher_manifest["task"] == DETECTION and teacher_manifest["method"]["name"] == "plain"
    # The bare student: exactly the torchvision model's own weights, which build_detector loads
    # strictly; nothing of the ABF chain that trained beside it.
    weights = load_file(str(run / run_layout.STUDENT_WEIGHTS))
    fresh = build_detector("fcos_small_student", 10, run / run_layout.STUDENT_WEIGHTS, anchor_scale=0.5)
    assert weights.keys() == fresh.model.state_dict().keys()
    # metrics.jsonl: the detector's losses, HCL for ReviewKD only, val mAP on every scored epoch.
    (distilled,) = read_metrics(run / run_layout.METRICS)
    (plain,) = read_metrics(run / run_layout.BASELINE_DIR / run_layout.METRICS)
    losses = {"loss", "detection", "classification", "bbox_regression"}
    for record in (distilled, plain):
        assert losses | set(TASKS[DETECTION].val_metric_keys) <= set(record)
    assert "hcl" in distilled and "hcl" not in plain
    assert load_checkpoint(run / run_layout.CHECKPOINT).epoch == 1


def test_a_detection_run_ends_with_the_deployment_report_of_validate_s_numbers(run: Path) -> None:
    """Issue 19's "Done when": mAP per format with intervals, the parity and gate verdicts, per-class
    AP, the curves and the example grid (teacher, student fp32, student int8), each read from
    validate.json, in report.json and report.md."""
    pipeline = json.loads((run / run_layout.PIPELINE).read_text())
    assert list(pipeline) == ["distill", "baseline", "export", "validate", "bench", "report"]
    manifest = read_manifest(run)
    assert manifest["artifacts"][run_layout.onnx_file("int8")]["kind"] == "onnx"
    validated = json.loads((run / run_layout.VALIDATE_RESULT).read_text())
    benched = json.loads((run / run_layout.BENCH_RESULT).read_text())
    report = json.loads((run / run_layout.REPORT_JSON).read_text())
    markdown = (run / run_layout.REPORT_MARKDOWN).read_text()
    assert report["task"] == DETECTION and validated["passed"]
    gain = manifest["student"]["map"] - manifest["baselines"]["plain"]["map"]
    assert report["distillation"]["gain_points"] == pytest.approx(gain)
    formats = [key for key in validated["results"] if key.startswith("onnxruntime/")]
    assert {"onnxruntime/fp32", "onnxruntime/int8"} <= set(formats)
    assert set(benched["results"]) == set(formats)
    map_section = markdown.split("## Detection: mAP per format")[1].split("\n## ")[0]
    for key in formats:
        measured, shown = validated["results"][key], report[key]
        assert shown["status"] == "ok" and shown["validate"]["status"] == "ok", key
        assert shown["accuracy"] == measured["accuracy"] and shown["gates"] == measured["gates"], key
        assert shown["size_bytes"] == manifest["artifacts"][measured["file"]]["size_bytes"] > 0
        accuracy = shown["accuracy"]
        assert len(accuracy["per_class_ap"]) == len(manifest["classes"])
        assert len(accuracy["curves"]["recall"]) == 101 and accuracy["curves"]["precision"]
        assert shown["latency"] == benched["results"][key]["latency"], key
        row = next(line for line in map_section.splitlines() if line.startswith(f"| {key} "))
        assert f" {accuracy['map']:.2f} " in row and f" {accuracy['ap50']:.2f} " in row, row
        if key != "onnxruntime/fp32":
            low, high = accuracy["map_drop_interval"]
            assert f"{accuracy['map_drop']:.2f} [{low:.2f}, {high:.2f}]" in row
            assert "max_map_drop" in {check["gate"] for check in shown["gates"]}
    fp32 = report["onnxruntime/fp32"]
    assert fp32["parity"] == validated["results"]["onnxruntime/fp32"]["parity"]
    assert fp32["parity"]["box_matched"] == 100.0 and "min_box_parity pass" in markdown
    examples = report["validation"]["examples"]
    assert examples == validated["examples"] and examples["images"]
    assert set(examples["detections"]) == {"teacher", "onnxruntime/fp32", "onnxruntime/int8"}
    for per_image in examples["detections"].values():
        assert len(per_image) == len(examples["images"])
    for heading in ("Detection: mAP per format", "Detection: AP per class", "Detection: examples"):
        assert f"## {heading}" in markdown
    for plot in ("pr_curves.png", "detection_examples.png"):
        assert f"]({plot})" in markdown and (run / run_layout.REPORT_DIR / plot).stat().st_size > 0
    assert (run / run_layout.REPORT_HTML).is_file()


@pytest.mark.parametrize("val_split", [[], ["data.val_split=2"]], ids=["heldout", "carved"])
def test_a_resumed_detection_run_ends_where_an_uninterrupted_one_does(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], val_split: list[str]
) -> None:
    data = tmp_path / "data"
    two_epochs = [*tiny_detection(data, "method.name=plain", *val_split), "train.epochs=2"]
    whole, cut = tmp_path / "whole", tmp_path / "cut"
    assert main(["distill", "--out", str(whole), *two_epochs]) == 0

    real_end_epoch = detection_engine._end_epoch

    def end_then_stop(trainer: object, epoch: int, *args: object) -> None:
        real_end_epoch(trainer, epoch, *args)  # type: ignore[arg-type]
        if epoch == 0:
            raise KeyboardInterrupt

    monkeypatch.setattr(detection_engine, "_end_epoch", end_then_stop)
    assert main(["distill", "--out", str(cut), *two_epochs]) == 130
    assert [record["epoch"] for record in read_metrics(cut / run_layout.METRICS)] == [1]
    monkeypatch.setattr(detection_engine, "_end_epoch", real_end_epoch)
    capsys.readouterr()
    assert main(["distill", "--out", str(cut), "--resume", *two_epochs]) == 0
    assert "resuming" in capsys.readouterr().out

    assert [record["epoch"] for record in read_metrics(cut / run_layout.METRICS)] == [1, 2]
    finished, reference = (
        load_checkpoint(cut / run_layout.CHECKPOINT),
        load_checkpoint(whole / run_layout.CHECKPOINT),
    )
    assert finished.epoch == reference.epoch == 2
    for key, value in reference.student.items():
        assert torch.equal(finished.student[key], value), key
    best_weights = [(run / run_layout.STUDENT_WEIGHTS).read_bytes() for run in (cut, whole)]
    assert best_weights[0] == best_weights[1]
    # With a carved val split, the test split is scored once the resumed run has finished too.
    students = [read_manifest(run)["student"] for run in (cut, whole)]
    assert students[0].get("test") == students[1].get("test")
    assert ("test" in students[0]) == bool(val_split)


def test_a_detection_run_without_resume_is_refused(run: Path, capsys: pytest.CaptureFixture[str]) -> None:
    args = tiny_detection(run.parent / "data", "method.name=plain")
    assert main(["distill", "--out", str(run / run_layout.BASELINE_DIR), *args]) == 2
    assert "already holds a training run" in capsys.readouterr().err


def test_reviewkd_report_on_a_detection_run_writes_its_deployment_report(
    run: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (run / run_layout.REPORT_JSON).unlink()
    capsys.readouterr()
    assert main(["report", str(run)]) == 0
    out = capsys.readouterr().out
    assert "mAP %" in out and "drop [95% CI]" in out and "onnxruntime/int8" in out
    report = json.loads((run / run_layout.REPORT_JSON).read_text())
    assert report["task"] == DETECTION and report["validation"]["examples"]


def test_a_finished_detection_teacher_is_reused(run: Path, capsys: pytest.CaptureFixture[str]) -> None:
    teacher = run / run_layout.TEACHER_DIR
    before = (teacher / run_layout.TEACHER_WEIGHTS).read_bytes()
    capsys.readouterr()
    assert main(["teacher", "--out", str(teacher), *tiny_detection(run.parent / "data")]) == 0
    assert "reusing the finished run" in capsys.readouterr().out
    assert (teacher / run_layout.TEACHER_WEIGHTS).read_bytes() == before


def test_every_task_has_its_edge_side() -> None:
    assert set(SERVING) == set(TASKS)
