"""The export stage on a short digits run: every ONNX flavour, checks, manifest, CLI and errors."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from safetensors.torch import save_file

from deploy.errors import GateFailedError, MissingDependencyError, UsageError
from deploy.gates import DEFAULT_GATES
from deploy.manifest import (
    SHARED_STAGE_FILE,
    new_manifest,
    read_manifest,
    record_artifact,
    verify_artifact,
    write_manifest,
)
from export import engines, pipeline
from export import precision as precision_module
from export.check import CheckDevice, gate, run_onnx
from export.onnx_export import METADATA_KEY, count_weights, load_onnx, onnx_weight_count
from export.pipeline import ExportSummary, export_model, export_run
from export.precision import CALIBRATION_METHODS, zero_points_all_zero
from export.producing import STANDARD_ENGINE_SOURCES
from export.timing import StageTimer
from reviewkd.app.cli import main
from reviewkd.config import Config, DataConfig, ModelConfig, save_config
from reviewkd.data import DATASET_STATS, iter_run_batches
from reviewkd.models import create_model
from tests.helpers import make_run, sessions_as_if_on_gpu

ARCH = "cifar_resnet20"
FP32_MAX_ABS_DIFF = DEFAULT_GATES["fp32"]["max_abs_diff"]
SIZE = 8  # digits are 8x8 natively; small inputs keep the whole file well under a minute
FAST = {"calib_samples": 128, "check_samples": 360, "batch_size": 128}


def _make_run(run: Path, model: torch.nn.Module) -> None:
    """A run directory as the training stage writes it: config, student weights, manifest."""
    mean, std = DATASET_STATS["digits"]
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(run / "student.safetensors"))
    manifest = new_manifest()
    manifest["classes"] = [str(i) for i in range(10)]
    manifest["input"] = {
        "shape": [3, SIZE, SIZE],
        "layout": "NCHW",
        "dtype": "float32",
        "mean": list(mean),
        "std": list(std),
        "resize": None,
    }
    manifest["student"] = {"arch": ARCH, "num_classes": 10}
    record_artifact(run, manifest, "student.safetensors", "weights")
    write_manifest(run, manifest)


@pytest.fixture(scope="module")
def trained_state(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, torch.Tensor]]:
    """A cifar_resnet20 trained for two epochs on 8x8 digits (~96% val): int8 gates need a real model."""
    run = tmp_path_factory.mktemp("digits")
    save_config(
        Config(
            data=DataConfig(dataset="digits", image_size=SIZE, subset=None), student=ModelConfig(arch=ARCH)
        ),
        run / "config.yaml",
    )
    torch.manual_seed(0)
    model = create_model(ARCH, 10)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, nesterov=True)
    for _ in range(2):
        for images, labels in iter_run_batches(run, "train", 64):
            loss = torch.nn.functional.cross_entropy(
                model(torch.from_numpy(images)), torch.from_numpy(labels)
            )
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    model.eval()
    return run, {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.fixture
def digits_run(tmp_path: Path, trained_state: tuple[Path, dict[str, torch.Tensor]]) -> Path:
    source, state = trained_state
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_bytes((source / "config.yaml").read_bytes())
    model = create_model(ARCH, 10)
    model.load_state_dict(state)
    _make_run(run, model)
    return run


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory, trained_state: tuple[Path, dict[str, torch.Tensor]]):
    """One full export (every ONNX flavour plus the uint8 variant), shared by the read-only tests."""
    source, state = trained_state
    run = tmp_path_factory.mktemp("exported")
    (run / "config.yaml").write_bytes((source / "config.yaml").read_bytes())
    model = create_model(ARCH, 10)
    model.load_state_dict(state)
    _make_run(run, model)
    summary = export_run(run, ["onnx", "fp16", "int8", "int8-trt"], bake_preprocessing=True, **FAST)
    return run, summary, model.eval()


FILES = {
    "export/student.onnx": "fp32",
    "export/student.fp16.onnx": "fp16",
    "export/student.int8.onnx": "int8",
    "export/student.int8.trt.onnx": "int8",
    "export/student.uint8.onnx": "fp32",
}


def test_every_format_is_written_checked_and_recorded(
    exported: tuple[Path, ExportSummary, torch.nn.Module],
) -> None:
    run, summary, _ = exported
    summary.raise_for_status()
    assert not summary.failed
    manifest = read_manifest(run)
    for rel, precision in FILES.items():
        assert summary.checks[rel].status == "ok", summary.checks[rel].reason
        entry = manifest["artifacts"][rel]
        assert entry["kind"] == "onnx" and entry["precision"] == precision
        verify_artifact(run, manifest, rel)  # sha256 and size match the file on disk
        model = load_onnx(run / rel, full_check=True)
        meta = json.loads(next(p.value for p in model.metadata_props if p.key == METADATA_KEY))
        assert meta["classes"] == [str(i) for i in range(10)]
        assert meta["source_sha256"] == manifest["artifacts"]["student.safetensors"]["sha256"]
        assert model.opset_import[0].version >= 18
    checks = manifest["export"]["checks"]
    assert checks["export/student.onnx"]["max_abs_diff"] <= FP32_MAX_ABS_DIFF
    assert checks["export/student.onnx"]["top1_agreement"] == 100.0  # percent, as validate reports it
    assert checks["export/student.onnx"]["top1"] > 90.0  # the short training run learned digits
    for rel in ("export/student.int8.onnx", "export/student.int8.trt.onnx"):
        assert checks[rel]["top1"] >= checks[rel]["reference_top1"] - 1.0
    assert checks["export/student.fp16.onnx"]["top1_agreement"] >= 99.0


def test_the_manifest_records_each_stage_of_each_file_and_the_rows_add_up(
    exported: tuple[Path, ExportSummary, torch.nn.Module],
) -> None:
    run, summary, _ = exported
    timing = read_manifest(run)["export"]["timing"]
    assert timing == summary.timing
    stages: dict[str, list[str]] = {}
    for row in timing["stages"]:
        assert row["wall_s"] >= 0 and row["cpu_s"] >= 0
        stages.setdefault(row["file"], []).append(row["stage"])
    candidates = [*(f"calibrate {method}" for method in CALIBRATION_METHODS), "score race"]
    assert stages == {
        SHARED_STAGE_FILE: [
            "read check images",
            "reference logits (PyTorch)",
            "read calibration images",
            "held-out reference logits (fp32 ONNX)",
            "calibration statistics",
        ],
        "export/student.onnx": ["export", "check"],
        "export/student.fp16.onnx": ["convert", "check"],
        "export/student.int8.onnx": [*candidates, "mixed-precision", "check"],
        "export/student.int8.trt.onnx": [*candidates, "mixed-precision", "check"],
        "export/student.uint8.onnx": ["bake", "reference logits (PyTorch)", "check"],
    }
    timed = sum(row["wall_s"] for row in timing["stages"])
    assert timing["untimed_wall_s"] == pytest.approx(timing["total_wall_s"] - timed)
    assert 0 <= timing["untimed_wall_s"] < timing["total_wall_s"]


def _int8_records(run: Path) -> dict[str, Any]:
    """What an export decided and measured for its int8 files: checks, calibration scores, the
    mixed-precision search, the graph. Not the search's latencies, which are timings, nor the file's
    sha256, which covers them (they are in its metadata)."""
    manifest = read_manifest(run)
    records: dict[str, Any] = {}
    for rel in ("export/student.int8.onnx", "export/student.int8.trt.onnx"):
        entry = dict(manifest["artifacts"][rel])
        del entry["sha256"], entry["size_bytes"]
        entry["mixed_precision"] = dict(entry["mixed_precision"])
        del entry["mixed_precision"]["latency_ms_batch32"]
        entry["mixed_precision"]["steps"] = [
            {key: value for key, value in step.items() if key != "latency_ms_batch32"}
            for step in entry["mixed_precision"]["steps"]
        ]
        graph = load_onnx(run / rel).graph.SerializeToString(deterministic=True)
        records[rel] = {"check": manifest["export"]["checks"][rel], "entry": entry, "graph": graph}
    return records


def test_one_fp32_reference_pass_serves_every_int8_flavour_with_the_same_verdicts(
    tmp_path: Path, trained_state: tuple[Path, dict[str, torch.Tensor]], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The held-out fp32 logits are computed once for both int8 flavours, their three calibration
    candidates and their mixed-precision searches; each computing its own (as before) decides and
    measures exactly the same."""
    from export import calibration, check

    source, state = trained_state
    model = create_model(ARCH, 10)
    model.load_state_dict(state)
    fp32_passes: list[Path] = []  # each session export.check.run_onnx opens on the fp32 file
    real_open = check.open_session_on

    def open_session_on(path: Any, device: str, **options: Any) -> Any:
        session, info = real_open(path, device, **options)
        if Path(path).name == "student.onnx":
            fp32_passes.append(Path(path))
        return session, info

    monkeypatch.setattr(check, "open_session_on", open_session_on)
    def export_int8(name: str) -> dict[str, Any]:
        run = tmp_path / name
        run.mkdir()
        (run / "config.yaml").write_bytes((source / "config.yaml").read_bytes())
        _make_run(run, model)
        fp32_passes.clear()
        export_run(run, ["int8", "int8-trt"], **FAST).raise_for_status()
        return _int8_records(run)

    shared = export_int8("shared")
    # The fp32 file's own check on the validation images, then one held-out pass.
    assert len(fp32_passes) == 2

    # As before: every candidate race and every search runs the fp32 file itself.
    real_quantize, real_fit = calibration.quantize_calibrated, calibration.fit_budget

    def quantize(*args: Any, **kwargs: Any) -> dict[str, Any]:
        kwargs.pop("held_out_reference", None)
        return real_quantize(*args, **kwargs)

    def fit(*args: Any, **kwargs: Any) -> Any:
        kwargs.pop("reference", None)
        return real_fit(*args, **kwargs)

    monkeypatch.setattr(calibration, "quantize_calibrated", quantize)
    monkeypatch.setattr(calibration, "fit_budget", fit)  # where quantize_calibrated looks it up
    each = export_int8("each")
    # Its check, the shared pass (unused), then the candidates' and the search's per flavour.
    assert len(fp32_passes) == 2 + 2 * 2
    assert shared == each


def test_weight_count_equals_the_students_after_bn_folding(
    exported: tuple[Path, ExportSummary, torch.nn.Module],
) -> None:
    run, _, model = exported
    weights = read_manifest(run)["export"]["weights"]
    params, expected, folded, unfolded = count_weights(model, (3, SIZE, SIZE))
    assert weights["bn_folded"] is True and folded == 19 and unfolded == 0
    bn_channels = sum(m.num_features for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d))
    # Each folded BN loses weight and bias (2C) and its bias-free conv gains a bias (C).
    assert expected == params - bn_channels
    assert weights["onnx_weights"] == weights["expected_onnx_weights"] == expected
    assert weights["student_params"] == params


def test_the_manifest_records_where_the_reference_and_checks_computed(
    digits_run: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """--check-device auto where neither side can use a GPU: both on the CPU, each reason recorded,
    and every check says where its file ran."""
    from export import check
    from reviewkd import runtime

    monkeypatch.setattr(runtime, "torch_cuda_missing", lambda: "no GPU for torch (test)")
    monkeypatch.setattr(check, "onnxruntime_cuda_missing", lambda: "no onnxruntime-gpu (test)")
    export_run(digits_run, ["onnx", "fp16"], **FAST).raise_for_status()
    export = read_manifest(digits_run)["export"]
    assert export["check_device"] == {
        "torch": "cpu",
        "onnxruntime": "cpu",
        "notes": [
            "PyTorch on the CPU: no GPU for torch (test)",
            "ONNX Runtime on the CPU: no onnxruntime-gpu (test)",
        ],
    }
    assert {rel: c["device"] for rel, c in export["checks"].items()} == {
        "export/student.onnx": "cpu",
        "export/student.fp16.onnx": "cpu",
    }


def test_the_onnxruntime_device_reaches_every_session_but_the_cpu_int8_flavours(
    digits_run: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An export whose ONNX side resolved to "cuda": every session its checks, held-out reference and
    calibration races open asks for CUDA, except the ONNX Runtime CPU int8 flavour's files, opened
    on the CPU alone; each check records where its file ran (the searches: test_mixed_precision)."""
    from deploy.runners.onnxruntime_runner import CPU_PROVIDER, CUDA_PROVIDER

    opened = sessions_as_if_on_gpu(monkeypatch)
    monkeypatch.setattr(pipeline, "check_device_here", lambda requested: CheckDevice("cpu", "cuda"))
    export_run(digits_run, ["onnx", "fp16", "int8", "int8-trt"], **FAST)
    by_flavour: dict[str | None, list[list[str]]] = {}
    for flavour, providers in opened:
        by_flavour.setdefault(flavour, []).append(providers)
    gpu, cpu = [CUDA_PROVIDER, CPU_PROVIDER], [CPU_PROVIDER]
    # fp32: its check and the held-out reference; fp16: its check; each int8 flavour: three race
    # candidates, its check, and the search's files where the budget was missed.
    assert by_flavour[None] == [gpu] * 3
    assert by_flavour["cpu"] == [cpu] * len(by_flavour["cpu"]) and len(by_flavour["cpu"]) >= 4
    assert by_flavour["trt"] == [gpu] * len(by_flavour["trt"]) and len(by_flavour["trt"]) >= 4
    export = read_manifest(digits_run)["export"]
    assert export["check_device"] == {"torch": "cpu", "onnxruntime": "cuda", "notes": []}
    devices = {rel: c["device"] for rel, c in export["checks"].items()}
    assert devices == {
        "export/student.onnx": "cuda",
        "export/student.fp16.onnx": "cuda",
        "export/student.int8.onnx": "cpu",
        "export/student.int8.trt.onnx": "cuda",
    }


def test_flavours_have_the_promised_types(exported: tuple[Path, ExportSummary, torch.nn.Module]) -> None:
    run, _, _ = exported
    fp16 = onnx.load(str(run / "export/student.fp16.onnx"))
    assert fp16.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    assert fp16.graph.output[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    conv_weights = {n.input[1] for n in fp16.graph.node if n.op_type == "Conv"}
    assert {i.data_type for i in fp16.graph.initializer if i.name in conv_weights} == {
        onnx.TensorProto.FLOAT16
    }

    trt = onnx.load(str(run / "export/student.int8.trt.onnx"))
    assert zero_points_all_zero(trt)
    zero_types = {i.data_type for i in trt.graph.initializer if i.name.endswith("_zero_point")}
    assert zero_types == {onnx.TensorProto.INT8}
    per_channel = [
        n for n in trt.graph.node if n.op_type == "DequantizeLinear" and n.input[0] in conv_weights_of(trt)
    ]
    assert per_channel and all(_scale_size(trt, n) > 1 for n in per_channel)

    cpu = onnx.load(str(run / "export/student.int8.onnx"))
    assert onnx.TensorProto.UINT8 in {
        i.data_type for i in cpu.graph.initializer if i.name.endswith("_zero_point")
    }

    uint8 = onnx.load(str(run / "export/student.uint8.onnx"))
    dims = [d.dim_param or d.dim_value for d in uint8.graph.input[0].type.tensor_type.shape.dim]
    assert uint8.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.UINT8
    assert dims[1:] == [SIZE, SIZE, 3]


def conv_weights_of(model: onnx.ModelProto) -> set[str]:
    """Names of the quantized conv weights (inputs of DequantizeLinear that are initializers of rank 4)."""
    return {i.name for i in model.graph.initializer if len(i.dims) == 4}


def _scale_size(model: onnx.ModelProto, node: onnx.NodeProto) -> int:
    scale = next(i for i in model.graph.initializer if i.name == node.input[1])
    return int(np.prod(scale.dims)) if scale.dims else 1


@pytest.mark.parametrize("batch", [1, 7, 64])
def test_dynamic_batch(exported: tuple[Path, ExportSummary, torch.nn.Module], batch: int) -> None:
    run, _, model = exported
    images = np.random.default_rng(batch).standard_normal((batch, 3, SIZE, SIZE), dtype=np.float32)
    with torch.no_grad():
        reference = model(torch.from_numpy(images)).numpy()
    for rel in (
        "export/student.onnx",
        "export/student.fp16.onnx",
        "export/student.int8.onnx",
        "export/student.int8.trt.onnx",
    ):
        session = ort.InferenceSession(str(run / rel), providers=["CPUExecutionProvider"])
        assert session.get_inputs()[0].name == "images" and session.get_outputs()[0].name == "logits"
        logits = session.run(None, {"images": images})[0]
        assert logits.shape == (batch, 10) and logits.dtype == np.float32
        if rel == "export/student.onnx":
            assert np.abs(logits - reference).max() <= FP32_MAX_ABS_DIFF
    pixels = np.random.default_rng(batch).integers(0, 256, (batch, SIZE, SIZE, 3), dtype=np.uint8)
    session = ort.InferenceSession(str(run / "export/student.uint8.onnx"), providers=["CPUExecutionProvider"])
    assert session.run(None, {"images": pixels})[0].shape == (batch, 10)


def test_gate_thresholds_are_validates_and_in_percent() -> None:
    base = {"max_abs_diff": 1e-4, "mean_abs_diff": 1e-5, "top1_agreement": 100.0}
    assert gate("fp32", base)[0] == "ok"
    assert gate("fp32", {**base, "max_abs_diff": 1.01e-4})[0] == "failed"
    assert gate("fp32", {**base, "top1_agreement": 99.9})[0] == "failed"
    assert gate("uint8", {**base, "top1_agreement": 99.9})[0] == "failed"  # held to the fp32 gates
    assert gate("fp16", {**base, "top1_agreement": 99.0})[0] == "ok"
    assert gate("fp16", {**base, "top1_agreement": 98.9})[0] == "failed"
    assert gate("int8", {**base, "top1": 90.0, "reference_top1": 91.0})[0] == "ok"
    status, reason = gate("int8", {**base, "top1": 89.9, "reference_top1": 91.0})
    assert status == "failed" and "gate max_top1_drop failed: accuracy.top1_drop = 1.1" in reason
    assert gate("int8", base)[0] == "skipped"
    # The same numbers through validate's table give the same verdicts: one gate table for both.
    assert gate("fp16", {**base, "top1_agreement": 98.9}, DEFAULT_GATES)[0] == "failed"
    assert gate("fp16", {**base, "top1_agreement": 98.9}, {"fp16": {"min_agreement": 98.0}})[0] == "ok"


def test_on_random_inputs_a_flipped_near_tie_is_inconclusive_and_the_logit_error_decides() -> None:
    from export.check import compare

    rng = np.random.default_rng(0)
    reference = rng.standard_normal((64, 10)).astype(np.float32)
    reference[0, :2] = [3.0, 3.0 - 1e-5]  # a near-tie, as random inputs give
    fp16 = reference + 1e-4 * rng.standard_normal(reference.shape).astype(np.float32)
    fp16[0, :2] = [3.0 - 1e-5, 3.0]  # the tie flips: 63 of 64 agree
    metrics = compare(fp16, reference, None)
    assert metrics["top1_agreement"] == 100 * 63 / 64 and metrics["rel_l2_error"] < 1e-3
    status, reason = gate("fp16", metrics, random_inputs=True)
    assert status == "ok", reason
    assert "inconclusive: 64 inputs cannot resolve a 99% agreement minimum" in reason
    assert "gate max_rel_l2_error passed" in reason
    # A file whose logits are wrong fails on the statistic that means something on random inputs.
    wrong = compare(reference[:, ::-1].copy(), reference, None)
    status, reason = gate("fp16", wrong, random_inputs=True)
    assert status == "failed" and "gate max_rel_l2_error failed" in reason
    # On labelled validation images the agreement gate is the plain threshold, as validate applies it.
    assert gate("fp16", metrics)[0] == "failed"


@pytest.mark.shared_data
@pytest.mark.slow
def test_the_issue_22_export_of_a_pretrained_resnet20_without_data_passes(
    cifar_weights_dir: Path, tmp_path: Path
) -> None:
    # What a new user ran (issue 22, item 15): on 64 random inputs one near-tie flips in fp16.
    weights = cifar_weights_dir / "resnet20-12fca82f.th"
    argv = ["export", "--model", "cifar_resnet20", "--weights", str(weights)]
    argv += ["--input-shape", "3,32,32", "--out", str(tmp_path / "run"), "--formats", "onnx,fp16"]
    assert main(argv) == 0
    checks = read_manifest(tmp_path / "run")["export"]["checks"]
    assert checks["export/student.fp16.onnx"]["status"] == "ok"
    assert checks["export/student.fp16.onnx"]["top1_agreement"] < 100  # the flip is still reported


def test_damaged_file_fails_its_gate_and_is_kept_as_failed(
    digits_run: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_convert = precision_module.convert_fp16

    def damaging_convert(src: Path, dst: Path) -> dict[str, str]:
        info = real_convert(src, dst)
        model = onnx.load(str(dst))
        final = next(n for n in model.graph.node if n.op_type == "Gemm")
        weight = next(i for i in model.graph.initializer if i.name == final.input[1])
        array = onnx.numpy_helper.to_array(weight)
        weight.CopyFrom(onnx.numpy_helper.from_array(array[::-1].copy(), weight.name))  # swap class rows
        onnx.save(model, str(dst))
        return info

    monkeypatch.setattr(precision_module, "convert_fp16", damaging_convert)
    summary = export_run(digits_run, ["onnx", "fp16"], **FAST)
    assert list(summary.failed) == ["export/student.fp16.onnx"]
    assert (digits_run / "export/student.fp16.onnx.failed").is_file()
    assert not (digits_run / "export/student.fp16.onnx").exists()
    manifest = read_manifest(digits_run)
    assert "export/student.fp16.onnx" not in manifest["artifacts"]
    assert "export/student.onnx" in manifest["artifacts"]  # the other format still went through
    assert "agreement" in manifest["export"]["failed"]["export/student.fp16.onnx"]
    with pytest.raises(GateFailedError, match=r"student\.fp16\.onnx"):
        summary.raise_for_status()


def test_tensorrt_asked_for_without_tensorrt_exits_3_after_the_rest(
    digits_run: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    ok, _ = pipeline.tensorrt_status()
    if ok:
        pytest.skip("TensorRT and a GPU are present here")
    code = main(["export", str(digits_run), "--formats", "onnx,tensorrt", "--check-samples", "64"])
    assert code == 3
    assert "TensorRT" in capsys.readouterr().err
    assert "export/student.onnx" in read_manifest(digits_run)["artifacts"]


def test_export_plain_model_non_square_without_data(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    model = create_model(ARCH, 7).eval()
    with torch.no_grad():  # make BN statistics non-trivial, as a trained model's are
        for bn in (m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)):
            bn.running_mean.uniform_(-0.2, 0.2)
            bn.running_var.uniform_(0.5, 2.0)
    weights = tmp_path / "weights.pt"
    torch.save({"state_dict": {f"module.{k}": v for k, v in model.state_dict().items()}}, weights)
    out = tmp_path / "out"
    code = main(
        ["export", "--model", ARCH, "--weights", str(weights), "--input-shape", "3,12,20", "--out", str(out)]
    )
    assert code == 0
    captured = capsys.readouterr()
    assert "random inputs" in captured.out and "skipped int8" in captured.out
    # The timing table ends the log, from laying out the folder to the last check.
    table = captured.err[captured.err.index("time per stage") :].splitlines()[1:]
    assert table[0].split() == ["file", "stage", "wall", "s", "cpu", "s"]
    assert table[1].split()[:3] == ["student.safetensors", "lay", "out"]
    assert table[-3].split()[0] == "export/student.fp16.onnx" and table[-2].split()[0] == "untimed"
    assert table[-1].split()[0] == "total"
    manifest = read_manifest(out)
    assert manifest["export"]["timing"]["stages"][0]["stage"] == "lay out"
    assert manifest["student"]["num_classes"] == 7  # read off the weights
    assert {"export/student.onnx", "export/student.fp16.onnx"} <= set(manifest["artifacts"])
    assert "export/student.int8.onnx" not in manifest["artifacts"]
    for batch in (1, 7):
        images = np.random.default_rng(0).standard_normal((batch, 3, 12, 20), dtype=np.float32)
        with torch.no_grad():
            reference = model(torch.from_numpy(images)).numpy()
        logits = run_onnx(out / "export/student.onnx", [images])
        assert np.abs(logits - reference).max() <= FP32_MAX_ABS_DIFF
        assert run_onnx(out / "export/student.fp16.onnx", [images]).shape == (batch, 7)
    # The folder an earlier export --model wrote is exported again (a distilled run is refused).
    again = ["export", "--model", ARCH, "--weights", str(weights), "--input-shape", "3,12,20"]
    assert main([*again, "--out", str(out), "--formats", "onnx"]) == 0


def test_export_plain_model_with_imagefolder_data(tmp_path: Path) -> None:
    from PIL import Image

    rng = np.random.default_rng(0)
    data = tmp_path / "data"
    for split in ("train", "val"):
        for label in ("a", "b"):
            folder = data / split / label
            folder.mkdir(parents=True)
            for i in range(6):
                base = 40 if label == "a" else 200  # dark versus bright: a model can tell them apart
                pixels = np.clip(base + rng.normal(0, 10, (SIZE, SIZE, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(pixels).save(folder / f"{i}.png")
    model = create_model(ARCH, 2).eval()
    weights = tmp_path / "student.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(weights))
    summary = export_model(
        ARCH, weights, (3, SIZE, SIZE), tmp_path / "out", data_dir=data, formats=["onnx", "int8"], **FAST
    )
    assert summary.check_data.startswith("12 validation images")
    assert read_manifest(tmp_path / "out")["classes"] == ["a", "b"]
    assert summary.checks["export/student.int8.onnx"].metrics["n"] == 12


def test_run_without_student_is_a_usage_error(digits_run: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (digits_run / "student.safetensors").unlink()
    assert main(["export", str(digits_run), "--formats", "onnx"]) == 2
    err = capsys.readouterr().err
    assert "student.safetensors" in err and err.count("\n") == 1
    assert not (digits_run / "export").exists()


def test_corrupt_onnx_file_is_a_clear_error(tmp_path: Path) -> None:
    path = tmp_path / "broken.onnx"
    path.write_bytes(b"\x08\x07garbage that is not a protobuf model")
    with pytest.raises(UsageError, match=r"broken\.onnx"):
        load_onnx(path)
    with pytest.raises(UsageError, match=r"broken\.onnx"):
        run_onnx(path, [np.zeros((1, 3, SIZE, SIZE), np.float32)])


def test_unwritable_output_is_a_clear_error_and_writes_nothing(digits_run: Path) -> None:
    (digits_run / "export").write_text("a file where the export folder should be")
    # The run's lock file (deploy.run_lock) is the one thing an export may add before it fails.
    before = sorted(p.name for p in digits_run.iterdir() if p.name != ".lock")
    with pytest.raises(UsageError, match="cannot write"):
        export_run(digits_run, ["onnx"], **FAST)
    assert sorted(p.name for p in digits_run.iterdir() if p.name != ".lock") == before


def test_bad_formats_and_options_are_usage_errors(digits_run: Path) -> None:
    with pytest.raises(UsageError, match="--formats"):
        pipeline.parse_formats("onnx,int4")
    with pytest.raises(UsageError, match="calib-method"):
        export_run(digits_run, ["int8"], calib_method="mse")
    with pytest.raises(MissingDependencyError):
        ExportSummary(digits_run, missing_dependency="TensorRT missing").raise_for_status()


def test_onnx_weight_count_counts_shared_tensors_once_per_use() -> None:
    weight = onnx.numpy_helper.from_array(np.ones((4, 3), np.float32), "w")
    graph = onnx.helper.make_graph(
        [
            onnx.helper.make_node("Identity", ["w"], ["w2"]),
            onnx.helper.make_node("MatMul", ["x", "w"], ["y1"]),
            onnx.helper.make_node("MatMul", ["x", "w2"], ["y2"]),
        ],
        "g",
        [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 4])],
        [onnx.helper.make_tensor_value_info("y2", onnx.TensorProto.FLOAT, [1, 3])],
        [weight],
    )
    assert onnx_weight_count(onnx.helper.make_model(graph)) == 24


def test_dla_engines_are_built_from_the_fp16_and_int8_files_only(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import shutil

    run, manifest = make_run(tmp_path)
    shutil.copyfile(run / "export/student.onnx", run / "export/student.fp16.onnx")
    record_artifact(run, manifest, "export/student.fp16.onnx", "onnx", precision="fp16")
    calls: list[dict] = []

    def fake_build_engine(source: Path, plan: Path, **options: object) -> dict:
        # No TensorRT here: stand-in plan and sidecar bytes, so the recorder can hash them.
        calls.append({"source": Path(source).name, "plan": Path(plan).name, **options})
        Path(plan).write_bytes(b"plan")
        Path(f"{plan}.json").write_text("{}")
        return {"tensorrt_version": "10.3.0.30"}

    monkeypatch.setattr(engines, "build_engine", fake_build_engine)
    summary = ExportSummary(run)
    options = pipeline.TensorRTOptions(dla_core=1, gpu_fallback=False)
    recorder = pipeline.ExportRecorder(run, manifest, summary)
    timer = StageTimer()
    engines.build_engines(
        run, manifest, recorder, options, lambda message: None, timer, STANDARD_ENGINE_SOURCES
    )
    assert [(c["source"], c["plan"], c["dla_core"], c["gpu_fallback"]) for c in calls] == [
        ("student.fp16.onnx", "student.fp16.plan", 1, False)
    ]
    built = [(row["file"], row["stage"]) for row in timer.stages]
    assert built == [("export/student.fp16.plan", "tensorrt build")]
    assert summary.skipped["tensorrt/fp32"] == "the DLA computes in fp16 and int8 only"
    assert "no checked export/student.int8.trt.onnx" in summary.skipped["tensorrt/int8"]
    assert "export/student.fp16.plan" in summary.files


def test_the_pytorch_reference_runs_channels_last_on_a_copy_and_matches_the_model() -> None:
    from tests.helpers import INPUT_SHAPE, tiny_net

    model = tiny_net()
    layouts: list[bool] = []
    rng = np.random.default_rng(0)
    batches = [rng.standard_normal((n, *INPUT_SHAPE)).astype(np.float32) for n in (5, 3)]
    with torch.no_grad():
        expected = np.concatenate([model(torch.from_numpy(b)).numpy() for b in batches])
    # The copy's hooks are the model's: each call records the layout its input arrived in.
    model.register_forward_pre_hook(
        lambda _module, inputs: layouts.append(inputs[0].is_contiguous(memory_format=torch.channels_last))
    )
    logits = pipeline.torch_logits(model, batches)
    assert layouts == [True, True]
    np.testing.assert_allclose(logits, expected, rtol=0, atol=1e-5)
    assert all(p.is_contiguous() for p in model.parameters() if p.dim() == 4)  # the model is untouched
