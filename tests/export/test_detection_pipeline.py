"""export_run on a real tiny detection run: files, checks, gates and the manifest."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest

from deploy.detection.outputs import Detections
from deploy.formats import EFFICIENT_NMS
from deploy.manifest import detection_settings, read_manifest, write_manifest
from deploy.status import Status
from export.detection_pipeline import DetectionScorer, map_check
from export.onnx_export import get_metadata
from export.pipeline import export_run

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def exported_run(tiny_detection_run: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    run = tmp_path_factory.mktemp("exported") / "run"
    shutil.copytree(tiny_detection_run, run)
    formats = ["onnx", "efficientnms", "fp16", "int8"]
    summary = export_run(run, formats, calib_samples=16, calib_method="auto", held_out_samples=8)
    summary.raise_for_status()
    return run


def test_every_format_is_written_checked_and_recorded(exported_run: Path) -> None:
    manifest = read_manifest(exported_run)
    artifacts = manifest["artifacts"]
    assert {rel: artifacts[rel]["kind"] for rel in artifacts if rel.startswith("export/")} == {
        "export/student.onnx": "onnx",
        EFFICIENT_NMS.file: EFFICIENT_NMS.kind,
        "export/student.fp16.onnx": "onnx",
        "export/student.int8.onnx": "onnx",
    }
    settings = detection_settings(manifest)
    embedded = get_metadata(onnx.load(str(exported_run / "export/student.int8.onnx")))
    assert embedded["detection"] == settings.block() and embedded["task"] == "detection"
    checks = manifest["export"]["checks"]
    fp32 = checks["export/student.onnx"]
    # the exported file reproduces every torch detection, and so its mAP
    assert fp32["parity"]["matched_fraction"] == 1.0 and fp32["parity"]["reference_detections"] > 0
    assert fp32["accuracy"]["map"] == pytest.approx(fp32["accuracy"]["torch_map"], abs=1e-6)
    for rel in ("export/student.fp16.onnx", "export/student.int8.onnx"):
        low, high = checks[rel]["accuracy"]["map_drop_interval"]
        assert low <= checks[rel]["accuracy"]["map_drop"] <= high
        assert checks[rel]["gates"][0]["gate"] == "max_map_drop"
    assert checks[EFFICIENT_NMS.file]["status"] == Status.SKIPPED
    calibration = manifest["export"]["calibration"]
    assert (calibration["samples"], calibration["held_out"]) == (16, 8)
    chosen = embedded["int8"]["calibration"]
    assert chosen["chosen"] in chosen["held_out_map"]
    # the post-processing stays float: only the network's nodes are quantized
    model = onnx.load(str(exported_run / "export/student.int8.onnx"))
    quantized = {n.input[0] for n in model.graph.node if n.op_type == "QuantizeLinear"}
    assert quantized and not any(name.startswith("postprocess/") for name in quantized)


def test_a_format_losing_boxes_fails_its_map_gate(exported_run: Path) -> None:
    manifest = read_manifest(exported_run)
    from deploy.detection.annotations import read_coco

    val = read_coco(Path(manifest["data"]["val"]))
    scorer = DetectionScorer(val.images, (64, 96), 8, len(manifest["classes"]))
    truth = [Detections(r.boxes, np.ones(len(r.labels), np.float32), r.labels) for r in scorer.records]
    reference = scorer.matches(truth)
    same = map_check("x.onnx", "int8", scorer, reference, truth, "cpu")
    assert same.status == Status.OK and same.metrics["accuracy"]["map_drop"] == 0
    # every second image loses its boxes: mAP falls by far more than the 1-point budget
    half = [t if i % 2 else Detections(t.boxes[:0], t.scores[:0], t.classes[:0]) for i, t in enumerate(truth)]
    worse = map_check("x.onnx", "int8", scorer, reference, half, "cpu")
    assert worse.status == Status.FAILED and worse.metrics["accuracy"]["map_drop_interval"][0] > 1.0


def test_validate_and_bench_run_every_file_as_deployed(exported_run: Path) -> None:
    from benchmarks.detection import bench_detection_run, validate_detection_run

    result = validate_detection_run(exported_run)
    export_checks = read_manifest(exported_run)["export"]["checks"]
    assert result["passed"] and set(result["results"]) == {
        "onnxruntime/fp32",
        "onnxruntime/fp16",
        "onnxruntime/int8",
        "torch/fp32",
    }
    fp32 = result["results"]["onnxruntime/fp32"]
    assert fp32["parity"]["matched_fraction"] == 1.0
    # the same images and files: validate's numbers are export's
    int8 = result["results"]["onnxruntime/int8"]["accuracy"]
    assert int8["map"] == pytest.approx(export_checks["export/student.int8.onnx"]["accuracy"]["map"])
    assert int8["map_drop_interval"][0] <= int8["map_drop"] <= int8["map_drop_interval"][1]
    assert len(int8["per_class_ap"]) == len(read_manifest(exported_run)["classes"])
    # a stricter gate than the file meets fails, naming the file and the gate
    # a gate of no drop at all, inconclusive failing: only an interval wholly at or below 0 passes it
    strict = validate_detection_run(
        exported_run, gates={"int8": {"max_map_drop": 0.0}}, inconclusive_passes=False
    )
    int8_failed = any(line.startswith("onnxruntime/int8: max_map_drop") for line in strict["failures"])
    assert int8_failed == (int8["map_drop_interval"][1] > 0.0)
    bench = bench_detection_run(exported_run, batch_sizes=(1, 2), seconds=0.05, warmup=1, threads=1)
    stats = bench["results"]["onnxruntime/int8"]["latency"]["2"]
    assert stats["iters"] >= 5 and set(stats["parts_p50_ms"]) == {"pre", "model", "post"}
    assert all(value > 0 for value in stats["parts_p50_ms"].values())


def test_validate_shows_the_image_a_planted_difference_makes_the_worst(
    exported_run: Path, tmp_path: Path
) -> None:
    """Thirty-two small boxes planted in the truth of the tenth validation image (past the first
    MAX_EXAMPLE_IMAGES, which the grid used to show), where no detection of the student can match
    them: validate's real detections make it the image the fp32 student misses most, and the grid
    shows it first among those rows, saying so."""
    from benchmarks.detection import validate_detection_run
    from benchmarks.report.detection import MAX_EXAMPLE_IMAGES

    run = tmp_path / "run"
    shutil.copytree(exported_run, run)
    manifest = read_manifest(run)
    source = Path(manifest["data"]["val"])
    coco = json.loads(source.read_text(encoding="utf-8"))
    for image in coco["images"]:
        image["file_name"] = str(source.parent / image["file_name"])
    planted = coco["images"][9]
    assert len(coco["images"]) > 9 >= MAX_EXAMPLE_IMAGES
    width, height = planted["width"], planted["height"]
    category = coco["categories"][0]["id"]
    corners = [[x, y, 4, 4] for x in range(0, 6 * 16, 6) for y in (0, height - 4)]
    assert all(x + 4 <= width for x, _, _, _ in corners)
    first_id = max(a["id"] for a in coco["annotations"]) + 1
    coco["annotations"] += [
        {"id": first_id + k, "image_id": planted["id"], "category_id": category, "bbox": box, "area": 16.0}
        for k, box in enumerate(corners)
    ]
    boxes = sum(a["image_id"] == planted["id"] for a in coco["annotations"])
    planted_val = tmp_path / "val.json"
    planted_val.write_text(json.dumps(coco), encoding="utf-8")
    manifest["data"]["val"] = str(planted_val)
    write_manifest(run, manifest)

    examples = validate_detection_run(run)["examples"]
    reasons = examples["reasons"]
    missed_rows = [row for row, reason in enumerate(reasons) if reason.startswith("fp32 misses")]
    row = examples["images"].index(planted["file_name"])
    assert missed_rows[0] == row
    assert re.fullmatch(rf"fp32 misses (\d+) of {boxes} ground-truth boxes", reasons[row])
    assert int(reasons[row].split()[2]) >= len(corners)
    assert len(examples["images"]) == len(reasons) == MAX_EXAMPLE_IMAGES
    for per_image in examples["detections"].values():
        assert len(per_image) == MAX_EXAMPLE_IMAGES


def test_bench_compares_a_real_detectors_fp32_and_int8_interleaved(
    exported_run: Path, tmp_path: Path
) -> None:
    from benchmarks.detection import bench_detection_run

    run = tmp_path / "run"
    shutil.copytree(exported_run, run)
    pair = ("onnxruntime/fp32", "onnxruntime/int8")
    result = bench_detection_run(run, batch_sizes=(1, 2), iters=3, warmup=0, threads=1, compare=pair)
    comparison = result["comparisons"]["onnxruntime/fp32,onnxruntime/int8"]
    assert comparison["status"] == "ok" and result["results"] == {}
    assert {batch: paired["pairs"] for batch, paired in comparison["batches"].items()} == {"1": 3, "2": 3}


class _ScriptedScorer:
    """A held-out scorer whose mAP per file is scripted: fp32 10, plain int8 8, int8 with the head's
    output convolutions in float 9.5 (within a 1-point budget)."""

    def detect(self, path: Path) -> Path:
        return path

    def map(self, found: Path) -> float:
        return 10.0 if found.name == "student.onnx" else 9.5 if ".0." in found.name else 8.0


def test_int8_over_its_map_budget_keeps_the_first_float_step_within_it(
    exported_run: Path, tmp_path: Path
) -> None:
    from deploy.detection.annotations import read_coco
    from deploy.detection.images import image_batches
    from export.detection_pipeline import FLOAT_STEPS, quantize_detector

    manifest = read_manifest(exported_run)
    records = read_coco(Path(manifest["data"]["val"])).images[:4]
    calibration = list(image_batches(records, (64, 96), 4))
    dst = tmp_path / "student.int8.onnx"
    scorer: Any = _ScriptedScorer()
    fp32 = exported_run / "export/student.onnx"
    description = quantize_detector(fp32, dst, "cpu", calibration, scorer, "minmax", 1.0, lambda _line: None)
    label, prefixes = FLOAT_STEPS[0]
    assert description["mixed_precision"] == {
        "budget_map_points": 1.0,
        "held_out_fp32_map": 10.0,
        "held_out_map": 9.5,
        "met": True,
        "float_steps_map": {label: 9.5},
        "float": label,
    }
    model = onnx.load(str(dst))
    producer = {output: node.op_type for node in model.graph.node for output in node.output}
    convs = [node for node in model.graph.node if node.op_type == "Conv"]
    quantized = {node.name for node in convs if producer.get(node.input[1]) == "DequantizeLinear"}
    head_outputs = {node.name for node in convs if node.name.startswith(prefixes)}
    assert head_outputs and not head_outputs & quantized
    assert quantized, "the rest of the network is still int8"


def test_reviewkd_export_on_a_detection_run_writes_the_formats_asked_for(
    tiny_detection_run: Path, tmp_path: Path
) -> None:
    from reviewkd.app.cli import main

    run = tmp_path / "run"
    shutil.copytree(tiny_detection_run, run)
    assert main(["export", str(run), "--formats", "onnx,fp16"]) == 0
    kinds = {rel: entry["kind"] for rel, entry in read_manifest(run)["artifacts"].items()}
    assert kinds["export/student.onnx"] == kinds["export/student.fp16.onnx"] == "onnx"
    assert EFFICIENT_NMS.file not in kinds and "export/student.int8.onnx" not in kinds
    # TensorRT builds a detector's engines too: here it is missing, which is exit 3, not a refusal
    assert main(["export", str(run), "--formats", "onnx,tensorrt"]) == 3


def test_validate_and_bench_skip_a_detection_engine_where_tensorrt_is_missing(
    exported_run: Path, tmp_path: Path
) -> None:
    from benchmarks.detection import bench_detection_run, validate_detection_run, validate_lines
    from deploy.detection.outputs import OUTPUT_NAMES
    from deploy.fileio import sha256_file
    from deploy.gpu import GpuInfo
    from deploy.manifest import record_artifact, write_manifest
    from deploy.trt_sidecar import Sidecar, host_machine, host_os, profile_shapes, sidecar_path, write_sidecar
    from tests.helpers import tensorrt_gpu_missing

    if tensorrt_gpu_missing() is None:
        pytest.skip("TensorRT and a GPU are here: the engine would run")
    run = tmp_path / "run"
    shutil.copytree(exported_run, run)
    manifest = read_manifest(run)
    plan = run / "export/student.fp16.plan"
    plan.write_bytes(b"an engine TensorRT would read")
    sidecar = Sidecar(
        plan_file=plan.name,
        plan_sha256=sha256_file(plan),
        tensorrt_version="10.13.0.35",
        gpu=GpuInfo("NVIDIA H100 80GB HBM3", (9, 0)),
        precision="fp16",
        compatibility=None,
        strongly_typed=True,
        input_names=("images",),
        output_names=OUTPUT_NAMES,
        profile=profile_shapes((3, 64, 96), 1, 8, 32),
        source_onnx="student.fp16.onnx",
        source_onnx_sha256=sha256_file(run / "export/student.fp16.onnx"),
        machine=host_machine(),
        os=host_os(),
        build={"plugins": []},
    )
    write_sidecar(sidecar_path(plan), sidecar)
    record_artifact(run, manifest, "export/student.fp16.plan", "tensorrt", precision="fp16")
    write_manifest(run, manifest)
    result = validate_detection_run(run)
    engine = result["results"]["tensorrt/fp16"]
    assert engine["status"] == "skipped" and "TensorRT" in engine["reason"]
    assert result["passed"] and "onnxruntime/int8" in result["results"]  # the ONNX files still measured
    assert any(line.startswith("tensorrt/fp16") and "skipped" in line for line in validate_lines(result))
    bench = bench_detection_run(run, batch_sizes=(1,), seconds=0.05, warmup=1, threads=1)
    assert bench["results"]["tensorrt/fp16"]["status"] == "skipped"
