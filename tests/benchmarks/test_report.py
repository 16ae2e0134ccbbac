"""benchmarks.report: report.json keys, report.md, a self-contained report.html, the final table,
and the distillation headline over the run's cross-entropy baseline."""

from __future__ import annotations

import base64
import json
import re
import sys
from pathlib import Path

import numpy as np
import pytest
from torch import nn

from benchmarks.latency import PerfCounterTimer, benchmark_runners
from benchmarks.report import (
    BENCH_FILE,
    VALIDATE_FILE,
    build_report,
    document,
    format_entries,
    format_final_table,
    load_result,
    save_result,
    write_report,
)
from benchmarks.report.plots import pareto_front, pareto_points
from benchmarks.targets import Target
from benchmarks.trt_breakdown import IterationTimes, summarize_breakdown
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


def _write_metrics(run: Path, val_top1: list[float]) -> None:
    lines = [
        {"epoch": e + 1, "loss": 2.0 / (e + 1), "ce": 1.5 / (e + 1), "hcl": 0.5 / (e + 1), "val_top1": top1}
        for e, top1 in enumerate(val_top1)
    ]
    # A torn last line, as a run killed mid-write leaves it.
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines) + '{"epoch": 4, "lo')


def add_ce_baseline(run: Path, top1: float = 78.25) -> None:
    """What `reviewkd run` adds: a cross-entropy student in RUN/baseline_ce, named in the manifest."""
    (run / "baseline_ce").mkdir()
    _write_metrics(run / "baseline_ce", [45.0, 60.0, top1])
    manifest = read_manifest(run)
    manifest["baselines"] = {"ce": {"top1": top1, "top5": 98.0, "run": "baseline_ce", "sha256": "0" * 64}}
    write_manifest(run, manifest)


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
    _write_metrics(run, [50.0, 60.0, 81.5])
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
    assert re.search(r"^\| format +\| status +\|", markdown, flags=re.MULTILINE) and "81.50" in markdown
    assert "max \\|diff\\|" in markdown  # a "|" inside a cell does not split the column

    page = (out / "report.html").read_text()
    assert not re.search(r"https?://", page)
    assert not re.search(r"<(script|link)\b", page)
    images = re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', page)
    assert len(images) == 5
    assert all(base64.b64decode(data).startswith(PNG_MAGIC) for data in images)
    drawn = ("latency.png", "latency_distribution.png", "accuracy_size.png", "pareto.png", "training.png")
    for name in drawn:
        assert (out / name).read_bytes().startswith(PNG_MAGIC)

    recorded = read_manifest(measured_run)["artifacts"]
    for name in ("report.json", "report.md", "report.html", "latency.png", "validate.json", "bench.json"):
        entry = recorded[f"report/{name}"]
        assert entry["kind"] == "report" and entry["sha256"] == sha256_file(out / name)


def _columns(table_lines: list[str]) -> list[list[str]]:
    """Split the table under its dashed rule: each cell is the text above its run of dashes."""
    spans = [m.span() for m in re.finditer(r"-+", table_lines[1])]
    return [[line[start:end].strip() for start, end in spans] for line in table_lines]


def test_final_table_lists_every_format_in_aligned_columns(measured_run: Path) -> None:
    lines = format_final_table(write_report(measured_run)).splitlines()
    assert lines[0].startswith("distillation gain: ")
    table = lines[1:6]
    rule = table[1]
    assert set(rule) == {"-", " "} and "   " not in rule  # dashes two spaces apart
    cells = _columns(table)
    assert cells[0] == [
        "format", "status", "size MB", "top-1 %", "drop [95% CI]", "agree %", "p50 ms @1", "img/s @4"
    ]  # fmt: skip
    rows = {row[0]: row for row in cells[2:]}
    assert set(rows) == set(FORMATS)
    assert rows["onnxruntime/fp32"][1:2] == ["ok"]
    assert rows["onnxruntime/fp32"][5:] == ["100.00", "1.500", str(round(4 * 1000 / 1.5))]
    assert rows["torch/fp32"][4:6] == ["ref", "ref"]
    assert rows["tensorrt/fp16"][1:] == ["skipped", "-", "-", "-", "-", "-", "-"]
    # Names and statuses flush left, numbers flush right, each column as wide as its widest cell.
    for line in table[2:]:
        for index, (start, end) in enumerate(m.span() for m in re.finditer(r"-+", rule)):
            cell = line[start:end]
            assert cell.rstrip() == cell.strip() if index < 2 else cell.lstrip() == cell.strip(), line
    assert all(len(line) <= len(rule) for line in table)
    assert any(
        line.startswith("tensorrt/fp16: skipped: validate, bench: TensorRT is not installed")
        for line in lines[6:]
    )


def test_a_final_table_column_is_one_line(measured_run: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    samples = document.Column(
        "n", "right", lambda key, entry, batch: str((entry["accuracy"] or {}).get("n", "-"))
    )
    monkeypatch.setattr(document, "FINAL_TABLE_COLUMNS", (*document.FINAL_TABLE_COLUMNS, samples))
    cells = _columns(format_final_table(write_report(measured_run)).splitlines()[1:6])
    assert cells[0][-2:] == ["img/s @4", "n"]
    assert {row[0]: row[-1] for row in cells[2:]} == {
        "torch/fp32": "48",
        "onnxruntime/fp32": "48",
        "tensorrt/fp16": "-",
    }
    markdown = (measured_run / "report" / "report.md").read_text()
    assert re.search(r"^\| format .*\| +n \|$", markdown, flags=re.MULTILINE)


def test_headline_states_the_gain_over_the_cross_entropy_student(tmp_path: Path) -> None:
    run, module = make_run(tmp_path)
    add_ce_baseline(run, top1=78.25)
    measure(run, module)
    report = write_report(run)
    gain = report["distillation"]
    assert gain["status"] == "ok" and gain["baseline_run"] == "baseline_ce"
    assert gain["gain_points"] == pytest.approx(81.5 - 78.25)
    line = "distillation gain: +3.25 top-1 points, reviewkd 81.50% vs cross-entropy 78.25%"
    assert format_final_table(report).splitlines()[0].startswith(line)
    out = run / "report"
    assert f"**{line}" in (out / "report.md").read_text()
    page = (out / "report.html").read_text()
    assert f'<p class="headline">{line}' in page
    # The students' curves: one more plot, embedded like the others.
    assert report["plots"][-1] == "students.png"
    assert (out / "students.png").read_bytes().startswith(PNG_MAGIC)
    assert len(re.findall(r'src="data:image/png;base64,', page)) == 6
    assert read_manifest(run)["artifacts"]["report/students.png"]["kind"] == "report"

    # The baseline gone (a run without one): no gain, and no stale curves left behind.
    manifest = read_manifest(run)
    del manifest["baselines"]
    write_manifest(run, manifest)
    report = write_report(run)
    assert report["distillation"]["status"] == "not measured"
    assert not (out / "students.png").exists()
    assert "report/students.png" not in read_manifest(run)["artifacts"]


def test_without_a_baseline_the_headline_says_so(measured_run: Path) -> None:
    report = write_report(measured_run)
    assert report["distillation"]["status"] == "not measured"
    first = format_final_table(report).splitlines()[0]
    assert first.startswith("distillation gain: not measured: this run has no cross-entropy baseline")
    assert "--no-baseline" in first
    assert first in (measured_run / "report" / "report.md").read_text()
    assert "students.png" not in report["plots"]


def test_a_cross_entropy_student_claims_no_gain(tmp_path: Path) -> None:
    run, _ = make_run(tmp_path)
    add_ce_baseline(run)
    manifest = read_manifest(run)
    manifest["method"] = {"name": "ce", "params": {}}
    write_manifest(run, manifest)
    gain = build_report(run)["distillation"]
    assert gain["status"] == "not measured" and "nothing was distilled" in gain["reason"]
    assert "gain_points" not in gain


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
    assert row[4:] == ["-", "-", "-", "-", "-"]
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


def test_a_validation_on_fewer_images_is_kept_apart_from_the_full_one(tmp_path: Path) -> None:
    # Issue 22 item 7: `validate --limit 7` merged into the full results, and the report showed a
    # 7-image reference beside drops measured against the old one.
    run, module = make_run(tmp_path)
    targets = run_targets(run, module)
    save_result(run, VALIDATE_FILE, validate_runners(targets, image_batches(48, labeller=module)))
    few = save_result(run, VALIDATE_FILE, validate_runners(targets[:1], image_batches(7, labeller=module)))
    assert few["images"] == 7 and few["kept_from_earlier"] == [] and list(few["results"]) == ["torch/fp32"]
    [full] = few["other_measurements"]
    assert full["images"] == 48 and full["results"]["onnxruntime/fp32"]["status"] == "ok"

    report = write_report(run)
    # The report shows the measurement on the most images; the other is listed with its source.
    assert report["torch/fp32"]["accuracy"]["n"] == 48 and report["onnxruntime/fp32"]["accuracy"]["n"] == 48
    [other] = report["validation"]["other_measurements"]
    assert other["images"] == 7 and list(other["results"]) == ["torch/fp32"]
    markdown = (run / "report" / "report.md").read_text()
    rows = [line for line in markdown.splitlines() if line.startswith("| torch/fp32 ")]
    assert any("images given by the caller, 48 images" in row for row in rows)
    assert any("images given by the caller, 7 images" in row for row in rows)


def test_no_drop_is_shown_across_different_image_sets(measured_run: Path) -> None:
    path = measured_run / "report" / VALIDATE_FILE
    data = json.loads(path.read_text())
    data["results"]["onnxruntime/fp32"]["accuracy"]["n"] = 7  # measured on other images than its reference
    path.write_text(json.dumps(data))
    report = write_report(measured_run)
    accuracy = report["onnxruntime/fp32"]["accuracy"]
    assert accuracy["top1_drop"] is None and "top1_drop_ci" not in accuracy
    table = format_final_table(report)
    assert "onnxruntime/fp32: no drop: measured on 7 images, the reference torch/fp32 on 48 images" in table


def test_results_of_an_older_schema_are_measured_again(tmp_path: Path) -> None:
    run, module = make_run(tmp_path)
    measure(run, module)
    path = run / "report" / VALIDATE_FILE
    data = json.loads(path.read_text())
    data["schema_version"] = 1  # as reviewkd wrote it before results recorded what they measured
    del data["measured"]
    path.write_text(json.dumps(data))

    entry = build_report(run)["onnxruntime/fp32"]
    assert entry["accuracy"] is None and entry["validate"]["status"] == "not measured"
    assert "report/validate.json has schema version 1" in entry["validate"]["reason"]
    assert "run reviewkd validate again" in entry["validate"]["reason"]

    saved = save_result(run, VALIDATE_FILE, validate_runners(run_targets(run, module), image_batches()))
    assert saved["other_measurements"] == [] and "schema version 1" in saved["discarded"][0]


def test_results_of_another_student_are_not_reported(tmp_path: Path) -> None:
    run, module = make_run(tmp_path)
    manifest = read_manifest(run)
    manifest["student"]["sha256"] = "a" * 64
    write_manifest(run, manifest)
    targets = run_targets(run, module)
    result = validate_runners(targets, image_batches(labeller=module), student_sha256="a" * 64)
    assert result["measured"]["student_sha256"] == "a" * 64
    save_result(run, VALIDATE_FILE, result)
    manifest["student"]["sha256"] = "b" * 64  # retrained since
    write_manifest(run, manifest)

    entry = build_report(run)["torch/fp32"]
    assert entry["accuracy"] is None
    reason = entry["validate"]["reason"]
    assert "measured student aaaaaaaaaaaa…, the run's student is now bbbbbbbbbbbb…" in reason


def test_the_accuracy_heading_names_the_reference_validate_used(tmp_path: Path) -> None:
    # A run without the student's weights is compared with its fp32 ONNX file (benchmarks.runs).
    from benchmarks.runs import validate_run
    from tests.helpers import make_run as make_onnx_run
    from tests.helpers import random_batch

    run, _ = make_onnx_run(tmp_path)
    batches = [(random_batch(8), np.arange(8) % 3)]
    result = validate_run(run, device="cpu", batches=batches)
    assert result["reference"] == "onnxruntime/fp32"
    write_report(run)
    markdown = (run / "report" / "report.md").read_text()
    assert "## Accuracy and parity against onnxruntime/fp32" in markdown
    assert "against torch/fp32" not in markdown
    assert f"Reference: {result['reference_note']}." in markdown


def test_without_matplotlib_the_plots_section_names_the_missing_extra(
    measured_run: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # how Python marks a module it cannot import
    write_report(measured_run)
    markdown = (measured_run / "report" / "report.md").read_text()
    plots = markdown.split("## Plots", 1)[1].split("## ", 1)[0]
    assert "matplotlib is not installed" in plots and "pip install 'reviewkd[plots]'" in plots
    assert "Nothing to plot" not in plots


def test_latencies_from_another_machine_are_labelled_with_it(
    measured_run: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # bench on the device keeps the training machine's torch/fp32 timings: the report names both.
    import benchmarks.latency

    here = load_result(measured_run, BENCH_FILE)
    assert here is not None
    device = {**here["environment"], "host": "jetson", "cpu": {"model": "ARMv8 Processor rev 1 (v8l)"}}
    monkeypatch.setattr(benchmarks.latency, "collect_environment", lambda threads=None: device)
    run_dir = measured_run
    onnx = [t for t in run_targets(run_dir, tiny_module()) if t.key == "onnxruntime/fp32"]
    saved = save_result(run_dir, BENCH_FILE, benchmark_runners(onnx, batch_sizes=(1,), warmup=1, iters=2))
    assert saved["results"]["onnxruntime/fp32"]["machine"] == "jetson: ARMv8 Processor rev 1 (v8l)"
    assert "torch/fp32" in saved["kept_from_earlier"]

    report = write_report(run_dir)
    table = format_final_table(report)
    training = saved["results"]["torch/fp32"]["machine"]
    assert training != "jetson: ARMv8 Processor rev 1 (v8l)"
    assert (
        f"latency timed on different machines: torch/fp32 on {training};"
        " onnxruntime/fp32 on jetson: ARMv8 Processor rev 1 (v8l)"
    ) in table
    markdown = (run_dir / "report" / "report.md").read_text()
    assert re.search(r"^\| onnxruntime/fp32 +\| jetson: ARMv8", markdown, flags=re.MULTILINE)


def test_the_latency_table_shows_intervals_verdicts_and_comparisons(measured_run: Path) -> None:
    path = measured_run / "report" / BENCH_FILE
    data = json.loads(path.read_text())
    # Three calls on a clock that ticks 1.5 ms each: too few to judge, so noisy, with the advice.
    stats = data["results"]["onnxruntime/fp32"]["latency"]["1"]
    assert stats["verdict"] == "noisy" and stats["noisy_because"].startswith("only 3 timed calls")
    data["comparisons"] = {
        "onnxruntime/fp32,torch/fp32": {
            "a": "onnxruntime/fp32",
            "b": "torch/fp32",
            "status": "ok",
            "reason": None,
            "batches": {
                "1": {
                    "pairs": 400,
                    "a_p50_ms": 1.0,
                    "b_p50_ms": 2.0,
                    "time_ratio": 0.5,
                    "time_ratio_ci": [0.48, 0.52],
                    "verdict": "faster",
                    "machine_flags": ["other processes used 45% of the CPUs' time during the measurement"],
                }
            },
            "skipped_batches": {},
        }
    }
    path.write_text(json.dumps(data))
    write_report(measured_run)
    markdown = (measured_run / "report" / "report.md").read_text()
    assert "p50 ms [95% CI]" in markdown and "1.500 [1.500-1.500]" in markdown
    assert "| noisy" in markdown and "A measurement is noisy when its CV exceeds 0.1" in markdown
    # Other load on the machine running the test, if any, is named after the statistical reasons.
    assert "onnxruntime/fp32 batch 1 is noisy: only 3 timed calls (< 30)" in markdown
    assert ": lock clocks, stop other load, or give more time" in markdown
    assert (
        "onnxruntime/fp32 vs torch/fp32, batch 1, interleaved: faster, time ratio 0.500"
        " (95% CI 0.480-0.520, 400 pairs)" in markdown
    )
    assert "onnxruntime/fp32 vs torch/fp32, batch 1, machine: other processes used 45%" in markdown


def test_the_pareto_front_keeps_the_formats_nothing_beats_on_both_cost_and_accuracy() -> None:
    points = {"fp32": (2.0, 81.5), "fp16": (1.0, 81.5), "int8": (0.5, 80.0), "slow": (3.0, 80.0)}
    assert pareto_front(points) == ["int8", "fp16"]
    assert pareto_front({"a": (1.0, 80.0), "b": (1.0, 80.0)}) == ["a", "b"]  # ties dominate neither


def test_the_pareto_points_take_energy_only_where_it_was_measured(measured_run: Path) -> None:
    path = measured_run / "report" / BENCH_FILE
    data = json.loads(path.read_text())
    keys = [key for key, entry in data["results"].items() if "1" in entry["latency"]]
    for key in keys:
        data["results"][key]["latency"]["1"]["energy"] = {"unknown": "no power rail or energy counter found"}
    data["results"][keys[0]]["latency"]["1"]["energy"] = {
        "sources": ["INA3221 (hwmon)"],
        "seconds": 1.0,
        "images": 100,
        "rail_samples": 50,
        "baseline": "idle, read just before",
        "per_source": {"VDD_IN": {"busy_mw": 6000.0, "idle_mw": 4000.0, "mj_per_image": 20.0}},
        "total_mj_per_image": 20.0,
        "total_of": "VDD_IN",
    }
    path.write_text(json.dumps(data))
    report = write_report(measured_run)
    latency, energy, batch = pareto_points(report)
    assert set(latency) == set(keys) and len(keys) >= 2 and batch == "batch 1"
    assert energy == {keys[0]: (20.0, latency[keys[0]][1])}
    markdown = (measured_run / "report" / "report.md").read_text()
    assert f"{keys[0]} batch 1 energy per image, mJ above idle: total 20.0 (VDD_IN)" in markdown
    assert "energy not measured for " in markdown and ": no power rail or energy counter found" in markdown


def test_the_report_states_each_tensorrt_breakdown(measured_run: Path) -> None:
    path = measured_run / "report" / BENCH_FILE
    data = json.loads(path.read_text())
    key = next(k for k, entry in data["results"].items() if "1" in entry["latency"])
    iterations = [IterationTimes(0.25, 1.5, 0.125, 0.05)] * 40
    summary = summarize_breakdown(iterations, 1, 0.075, {"used": True, "reason": None})
    data["results"][key]["trt_breakdown"] = {"1": summary, "8": {"unknown": "the breakdown failed: boom"}}
    path.write_text(json.dumps(data))
    write_report(measured_run)
    markdown = (measured_run / "report" / "report.md").read_text()
    assert (
        f"{key} batch 1, TensorRT breakdown: H2D p50 0.250 ms, GPU compute p50 1.500 ms, D2H p50 0.125 ms,"
        " latency p50 1.875 ms, enqueue p50 0.050 ms; 533.3 images/s; CUDA graph; stable" in markdown
    )
    assert f"{key} batch 8, TensorRT breakdown: unknown (the breakdown failed: boom)" in markdown


def test_the_report_shows_each_measurements_other_load_and_each_formats_machine_state(
    measured_run: Path,
) -> None:
    path = measured_run / "report" / BENCH_FILE
    data = json.loads(path.read_text())
    entry = data["results"]["onnxruntime/fp32"]
    entry["latency"]["1"]["cpu_usage"] = {"other_processes_share": 0.45, "own_share": 0.3, "steal_share": 0.0}
    entry["machine_state"] = {
        "cpu": {
            "governor": "powersave",
            "frequency_mhz": [800.0, 1200.0],
            "min_max_mhz": [800.0, 3500.0],
            "load_average": [1.5, 1.0, 0.5],
        },
        "nvidia_gpus": {"unknown": "not probed: the measurement ran on the CPU"},
        "jetson": {"unknown": "not a Jetson (no /etc/nv_tegra_release)"},
    }
    entry["threads"] = {"intra_op": 1, "inter_op": 0, "OMP_NUM_THREADS": {"unknown": "not set"}}
    path.write_text(json.dumps(data))
    write_report(measured_run)
    markdown = (measured_run / "report" / "report.md").read_text()
    header = next(line for line in markdown.splitlines() if "p50 ms [95% CI]" in line)
    rows = [line for line in markdown.splitlines() if line.startswith("| onnxruntime/fp32")]
    row = next(line for line in rows if "45%" in line)
    assert [cell.strip() for cell in header.split("|")][-4:-1] == ["other load", "mJ/image", "verdict"]
    assert [cell.strip() for cell in row.split("|")][-4:-2] == ["45%", "-"]
    assert (
        "machine state for onnxruntime/fp32: CPU: governor powersave, frequency 800-1200 MHz,"
        " load average 1.5 1.0 0.5" in markdown
    )
    assert "NVIDIA GPUs: unknown (not probed: the measurement ran on the CPU)" in markdown
    assert 'machine state for onnxruntime/fp32: threads {"intra_op": 1' in markdown


def test_a_bench_result_of_schema_2_is_measured_again_with_the_reason(measured_run: Path) -> None:
    path = measured_run / "report" / BENCH_FILE
    data = json.loads(path.read_text())
    data["schema_version"] = 2  # as reviewkd wrote it before stability verdicts
    for entry in data["results"].values():
        for stats in entry["latency"].values():
            for key in ("p50_ci_ms", "p90_ci_ms", "p99_ci_ms", "cv", "verdict", "noisy_because"):
                del stats[key]
    path.write_text(json.dumps(data))
    entry = build_report(measured_run)["onnxruntime/fp32"]
    assert entry["latency"] == {} and entry["bench"]["status"] == "not measured"
    assert entry["bench"]["reason"] == (
        "not measured: report/bench.json has schema version 2, this reviewkd reads 4 (measurements with a"
        " steady-state warm-up, percentile intervals, a stable/noisy verdict, the machine's state and"
        " energy per image); run reviewkd bench again"
    )


def test_a_comparison_stays_beside_later_benches_of_the_same_kind(measured_run: Path) -> None:
    path = measured_run / "report" / BENCH_FILE
    data = json.loads(path.read_text())
    earlier = {"a": "x/fp32", "b": "y/int8", "status": "skipped", "reason": "no runtime", "batches": {}}
    data["comparisons"] = {"x/fp32,y/int8": earlier}
    path.write_text(json.dumps(data))
    again = {k: v for k, v in data.items() if k != "comparisons"}
    merged = save_result(measured_run, BENCH_FILE, again)
    assert merged["comparisons"] == {"x/fp32,y/int8": earlier}
    # A comparison alone (no format timed) keeps the settings of the formats benched before it.
    compare_only = {**again, "results": {}, "settings": {"seconds": 9.0}, "comparisons": {}}
    merged = save_result(measured_run, BENCH_FILE, compare_only)
    assert merged["settings"] == data["settings"] and "onnxruntime/fp32" in merged["results"]
    replaced = {**earlier, "reason": "still no runtime"}
    merged = save_result(measured_run, BENCH_FILE, {**again, "comparisons": {"x/fp32,y/int8": replaced}})
    assert merged["comparisons"] == {"x/fp32,y/int8": replaced}


def test_a_run_that_carved_its_val_split_reports_the_test_scores(tmp_path: Path) -> None:
    run, _ = make_run(tmp_path)
    add_ce_baseline(run, top1=78.25)
    manifest = read_manifest(run)
    test = {"split": "test", "n": 360}
    manifest["student"]["test"] = {**test, "top1": 80.0, "top5": 99.0}
    manifest["baselines"]["ce"]["test"] = {**test, "top1": 77.5, "top5": 98.0}
    write_manifest(run, manifest)
    report = build_report(run)
    # The gain and the student's top-1 are the test split's, not the selection split's (81.50 / 78.25).
    assert report["distillation"]["student_score"] == 80.0
    assert report["distillation"]["gain_points"] == pytest.approx(2.5)
    assert report["run"]["student"]["top1"] == 80.0
