"""export_run's format registry: the producer table, the plan, and a task plugging in its own producers."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch

from deploy.errors import UsageError
from deploy.formats import ALL_EXPORT_FORMATS, ONNX_FORMATS, TENSORRT_FORMAT, UINT8_INPUT
from deploy.manifest import read_manifest, write_manifest
from deploy.tasks import DETECTION
from export import pipeline
from export.check import check_file
from export.pipeline import CLASSIFICATION_PRODUCERS, EXPORT_TASKS, export_run
from export.producing import ExportContext, ExportTask, FormatProducer
from tests.helpers import export_onnx, make_run, tiny_net

FP32_FILE = ONNX_FORMATS["onnx"].file
FP16_FILE = ONNX_FORMATS["fp16"].file


def test_classification_produces_every_format_of_the_registry_in_its_order() -> None:
    registry_order = [*ONNX_FORMATS, UINT8_INPUT.name, TENSORRT_FORMAT]
    assert list(CLASSIFICATION_PRODUCERS) == registry_order
    assert set(ALL_EXPORT_FORMATS) <= set(CLASSIFICATION_PRODUCERS)


@pytest.mark.parametrize(
    ("requested", "planned"),
    [
        (["int8-trt", "fp16"], ["onnx", "fp16", "int8-trt"]),
        (["uint8"], ["onnx", "uint8"]),
        (["tensorrt", "int8"], ["onnx", "int8", "tensorrt"]),
        (["tensorrt"], ["tensorrt"]),
        (["onnx"], ["onnx"]),
    ],
)
def test_the_plan_adds_the_sources_and_keeps_the_registry_order(
    requested: list[str], planned: list[str]
) -> None:
    assert EXPORT_TASKS["classification"].plan(requested) == planned


def _detection_run(tmp_path: Path) -> Path:
    run, manifest = make_run(tmp_path)
    manifest["task"] = DETECTION
    write_manifest(run, manifest)
    return run


def _task(fp32_passes: bool, calls: list[str], fp16_unavailable: str | None = None) -> ExportTask:
    """A task with its own wrapper (tiny_net), reference and two producers: fp32 (really exported and
    checked) and an fp16 made from it that records what it was given."""

    def produce_fp32(context: ExportContext, name: str) -> bool:
        calls.append(name)
        export_onnx(context.model, context.run / FP32_FILE)
        checks = context.checks
        result = check_file(context.run / FP32_FILE, "fp32", checks.batches, checks.reference, checks.labels)
        assert result.passed  # the task's own reference is what the file is held to
        return context.recorder.checked(FP32_FILE, result, "onnx", precision="fp32") and fp32_passes

    def produce_fp16(context: ExportContext, name: str) -> bool:
        calls.append(name)
        assert context.passed == {"onnx": True}
        assert context.once("shared", lambda: len(calls)) == context.once("shared", lambda: -1)
        return True

    def reference(model: torch.nn.Module, batches: list[np.ndarray], device: str) -> np.ndarray:
        calls.append(f"reference on {device}")
        with torch.no_grad():
            return np.concatenate([model(torch.from_numpy(b)).numpy() for b in batches])

    return ExportTask(
        load_model=lambda run, manifest: tiny_net(),
        reference=reference,
        producers={
            "onnx": FormatProducer(produce_fp32),
            "fp16": FormatProducer(
                produce_fp16, made_from="onnx", unavailable=lambda context: fp16_unavailable
            ),
        },
        layerwise=pipeline.classification_layerwise,
    )


def test_a_task_exports_through_its_own_wrapper_reference_and_producers(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    run = _detection_run(tmp_path)
    calls: list[str] = []
    monkeypatch.setitem(pipeline.EXPORT_TASKS, DETECTION, _task(True, calls))
    summary = export_run(run, ["fp16"], check_device="cpu")
    assert calls == ["reference on cpu", "onnx", "fp16"]
    assert list(summary.files) == [FP32_FILE] and not summary.skipped
    export = read_manifest(run)["export"]
    assert export["formats"] == ["fp16"]
    assert export["check_device"] == {"torch": "cpu", "onnxruntime": "cpu", "notes": []}


@pytest.mark.parametrize(
    ("fp32_passes", "unavailable", "reason"),
    [
        (False, None, f"{FP32_FILE} failed its check"),
        (True, "no fp16 here", "no fp16 here"),
        (False, "no fp16 here", "no fp16 here"),  # the producer's own reason comes first
    ],
)
def test_a_format_is_skipped_when_its_source_failed_or_it_cannot_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fp32_passes: bool, unavailable: str | None, reason: str
) -> None:
    run = _detection_run(tmp_path)
    calls: list[str] = []
    monkeypatch.setitem(pipeline.EXPORT_TASKS, DETECTION, _task(fp32_passes, calls, unavailable))
    summary = export_run(run, ["fp16"], check_device="cpu")
    assert calls == ["reference on cpu", "onnx"]
    assert summary.skipped == {"fp16": reason}
    assert read_manifest(run)["export"]["skipped"] == {"fp16": reason}


def test_a_task_without_an_export_is_refused_before_anything_is_written(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    run = _detection_run(tmp_path)
    monkeypatch.delitem(pipeline.EXPORT_TASKS, DETECTION)  # every task has one now: take detection's away
    before = read_manifest(run)
    with pytest.raises(UsageError, match="a detection run; export is not available"):
        export_run(run, ["onnx"])
    assert read_manifest(run) == before


def test_a_format_made_from_a_skipped_one_says_so(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    run = _detection_run(tmp_path)
    calls: list[str] = []
    task = _task(True, calls)
    fp32 = dataclasses.replace(task.producers["onnx"], unavailable=lambda context: "no tracer here")
    task = dataclasses.replace(task, producers={**task.producers, "onnx": fp32})
    monkeypatch.setitem(pipeline.EXPORT_TASKS, DETECTION, task)
    summary = export_run(run, ["fp16"], check_device="cpu")
    assert calls == ["reference on cpu"]  # no producer ran
    assert summary.skipped == {"onnx": "no tracer here", "fp16": f"{FP32_FILE} was not made (no tracer here)"}


def test_a_detection_runs_engines_come_from_its_own_sources(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`--formats tensorrt` on a detection run builds the fp32 engine from the EfficientNMS file
    (TensorRT's NMS plugin), fp16 and int8 from the registry's files, as a classifier's do."""
    from deploy.formats import EFFICIENT_NMS
    from deploy.manifest import record_artifact
    from export import engines

    run = _detection_run(tmp_path)
    manifest = read_manifest(run)
    for rel in (EFFICIENT_NMS.file, ONNX_FORMATS["int8-trt"].file):
        (run / rel).write_bytes((run / FP32_FILE).read_bytes())
        record_artifact(run, manifest, rel, "onnx")
    write_manifest(run, manifest)
    built: list[tuple[str, str]] = []

    def fake_build_engine(source: Path, plan: Path, **options: object) -> dict:
        built.append((Path(source).name, Path(plan).name))
        Path(plan).write_bytes(b"plan")
        Path(f"{plan}.json").write_text("{}")
        return {"tensorrt_version": "10.3.0.30"}

    monkeypatch.setattr(engines, "build_engine", fake_build_engine)
    monkeypatch.setattr(pipeline, "tensorrt_status", lambda: (True, "stand-in"))
    summary = export_run(run, [TENSORRT_FORMAT])
    assert built == [
        ("student.efficientnms.onnx", "student.fp32.plan"),
        ("student.int8.trt.onnx", "student.int8.plan"),
    ]
    assert "no checked export/student.fp16.onnx" in summary.skipped["tensorrt/fp16"]


def test_a_format_the_task_does_not_export_is_refused(tmp_path: Path) -> None:
    run, _ = make_run(tmp_path)
    before = read_manifest(run)
    exported = "onnx,fp16,int8,int8-trt,tensorrt"
    with pytest.raises(UsageError, match=rf"--formats efficientnms: .* exports {exported}$"):
        export_run(run, ["onnx", "efficientnms"])
    assert read_manifest(run) == before
