"""The report of a detection run: mAP per format with its interval, per-class AP, precision-recall
curves and the example grid, from a validate.json laid out as benchmarks.report.detection reads it."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from benchmarks.report import VALIDATE_FILE, build_report, format_final_table, write_report
from benchmarks.report.detection import (
    EXAMPLES_PLOT,
    EXAMPLES_RULE,
    MAX_EXAMPLE_IMAGES,
    PR_CURVES_PLOT,
    Example,
    choose_examples,
    class_accuracy,
    examples_block,
    per_class_table,
)
from benchmarks.report.results import STAGE_SCHEMA_VERSIONS
from benchmarks.report.tasks import REPORT_TASKS
from deploy.detection.bootstrap import match_images
from deploy.detection.coco_metric import coco_metrics
from deploy.detection.outputs import Detections as FileDetections
from deploy.manifest import InputSpec, read_manifest, write_manifest
from deploy.tasks import TASKS
from tests.helpers import DETECTION_CLASSES, DETECTION_INPUT_SHAPE, make_detection_run

pytest.importorskip("pycocotools")
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
STUDENT_SHA = "5" * 64


class Truth:
    """One image's ground truth, as coco_metrics reads it."""

    def __init__(self, boxes: list[list[float]], labels: list[int]) -> None:
        self.boxes = np.array(boxes, dtype=np.float32).reshape(-1, 4)
        self.labels = np.array(labels, dtype=np.int64)
        self.crowd = np.zeros(len(labels), dtype=bool)


def _metrics_accuracy(shift: float) -> dict[str, Any]:
    """A format's accuracy block measured for real by coco_metrics on three images: boxes moved by
    `shift` pixels from the truth score lower."""
    from deploy.detection.coco_metric import Detections

    truth = [Truth([[2, 2, 20, 20]], [0]), Truth([[5, 5, 30, 25], [40, 8, 60, 30]], [2, 0]), Truth([], [])]
    found = [
        Detections(t.boxes + shift, np.full(len(t.labels), 0.9, dtype=np.float32), t.labels) for t in truth
    ]
    metrics = coco_metrics(truth, found, len(DETECTION_CLASSES))
    return {"map": 100 * metrics.map, "ap50": 100 * metrics.ap50, "n": 3, **class_accuracy(metrics)}


def _write_validate(run: Path, images: list[Path]) -> dict[str, Any]:
    manifest = read_manifest(run)
    manifest["student"]["sha256"] = STUDENT_SHA
    manifest["artifacts"]["export/student.onnx"]["student_sha256"] = STUDENT_SHA  # exported from it
    write_manifest(run, manifest)
    reference, int8 = _metrics_accuracy(0.0), _metrics_accuracy(2.0)
    drop = reference["map"] - int8["map"]
    int8.update(map_drop=drop, map_drop_interval=[drop - 4.5, drop + 3.25])
    # The models saw the images at the input size (24 x 16); the files are 48 x 32.
    spec = InputSpec(DETECTION_INPUT_SHAPE, (0.0, 0.0, 0.0), (1.0, 1.0, 1.0), None)
    box = np.array([[2.0, 3.0, 10.0, 12.0]], np.float32)
    one = FileDetections(box, np.array([0.875], np.float32), np.array([2]))
    none = FileDetections(np.zeros((0, 4), np.float32), np.zeros(0, np.float32), np.zeros(0, np.int64))
    examples = examples_block(
        images,
        [(48, 32)] * len(images),
        spec,
        {"teacher": [one, none], "onnxruntime/fp32": [one, one], "onnxruntime/int8": [none, one]},
        [f"planted reason {row}" for row in range(len(images))],
    )
    data = {
        "schema_version": STAGE_SCHEMA_VERSIONS[VALIDATE_FILE],
        "reference": "onnxruntime/fp32",
        "images": 3,
        "passed": True,
        "failures": [],
        "measured": {
            "source": {"kind": "run-split", "images": 3, "dataset": "digits"},
            "reference": "onnxruntime/fp32",
            "student_sha256": STUDENT_SHA,
        },
        "results": {
            "onnxruntime/fp32": {
                "status": "ok",
                "reason": None,
                "file": "export/student.onnx",
                "accuracy": reference,
            },
            "onnxruntime/int8": {
                "status": "ok",
                "reason": None,
                "file": None,
                "accuracy": int8,
                "parity": {"box_matched": 87.5},
                "gates": [{"gate": "max_map_drop", "passed": True, "verdict": "pass"}],
            },
        },
        "examples": examples,
    }
    (run / "report").mkdir(exist_ok=True)
    (run / "report" / VALIDATE_FILE).write_text(json.dumps(data), encoding="utf-8")
    return data


def test_every_task_has_its_part_of_the_report() -> None:
    assert set(REPORT_TASKS) == set(TASKS)


def test_pr_curves_follow_cocoeval(tmp_path: Path) -> None:
    accuracy = _metrics_accuracy(0.0)
    curves = accuracy["curves"]
    assert len(curves["recall"]) == 101 and curves["recall"][0] == 0.0 and curves["recall"][-1] == 100.0
    # Perfect detections: precision 100 at every recall point of the classes with truth; class 1 has
    # no ground truth, so it has no curve.
    assert curves["precision50"][0] == [100.0] * 101 and curves["precision50"][1] is None
    assert accuracy["per_class_ap"][1] is None and accuracy["per_class_ap"][0] == pytest.approx(100.0)
    shifted = _metrics_accuracy(2.0)
    assert min(v for v in shifted["curves"]["precision"][0]) < 100.0
    assert shifted["map"] < accuracy["map"]


def test_the_report_of_a_detection_run(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    run = make_detection_run(tmp_path)
    images = []
    for name in ("a.png", "b.png"):
        Image.fromarray(np.full((32, 48, 3), 120, dtype=np.uint8)).save(tmp_path / name)
        images.append(tmp_path / name)
    data = _write_validate(run, images)
    report = write_report(run)
    assert report["task"] == "detection"
    assert report["validation"]["examples"] == data["examples"]
    # Boxes the models found at the input size are drawn on the files' own pixels.
    teacher = data["examples"]["detections"]["teacher"]
    assert teacher == [[{"class": 2, "score": 0.875, "box": [4.0, 6.0, 20.0, 24.0]}], []]
    for name in (PR_CURVES_PLOT, EXAMPLES_PLOT):
        assert (run / "report" / name).read_bytes()[:8] == PNG_MAGIC
        assert name in report["plots"]
    markdown = (run / "report" / "report.md").read_text(encoding="utf-8")
    assert "## Detection: mAP per format" in markdown
    assert "## Accuracy and parity" not in markdown  # top-1 and logits mean nothing for boxes
    int8 = data["results"]["onnxruntime/int8"]["accuracy"]
    section = markdown.split("## Detection: mAP per format", 1)[1].split("\n## ", 1)[0]
    row = next(line for line in section.splitlines() if line.startswith("| onnxruntime/int8"))
    cells = [cell.strip() for cell in row.strip("|").split("|")]
    assert cells[2] == f"{int8['map']:.2f}" and cells[3] == f"{int8['ap50']:.2f}"
    drop = int8["map_drop"]
    assert cells[4] == f"{drop:.2f} [{drop - 4.5:.2f}, {drop + 3.25:.2f}]"
    fp32_row = next(line for line in section.splitlines() if line.startswith("| onnxruntime/fp32"))
    assert [cell.strip() for cell in fp32_row.strip("|").split("|")][1:5] == ["ok", "100.00", "100.00", "ref"]
    assert cells[5:] == ["87.50", "3", "max_map_drop pass"]
    assert "## Detection: AP per class" in markdown
    assert PR_CURVES_PLOT in markdown and EXAMPLES_PLOT in markdown
    html = (run / "report" / "report.html").read_text(encoding="utf-8")
    assert "Detection: examples" in html
    # The grid's caption states the rule its rows were chosen by, and each row why it was chosen.
    examples = markdown.split("## Detection: examples", 1)[1].split("\n## ", 1)[0]
    assert EXAMPLES_RULE in examples
    assert "- row 1, a.png: planted reason 0" in examples and "- row 2, b.png: planted reason 1" in examples

    # The final table, as `reviewkd report` and `reviewkd run` print it, shows mAP where a
    # classifier's shows top-1.
    lines = format_final_table(report).splitlines()
    header = "format status size MB mAP % drop [95% CI] AP50 % p50 ms @1 img/s @-"
    assert lines[1].split() == header.split()
    int8_line = next(line for line in lines if line.startswith("onnxruntime/int8"))
    assert int8_line.split()[3:5] == [f"{int8['map']:.2f}", f"{drop:.2f}"]


BOX = [2.0, 2.0, 20.0, 20.0]


def _found(*boxes: tuple[list[float], int]) -> FileDetections:
    """One image's detections: (box, class) each, scores falling from 0.9 in the order given."""
    scores = [0.9 - 0.1 * k for k in range(len(boxes))]
    return FileDetections(
        np.array([box for box, _ in boxes], np.float32).reshape(-1, 4),
        np.array(scores, np.float32),
        np.array([label for _, label in boxes], np.int64),
    )


def test_the_example_grid_shows_the_images_that_matter_first() -> None:
    """Eight images, each with one box of class 0 that fp32 finds, except: int8 adds three detections
    on image 3 and loses the box on image 7; fp32 misses image 5's box and adds two on image 6."""
    truth = [Truth([BOX], [0]) for _ in range(8)]
    fp32 = [_found((BOX, 0)) for _ in range(8)]
    fp32[5] = _found()
    fp32[6] = _found((BOX, 0), ([30, 0, 40, 10], 1), ([0, 30, 10, 40], 2))
    int8 = list(fp32)
    int8[3] = _found((BOX, 0), ([30, 0, 40, 10], 1), ([0, 30, 10, 40], 1), ([25, 25, 35, 35], 2))
    int8[7] = _found()
    matches = match_images(truth, fp32, len(DETECTION_CLASSES))
    chosen = choose_examples(matches, fp32, int8)
    assert chosen == [
        Example(3, "int8 and fp32 disagree: 3 of their 5 detections unmatched"),
        Example(7, "int8 and fp32 disagree: 1 of their 1 detections unmatched"),
        Example(5, "fp32 misses 1 of 1 ground-truth boxes"),
        # fp32's errors against the truth per image: 0 but image 5 (1) and image 6 (2): median 0
        *(Example(i, "typical: 0 fp32 errors against the truth (median 0)") for i in (0, 1, 2)),
    ]
    assert len(chosen) == MAX_EXAMPLE_IMAGES
    # The same detections choose the same rows; without an int8 file no row is chosen for it.
    assert choose_examples(matches, fp32, int8) == chosen
    alone = choose_examples(matches, fp32, None)
    assert [e.index for e in alone] == [5, 0, 1, 2, 3, 4]


def test_ties_go_to_the_earlier_image() -> None:
    """Images 1, 2 and 4 each have two detections int8 does not reproduce: 1 and 2 are shown."""
    truth = [Truth([BOX], [0]) for _ in range(5)]
    fp32 = [_found((BOX, 0)) for _ in range(5)]
    int8 = list(fp32)
    for i in (4, 1, 2):
        int8[i] = _found((BOX, 0), ([30, 0, 40, 10], 1), ([0, 30, 10, 40], 1))
    chosen = choose_examples(match_images(truth, fp32, len(DETECTION_CLASSES)), fp32, int8)
    assert [e.index for e in chosen] == [1, 2, 0, 3, 4]
    assert chosen[0].reason == chosen[1].reason == "int8 and fp32 disagree: 2 of their 4 detections unmatched"


def test_per_class_ap_names_the_classes(tmp_path: Path) -> None:
    report = {
        "run": {"classes": DETECTION_CLASSES},
        "onnxruntime/fp32": {"status": "ok", "accuracy": {"per_class_ap": [50.0, None, 75.5]}},
        "onnxruntime/int8": {"status": "ok", "accuracy": {"per_class_ap": [40.0, None, 70.25]}},
    }
    table = per_class_table(report)
    assert table is not None
    assert table.header == ("class", "onnxruntime/fp32", "onnxruntime/int8")
    assert table.rows == (("zero", "50.00", "40.00"), ("one", "-", "-"), ("two", "75.50", "70.25"))


def test_without_matplotlib_the_detection_sections_say_what_is_missing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    run = make_detection_run(tmp_path)
    image = tmp_path / "a.png"
    Image.fromarray(np.zeros((32, 48, 3), dtype=np.uint8)).save(image)
    _write_validate(run, [image])
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # how Python marks a module it cannot import
    report = write_report(run)
    assert report["plots"] == []
    markdown = (run / "report" / "report.md").read_text(encoding="utf-8")
    assert "## Detection: examples" in markdown
    examples = markdown.split("## Detection: examples", 1)[1]
    assert "pip install 'reviewkd[plots]'" in examples.split("##", 1)[0]
    assert not (run / "report" / EXAMPLES_PLOT).exists()



def test_the_headline_is_the_gain_in_map_over_the_plain_student(tmp_path: Path) -> None:
    run = make_detection_run(tmp_path)
    manifest = read_manifest(run)
    manifest["method"] = {"name": "reviewkd", "params": {}}
    manifest["student"].update(map=35.5, ap50=60.0)
    manifest["baselines"] = {"plain": {"map": 31.25, "ap50": 55.0, "run": "baseline_ce"}}
    write_manifest(run, manifest)
    report = build_report(run)
    assert report["run"]["student"]["score"] == 35.5 and report["run"]["metric"] == "map"
    text = format_final_table(report)
    assert text.splitlines()[0] == (
        "distillation gain: +4.25 mAP@[.5:.95] points, reviewkd 35.50% vs plain 31.25%"
        " (same run, best epochs)"
    )
