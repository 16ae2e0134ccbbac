"""`reviewkd bench` on a detection run: --iters and --compare A,B, whose pairs are timed by
benchmarks.latency.compare_targets as a classifier's are, each call the whole file (NMS inside) and
its outputs cut into detections, on the run's validation images."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from benchmarks.detection import detection_workload, validation_records
from deploy.detection.onnx_run import DetectionSession
from deploy.formats import ONNX_FORMATS
from deploy.manifest import read_manifest, record_artifact, write_manifest
from deploy.runners import open_runner
from reviewkd.app.cli import main
from tests.helpers import DETECTION_CLASSES, DETECTION_INPUT_SHAPE, make_detection_run, write_detection_onnx

FP32, INT8 = "onnxruntime/fp32", "onnxruntime/int8"
PAIR = f"{FP32},{INT8}"
INT8_FILE = ONNX_FORMATS["int8"].file


def _run_with_val_images(tmp_path: Path) -> Path:
    """A detection run with an fp32 and an int8 file (tests.helpers' tiny detector) and a validation
    split of three grey images of the input's size, one box on the first, in a COCO file."""
    run = make_detection_run(tmp_path)
    manifest = read_manifest(run)
    write_detection_onnx(run / INT8_FILE, {**manifest, "precision": "int8"})
    record_artifact(run, manifest, INT8_FILE, "onnx", precision="int8")
    folder = tmp_path / "val"
    folder.mkdir()
    height, width = DETECTION_INPUT_SHAPE[1:]
    for index in range(3):
        Image.fromarray(np.full((height, width, 3), 60 * index, np.uint8)).save(folder / f"{index}.png")
    coco = {
        "images": [{"id": i, "file_name": f"{i}.png", "width": width, "height": height} for i in range(3)],
        "categories": [{"id": k, "name": name} for k, name in enumerate(DETECTION_CLASSES)],
        "annotations": [{"id": 1, "image_id": 0, "category_id": 2, "bbox": [2, 3, 8, 9]}],
    }
    (folder / "val.json").write_text(json.dumps(coco), encoding="utf-8")
    manifest["data"] = {"val": str(folder / "val.json")}
    write_manifest(run, manifest)
    return run


def test_a_compared_call_is_the_whole_detector_on_the_validation_images(tmp_path: Path) -> None:
    run = _run_with_val_images(tmp_path)
    manifest = read_manifest(run)
    records = validation_records(run, manifest)
    workload = detection_workload(records, DETECTION_INPUT_SHAPE[1:], len(DETECTION_CLASSES))
    images = workload.images(5, DETECTION_INPUT_SHAPE, np.random.default_rng(0))
    # the three validation images, cycled to fill the batch
    assert images.shape == (5, *DETECTION_INPUT_SHAPE)
    means = [float(image.mean()) for image in images]
    assert means == pytest.approx([0.0, 60 / 255, 120 / 255, 0.0, 60 / 255])
    with open_runner(run / INT8_FILE, manifest=manifest, run_dir=run) as runner:
        found = workload.call(runner, images)
    # what the call returns is what validate reads of the file: every image's detections
    expected = DetectionSession(run / INT8_FILE, len(DETECTION_CLASSES)).detect(images)
    assert isinstance(found, list) and len(found) == len(expected) == 5
    for one, other in zip(found, expected, strict=True):
        np.testing.assert_array_equal(one.boxes, other.boxes)
        np.testing.assert_array_equal(one.scores, other.scores)
        np.testing.assert_array_equal(one.classes, other.classes)


def test_bench_compare_on_a_detection_run_records_the_ratio_and_the_report_shows_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run = _run_with_val_images(tmp_path)
    assert main(["bench", str(run), "--batch-sizes", "1", "--iters", "4", "--warmup", "1"]) == 0
    benched = json.loads((run / "report" / "bench.json").read_text())
    timed = {key: benched["results"][key]["latency"]["1"]["iters"] for key in (FP32, INT8)}
    assert timed == {FP32: 4, INT8: 4}
    capsys.readouterr()
    argv = ["bench", str(run), "--compare", PAIR, "--batch-sizes", "1,2", "--iters", "6", "--warmup", "0"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    for batch in ("1", "2"):
        ratio = r"\(time ratio A/B [0-9.]+, 95% CI [0-9.]+-[0-9.]+, 6 pairs\)"
        assert re.search(rf"{FP32} vs {INT8} batch {batch}: .*{ratio}", out), out
    saved = json.loads((run / "report" / "bench.json").read_text())
    comparison = saved["comparisons"][PAIR]
    assert comparison["status"] == "ok" and set(comparison["batches"]) == {"1", "2"}
    assert comparison["settings"]["inputs"] == "the validation split's images, cycled to fill each batch"
    paired = comparison["batches"]["2"]
    low, high = paired["time_ratio_ci"]
    assert paired["pairs"] == 6 and low <= paired["time_ratio"] <= high
    assert paired["verdict"] in ("faster", "slower", "no difference")
    # the formats benched before stay beside the comparison
    assert saved["results"][FP32]["latency"] == benched["results"][FP32]["latency"]
    assert saved["kept_from_earlier"] == [FP32, INT8]

    assert main(["report", str(run)]) == 0
    markdown = (run / "report" / "report.md").read_text(encoding="utf-8")
    latency = markdown.split("## Latency", 1)[1].split("\n## ", 1)[0]
    ratio = f"{paired['time_ratio']:.3f} (95% CI {low:.3f}-{high:.3f}, 6 pairs)"
    assert f"- {FP32} vs {INT8}, batch 2, interleaved: {paired['verdict']}, time ratio {ratio}" in latency


def test_a_compare_naming_a_format_the_detection_run_lacks_is_exit_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run = _run_with_val_images(tmp_path)
    assert main(["bench", str(run), "--compare", f"{FP32},onnxruntime/fp16", "--iters", "2"]) == 2
    err = capsys.readouterr().err
    assert f"--compare: onnxruntime/fp16 is not a format of {run}; it has {FP32}, {INT8}" in err
    assert err.count("\n") == 1 and not (run / "report" / "bench.json").exists()
