"""reviewkd layerwise on a real tiny detection run: up to the head outputs, mAP as the end metric."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest

from deploy.manifest import read_manifest
from export.detection import BODY_OUTPUTS, POSTPROCESS_PREFIX
from export.pipeline import export_run
from reviewkd.app.cli import main

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def exported_run(tiny_detection_run: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny detection run with its fp32, fp16 and ONNX Runtime int8 files (min-max calibration,
    no mAP budget: the quickest int8 export)."""
    run = tmp_path_factory.mktemp("layerwise") / "run"
    shutil.copytree(tiny_detection_run, run)
    formats = ["onnx", "fp16", "int8"]
    summary = export_run(run, formats, calib_samples=16, calib_method="minmax", max_map_drop_int8=None)
    summary.raise_for_status()
    return run


def test_layerwise_compares_a_detector_up_to_its_head_and_scores_both_files_by_map(
    exported_run: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["layerwise", str(exported_run), "--format", "onnxruntime/int8"]) == 0
    out = capsys.readouterr().out
    data = json.loads((exported_run / "report" / "layerwise_int8.json").read_text())
    checks = read_manifest(exported_run)["export"]["checks"]
    # the images are export's check images: all 12 held-out ones (fewer than --images' 64)
    assert data["images"] == 12 and "held-out images" in data["source"]
    # the comparison stops at the head outputs: no post-processing tensor (NMS, data-dependent shapes)
    assert not any(layer["node"].startswith(POSTPROCESS_PREFIX) for layer in data["layers"])
    modules = {layer["module"] for layer in data["layers"]}
    assert {"backbone.body", "backbone.fpn", "head.classification_head", "head.regression_head"} <= {
        ".".join(module.split(".")[:2]) for module in modules
    }
    assert data["jump"]["module"].startswith(("backbone.", "head."))
    assert data["end_label"] == "head outputs" and list(data["end_outputs"]) == list(BODY_OUTPUTS)
    for error in data["end_outputs"].values():
        assert 0 < error["marked_rel_l2"] < 1 and 0 < error["deployed_rel_l2"] < 1
    # the end metric is export's own mAP of each file as deployed, on the same images
    metric = data["metric"]
    assert metric["label"] == "mAP@[.5:.95] %"
    assert metric["reference"] == pytest.approx(checks["export/student.onnx"]["accuracy"]["map"])
    assert metric["candidate"] == pytest.approx(checks["export/student.int8.onnx"]["accuracy"]["map"])
    assert metric["drop"] == pytest.approx(metric["reference"] - metric["candidate"])
    assert f"error jumps at {data['jump']['module']}" in out
    assert f"mAP@[.5:.95] % as deployed on the same images: {metric['reference']:.2f} fp32" in out
    markdown = (exported_run / "report" / "layerwise_int8.md").read_text()
    assert "up to the head outputs (cls_logits, bbox_regression, bbox_ctrness)" in markdown
    assert "postprocess/" not in markdown

    # reviewkd report shows it as it does for classifiers, with the head outputs and the mAP
    assert main(["report", str(exported_run)]) == 0
    report = re.sub(r" +", " ", (exported_run / "report" / "report.md").read_text())  # unpadded columns
    assert "## Layer-wise parity (reviewkd layerwise)" in report
    assert "| head outputs rel. L2 Q/DQ | as deployed | metric as deployed: fp32 -> file |" in report
    assert f"| onnxruntime/int8 | {data['jump']['module']} |" in report
    assert f"mAP@[.5:.95] % {metric['reference']:.2f} -> {metric['candidate']:.2f}" in report
    assert "![Layer-wise parity: onnxruntime/int8](layerwise_int8.png)" in report


def test_layerwise_refuses_a_format_the_detection_run_lacks(
    exported_run: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["layerwise", str(exported_run), "--format", "onnxruntime/int8-trt"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "student.int8.trt.onnx: not in the run's manifest" in err


def test_layerwise_compares_the_fp16_file_on_the_first_images_asked_for(
    exported_run: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from export.detection_producing import DETECTION_BATCH_SIZE, held_out_scorer
    from reviewkd.config import load_run_config
    from reviewkd.detection.engine import build_detection_data

    assert main(["layerwise", str(exported_run), "--format", "onnxruntime/fp16", "--images", "5"]) == 0
    data = json.loads((exported_run / "report" / "layerwise_fp16.json").read_text())
    assert data["images"] == 5 and data["source"].startswith("the first 5 held-out images")
    assert not any(layer["node"].startswith(POSTPROCESS_PREFIX) for layer in data["layers"])
    # fp16 rounds every layer a little: the head outputs stay close to fp32's
    assert list(data["end_outputs"]) == list(BODY_OUTPUTS)
    for error in data["end_outputs"].values():
        assert 0 < error["marked_rel_l2"] < 1e-2 and 0 < error["deployed_rel_l2"] < 1e-2
    # the mAP is export's scorer's, as deployed, on the same five images
    manifest = read_manifest(exported_run)
    data_splits = build_detection_data(load_run_config(exported_run))
    scorer = held_out_scorer(exported_run, manifest, data_splits, 5, DETECTION_BATCH_SIZE)
    for key, rel in (("reference", "export/student.onnx"), ("candidate", "export/student.fp16.onnx")):
        assert data["metric"][key] == pytest.approx(scorer.map(scorer.detect(exported_run / rel)))
    assert "layers compared on 5 images (the first 5 held-out images" in capsys.readouterr().out
