"""benchmarks.report: report.json keys, report.md, a self-contained report.html, the final table."""

from __future__ import annotations

import base64
import json
import re
from pathlib import Path

import numpy as np
import pytest
from torch import nn

from benchmarks.latency import PerfCounterTimer, benchmark_runners
from benchmarks.report import (
    BENCH_FILE,
    VALIDATE_FILE,
    build_report,
    format_entries,
    format_final_table,
    load_result,
    save_result,
    write_report,
)
from benchmarks.targets import Target
from benchmarks.validate import validate_runners
from deploy.errors import UsageError
from deploy.fileio import sha256_file
from deploy.manifest import new_manifest, read_manifest, record_artifact, write_manifest
from deploy.runners.base import Runner
from tests.helpers import (
    TINY_INPUT_SHAPE,
    ModuleRunner,
    export_tiny_onnx,
    image_batches,
    missing_tensorrt,
    tiny_module,
)

FORMATS = ("torch/fp32", "onnxruntime/fp32", "tensorrt/fp16")
ENTRY_KEYS = {"status", "reason", "size_bytes", "accuracy", "parity", "latency"}
LATENCY_KEYS = {"p50_ms", "p90_ms", "p99_ms", "mean_ms", "std_ms", "throughput_ips"}
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def make_run(tmp_path: Path) -> tuple[Path, nn.Module]:
    """A run directory as training and export leave it: manifest, student, ONNX file, metrics."""
    run = tmp_path / "run"
    (run / "export").mkdir(parents=True)
    module = tiny_module()
    export_tiny_onnx(module, run / "export" / "student.onnx")
    (run / "student.safetensors").write_bytes(b"weights stand-in")
    manifest = new_manifest()
    manifest.update(
        classes=[f"c{i}" for i in range(5)],
        input={"shape": list(TINY_INPUT_SHAPE), "layout": "NCHW", "mean": [0.5] * 3, "std": [0.25] * 3},
        student={"arch": "tiny", "num_classes": 5, "top1": 81.5, "top5": 99.0},
        teacher={"arch": "tiny_teacher", "top1": 90.25, "top5": 99.5},
        method={"name": "reviewkd", "params": {"hcl_weight": 1.0}},
        data={"dataset": "digits"},
    )
    record_artifact(run, manifest, "student.safetensors", "weights")
    record_artifact(run, manifest, "export/student.onnx", "onnx", precision="fp32")
    write_manifest(run, manifest)
    lines = [
        {
            "epoch": e,
            "loss": 2.0 / (e + 1),
            "ce": 1.5 / (e + 1),
            "hcl": 0.5 / (e + 1),
            "val_top1": 50.0 + 10 * e,
        }
        for e in range(3)
    ]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines) + '{"epoch": 3, "lo')
    return run, module


def run_targets(run: Path, module: nn.Module) -> list[Target]:
    from deploy.runners.onnxruntime_runner import OnnxRuntimeRunner

    onnx_path = run / "export" / "student.onnx"
    manifest = read_manifest(run)
    entry = manifest["artifacts"]["export/student.onnx"]
    return [
        Target("torch/fp32", "fp32", lambda: ModuleRunner(module), "student.safetensors", 16),
        Target(
            "onnxruntime/fp32",
            "fp32",
            lambda: OnnxRuntimeRunner(onnx_path, providers=["CPUExecutionProvider"], threads=1),
            "export/student.onnx",
            entry["size_bytes"],
            entry["sha256"],
        ),
        Target("tensorrt/fp16", "fp16", missing_tensorrt, "export/student.fp16.plan"),
    ]


def measure(run: Path, module: nn.Module) -> None:
    targets = run_targets(run, module)
    save_result(run, VALIDATE_FILE, validate_runners(targets, image_batches(labeller=module)))
    ticks = iter(range(0, 10**12, 1_500_000))  # every clock reading is 1.5 ms after the last

    def timer(runner: Runner) -> PerfCounterTimer:
        return PerfCounterTimer(lambda: next(ticks))

    save_result(
        run,
        BENCH_FILE,
        benchmark_runners(targets, batch_sizes=(1, 4), warmup=1, iters=3, timer_factory=timer),
    )


@pytest.fixture
def measured_run(tmp_path: Path) -> Path:
    run, module = make_run(tmp_path)
    measure(run, module)
    return run


def test_report_json_holds_every_key_of_the_design(measured_run: Path) -> None:
    report = write_report(measured_run)
    on_disk = json.loads((measured_run / "report" / "report.json").read_text())
    assert on_disk == json.loads(json.dumps(report))

    assert list(format_entries(on_disk)) == list(FORMATS)
    for key in FORMATS:
        assert set(on_disk[key]) >= ENTRY_KEYS, key
    ort = on_disk["onnxruntime/fp32"]
    assert ort["status"] == "ok" and ort["reason"] is None
    assert ort["size_bytes"] == (measured_run / "export" / "student.onnx").stat().st_size
    assert {"top1", "top5", "n"} <= set(ort["accuracy"]) and ort["accuracy"]["n"] == 48
    assert {"max_abs_diff", "mean_abs_diff", "top1_agreement"} <= set(ort["parity"])
    assert ort["parity"]["top1_agreement"] == 100.0
    assert set(ort["latency"]) == {"1", "4"}
    for stats in ort["latency"].values():
        assert set(stats) >= LATENCY_KEYS
        assert stats["p50_ms"] == pytest.approx(1.5)  # the injected clock

    trt = on_disk["tensorrt/fp16"]
    assert trt["status"] == "skipped" and "TensorRT is not installed" in trt["reason"]
    assert trt["accuracy"] is None and trt["parity"] is None and trt["latency"] == {}

    env = on_disk["environment"]
    assert {"cpu", "gpu", "libraries", "threads"} <= set(env) and env["source"] == "bench"
    run = on_disk["run"]
    assert run["method"] == "reviewkd" and run["student"]["top1"] == 81.5 and run["teacher"]["top1"] == 90.25
    assert run["epochs"] == 3  # the torn fourth line is skipped
    assert on_disk["validation"]["passed"] is True


def test_report_md_and_self_contained_html(measured_run: Path) -> None:
    write_report(measured_run)
    out = measured_run / "report"
    markdown = (out / "report.md").read_text()
    for key in FORMATS:
        assert key in markdown
    assert "| format | status |" in markdown and "81.50" in markdown

    page = (out / "report.html").read_text()
    assert not re.search(r"https?://", page)
    assert not re.search(r"<(script|link)\b", page)
    images = re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', page)
    assert len(images) == 3
    assert all(base64.b64decode(data).startswith(PNG_MAGIC) for data in images)
    for name in ("latency.png", "accuracy_size.png", "training.png"):
        assert (out / name).read_bytes().startswith(PNG_MAGIC)

    recorded = read_manifest(measured_run)["artifacts"]
    for name in ("report.json", "report.md", "report.html", "latency.png", "validate.json", "bench.json"):
        entry = recorded[f"report/{name}"]
        assert entry["kind"] == "report" and entry["sha256"] == sha256_file(out / name)


def test_final_table_lists_every_format(measured_run: Path) -> None:
    table = format_final_table(write_report(measured_run))
    lines = table.splitlines()
    assert lines[0].split() == [
        "format",
        "status",
        "size",
        "MB",
        "top-1",
        "%",
        "agree",
        "%",
        "p50",
        "ms",
        "@1",
        "img/s",
        "@4",
    ]
    rows = {line.split()[0]: line.split() for line in lines[2:5]}
    assert set(rows) == set(FORMATS)
    assert rows["onnxruntime/fp32"][1:2] == ["ok"]
    assert rows["onnxruntime/fp32"][4:] == ["100.00", "1.500", str(round(4 * 1000 / 1.5))]
    assert rows["torch/fp32"][4] == "ref"
    assert rows["tensorrt/fp16"][1:] == ["skipped", "-", "-", "-", "-", "-"]
    assert any(
        line.startswith("tensorrt/fp16: skipped: validate, bench: TensorRT is not installed")
        for line in lines
    )


def test_a_run_without_measurements_says_not_measured(tmp_path: Path) -> None:
    run, _ = make_run(tmp_path)
    report = write_report(run)
    entries = format_entries(report)
    assert list(entries) == ["torch/fp32", "onnxruntime/fp32"]
    for entry in entries.values():
        assert entry["status"] == "not measured"
        assert entry["accuracy"] is None and entry["parity"] is None and entry["latency"] == {}
        assert "report/validate.json is missing" in entry["reason"]
    assert report["validation"]["status"] == "not measured"
    assert report["environment"]["source"] == "report"
    # Sizes come from the manifest; no accuracy or latency is shown.
    table = format_final_table(report)
    row = next(line.split() for line in table.splitlines() if line.startswith("onnxruntime/fp32"))
    assert row[1:3] == ["not", "measured"]
    assert row[4:] == ["-", "-", "-", "-"]
    # Only the training curves can be drawn.
    assert report["plots"] == ["accuracy_size.png", "training.png"]
    page = (run / "report" / "report.html").read_text()
    assert "run reviewkd validate" in page and "run reviewkd bench" in page
    assert not (run / "report" / "latency.png").exists()


def test_results_of_a_changed_file_are_not_reported(measured_run: Path) -> None:
    manifest = read_manifest(measured_run)
    onnx_path = measured_run / "export" / "student.onnx"
    onnx_path.write_bytes(onnx_path.read_bytes() + b"\0")  # a re-export after validation
    record_artifact(measured_run, manifest, "export/student.onnx", "onnx", precision="fp32")
    write_manifest(measured_run, manifest)
    entry = build_report(measured_run)["onnxruntime/fp32"]
    assert entry["status"] == "not measured"
    assert "changed after validate ran" in entry["reason"]
    assert entry["accuracy"] is None and entry["latency"] == {}


def test_failed_validation_shows_in_the_table(tmp_path: Path) -> None:
    run, module = make_run(tmp_path)

    def wrong(images: np.ndarray) -> np.ndarray:
        return ModuleRunner(module).infer(images) + np.float32(0.01)

    class Shifted(ModuleRunner):
        backend = "onnxruntime"

        def _infer(self, images: np.ndarray) -> np.ndarray:
            return wrong(images)

    targets = [
        Target("torch/fp32", "fp32", lambda: ModuleRunner(module)),
        Target("onnxruntime/fp32", "fp32", lambda: Shifted(module)),
    ]
    save_result(run, VALIDATE_FILE, validate_runners(targets, image_batches(labeller=module)))
    report = write_report(run)
    assert report["validation"]["passed"] is False
    assert report["onnxruntime/fp32"]["status"] == "ok"  # it ran; its gate failed
    table = format_final_table(report)
    assert "validation FAILED: onnxruntime/fp32: gate max_abs_diff failed" in table


def test_corrupt_stage_results_are_a_usage_error(tmp_path: Path) -> None:
    run, _ = make_run(tmp_path)
    (run / "report").mkdir()
    (run / "report" / VALIDATE_FILE).write_text("{not json")
    with pytest.raises(UsageError, match=r"validate\.json"):
        load_result(run, VALIDATE_FILE)
    with pytest.raises(UsageError, match=r"validate\.json"):
        write_report(run)
