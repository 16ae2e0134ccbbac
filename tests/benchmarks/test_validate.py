"""benchmarks.validate: accuracy, parity and gates on real ONNX Runtime sessions and small runners."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
from torch import nn

from benchmarks.targets import Target, artifact_formats, infer_in_range
from benchmarks.validate import raise_for_gates, validate_runners
from deploy.errors import GateFailedError, UsageError
from deploy.formats import format_label
from deploy.gates import default_gates, parse_gate, set_gate
from deploy.runners.base import Runner
from deploy.status import Status
from tests.helpers import (
    TINY_INPUT_SHAPE,
    TINY_NUM_CLASSES,
    ModuleRunner,
    NumpyRunner,
    damage_onnx,
    export_tiny_onnx,
    image_batches,
    missing_tensorrt,
    onnx_target,
    tiny_module,
    torch_target,
)


@pytest.fixture
def tiny(tmp_path: Path) -> Iterator[tuple[nn.Module, Path]]:
    module = tiny_module()
    yield module, export_tiny_onnx(module, tmp_path / "student.onnx")


# ----------------------------------------------------------------------------- gates on real files


def test_gates_pass_on_the_real_onnx_file(tiny: tuple[nn.Module, Path]) -> None:
    module, path = tiny
    batches = image_batches(labeller=module)
    result = validate_runners([torch_target(module), onnx_target(path)], batches)

    assert result["passed"] and result["failures"] == []
    assert result["images"] == 48
    ort = result["results"]["onnxruntime/fp32"]
    assert ort["status"] == "ok"
    assert ort["parity"]["max_abs_diff"] <= 1e-4
    assert ort["parity"]["top1_agreement"] == 100.0
    # 3 of 4 labels are the model's own predictions: top-1 is exactly 75% for both.
    assert result["results"]["torch/fp32"]["accuracy"] == {
        "top1": 75.0,
        "top5": 100.0,
        "n": 48,
        "top1_drop": 0.0,
    }
    assert ort["accuracy"]["top1"] == 75.0
    assert {g["gate"] for g in ort["gates"]} == {"max_abs_diff", "min_agreement"}
    assert all(g["passed"] for g in ort["gates"])
    raise_for_gates(result)


def test_gates_fail_on_a_damaged_copy_with_exit_code_1(tiny: tuple[nn.Module, Path]) -> None:
    module, path = tiny
    damaged = damage_onnx(path, path.with_name("student.damaged.onnx"))
    batches = image_batches(labeller=module)
    result = validate_runners([torch_target(module), onnx_target(damaged)], batches)

    assert not result["passed"]
    entry = result["results"]["onnxruntime/fp32"]
    assert entry["status"] == "ok"  # it ran; it is wrong
    failed = {g["gate"]: g for g in entry["gates"] if not g["passed"]}
    assert "max_abs_diff" in failed
    assert failed["max_abs_diff"]["value"] > 1e-3
    with pytest.raises(GateFailedError) as info:
        raise_for_gates(result)
    assert info.value.exit_code == 1
    message = str(info.value)
    assert "onnxruntime/fp32" in message and "max_abs_diff" in message and "<= 0.0001" in message


def test_nan_logits_fail_the_max_abs_diff_gate(tiny: tuple[nn.Module, Path]) -> None:
    module, _ = tiny

    def with_nan(images: np.ndarray) -> np.ndarray:
        logits = ModuleRunner(module).infer(images)
        logits[0, 0] = np.nan
        return logits

    target = Target("onnxruntime/fp32", "fp32", lambda: NumpyRunner(with_nan, "onnxruntime"))
    result = validate_runners([torch_target(module), target], image_batches(labeller=module))
    check = next(g for g in result["results"]["onnxruntime/fp32"]["gates"] if g["gate"] == "max_abs_diff")
    assert not check["passed"]


# ----------------------------------------------------------------------------- statuses


def test_skipped_and_failed_backends_are_reported_with_reasons(tiny: tuple[nn.Module, Path]) -> None:
    module, path = tiny

    def broken_open() -> Runner:
        raise RuntimeError("engine deserialisation failed")

    def explode(images: np.ndarray) -> np.ndarray:
        raise ValueError("kernel crashed")

    crashing = NumpyRunner(explode, "onnxruntime", "fp16")
    targets = [
        torch_target(module),
        onnx_target(path),
        Target("tensorrt/fp16", "fp16", missing_tensorrt, file="export/student.fp16.plan"),
        Target("tensorrt/int8", "int8", broken_open),
        Target("onnxruntime/fp16", "fp16", lambda: crashing),
    ]
    result = validate_runners(targets, image_batches(labeller=module))
    res = result["results"]

    assert res["tensorrt/fp16"]["status"] == Status.SKIPPED
    assert "TensorRT is not installed" in res["tensorrt/fp16"]["reason"]
    assert res["tensorrt/fp16"]["accuracy"] is None and res["tensorrt/fp16"]["gates"] == []
    assert res["tensorrt/int8"]["status"] == "failed"
    assert res["tensorrt/int8"]["reason"] == "RuntimeError: engine deserialisation failed"
    assert res["onnxruntime/fp16"]["status"] == "failed"
    assert res["onnxruntime/fp16"]["reason"] == "batch 0: ValueError: kernel crashed"
    assert crashing.closed
    # The healthy formats are still measured, and only the failures fail the validation.
    assert res["onnxruntime/fp32"]["status"] == "ok" and res["onnxruntime/fp32"]["accuracy"]["n"] == 48
    assert not result["passed"]
    assert len(result["failures"]) == 2
    assert not any("tensorrt/fp16" in line for line in result["failures"])
    # Results keep the caller's order.
    assert list(res) == [t.key for t in targets]


def test_every_opened_runner_is_closed(tiny: tuple[nn.Module, Path]) -> None:
    module, _ = tiny
    ref = ModuleRunner(module)
    other = NumpyRunner(ref.infer, "onnxruntime")
    targets = [Target("torch/fp32", "fp32", lambda: ref), Target("onnxruntime/fp32", "fp32", lambda: other)]
    validate_runners(targets, image_batches(count=8, batch=4))
    assert ref.closed and other.closed


def test_a_failed_reference_fails_validation_and_leaves_parity_unmeasured(
    tiny: tuple[nn.Module, Path],
) -> None:
    _, path = tiny

    def broken() -> Runner:
        raise UsageError("student.safetensors: sha256 does not match the manifest")

    result = validate_runners([Target("torch/fp32", "fp32", broken), onnx_target(path)], image_batches())
    entry = result["results"]["onnxruntime/fp32"]
    assert entry["parity"] is None
    assert "reference torch/fp32 did not run" in entry["reason"]
    assert not any(g["passed"] for g in entry["gates"])
    assert any(line.startswith("torch/fp32: failed") for line in result["failures"])


def test_validation_needs_the_reference_and_unique_keys_and_images(tiny: tuple[nn.Module, Path]) -> None:
    module, path = tiny
    with pytest.raises(UsageError, match="reference"):
        validate_runners([onnx_target(path)], image_batches())
    with pytest.raises(UsageError, match="share the report key"):
        validate_runners([torch_target(module), onnx_target(path), onnx_target(path)], image_batches())
    with pytest.raises(UsageError, match="no validation images"):
        validate_runners([torch_target(module)], [])


# ----------------------------------------------------------------------------- fp16 and int8 gates


def _reference_fn(images: np.ndarray) -> np.ndarray:
    weights = np.arange(TINY_NUM_CLASSES * 3, dtype=np.float32).reshape(TINY_NUM_CLASSES, 3) - 7.0
    return images.mean(axis=(2, 3)) @ weights.T


def _flip_first(count: int) -> Callable[[np.ndarray], np.ndarray]:
    """Logits equal to the reference's except that the first `count` images of every batch
    get a different top-1 class."""

    def fn(images: np.ndarray) -> np.ndarray:
        logits = _reference_fn(images)
        for i in range(min(count, images.shape[0])):
            logits[i, (np.argmax(logits[i]) + 1) % TINY_NUM_CLASSES] += 1e3
        return logits

    return fn


def _agreement_targets(precision: str, flips: int) -> list[Target]:
    return [
        Target("torch/fp32", "fp32", lambda: NumpyRunner(_reference_fn, "torch")),
        Target(
            f"onnxruntime/{precision}",
            precision,
            lambda: NumpyRunner(_flip_first(flips), "onnxruntime", precision),
        ),
    ]


def _labelled_by_reference(count: int = 100, batch: int = 50) -> list[tuple[np.ndarray, np.ndarray]]:
    rng = np.random.default_rng(3)
    images = rng.standard_normal((count, *TINY_INPUT_SHAPE)).astype(np.float32)
    labels = np.argmax(_reference_fn(images), axis=1).astype(np.int64)
    return [(images[i : i + batch], labels[i : i + batch]) for i in range(0, count, batch)]


def test_fp16_agreement_gate_and_its_override() -> None:
    batches = _labelled_by_reference()  # 2 batches of 50: flipping 1 per batch is 98% agreement
    result = validate_runners(_agreement_targets("fp16", 1), batches)
    entry = result["results"]["onnxruntime/fp16"]
    assert entry["parity"]["top1_agreement"] == pytest.approx(98.0)
    assert [g["gate"] for g in entry["gates"]] == ["min_agreement"]
    assert not result["passed"]
    assert "onnxruntime/fp16: gate min_agreement failed: parity.top1_agreement = 98" in result["failures"][0]

    gates = set_gate(default_gates(), *parse_gate("fp16:min_agreement=97.5"), "--gate")
    assert validate_runners(_agreement_targets("fp16", 1), batches, gates=gates)["passed"]


def test_int8_top1_drop_gate_judges_the_paired_interval() -> None:
    batches = _labelled_by_reference()
    # One flip per batch of 50 costs 2 points of top-1 against a reference that is 100% right,
    # but 2 losses in 100 paired images cannot tell a 2-point drop from a 0-point one.
    result = validate_runners(_agreement_targets("int8", 1), batches)
    entry = result["results"]["onnxruntime/int8"]
    assert entry["accuracy"]["top1"] == pytest.approx(98.0)
    assert entry["accuracy"]["top1_drop"] == pytest.approx(2.0)
    assert entry["accuracy"]["paired"]["losses"] == 2 and entry["accuracy"]["paired"]["gains"] == 0
    low, high = entry["accuracy"]["top1_drop_ci"]
    assert low < 1.0 < high
    (gate,) = entry["gates"]
    assert (
        gate["verdict"] == "inconclusive" and "100 images cannot resolve a 1-point budget" in gate["reason"]
    )
    assert result["passed"]
    strict = validate_runners(_agreement_targets("int8", 1), batches, inconclusive_passes=False)
    assert not strict["passed"] and "inconclusive" in strict["failures"][0]
    # Ten flips per batch: a 20-point drop that the interval resolves.
    failed = validate_runners(_agreement_targets("int8", 10), batches)
    assert not failed["passed"] and failed["results"]["onnxruntime/int8"]["gates"][0]["verdict"] == "failed"
    gates = set_gate(default_gates(), "int8", "max_top1_drop", 50.0, "--max-top1-drop-int8")
    assert validate_runners(_agreement_targets("int8", 10), batches, gates=gates)["passed"]
    # No flips: no drop, and 100 agreeing images put the interval under 1 point.
    assert validate_runners(_agreement_targets("int8", 0), batches)["passed"]


# ----------------------------------------------------------------------------- batch ranges and keys


def test_infer_in_range_splits_and_pads_to_the_runner_range() -> None:
    images = np.random.default_rng(0).standard_normal((10, *TINY_INPUT_SHAPE)).astype(np.float32)
    runner = NumpyRunner(_reference_fn, min_batch=3, max_batch=4)
    logits = infer_in_range(runner, images)
    assert runner.calls == [4, 4, 3]  # the last chunk of 2 was padded to the minimum of 3
    np.testing.assert_allclose(logits, _reference_fn(images), rtol=1e-6)


def test_artifact_formats_give_each_model_file_a_distinct_key_in_display_order() -> None:
    manifest = {
        "artifacts": {
            "export/student.int8.plan": {"kind": "tensorrt", "precision": "int8"},
            "export/student.int8.trt.onnx": {"kind": "onnx", "precision": "int8"},
            "export/student.uint8.onnx": {"kind": "onnx", "precision": "fp32", "input_dtype": "uint8"},
            "export/student.int8.onnx": {"kind": "onnx", "precision": "int8"},
            "export/student.fp16.onnx": {"kind": "onnx", "precision": "fp16"},
            "student.safetensors": {"kind": "weights"},
            "export/student.onnx": {"kind": "onnx", "precision": "fp32"},
        }
    }
    formats = artifact_formats(manifest)
    assert [(key, rel) for key, (rel, _) in formats.items()] == [
        ("onnxruntime/fp32", "export/student.onnx"),
        ("onnxruntime/fp16", "export/student.fp16.onnx"),
        ("onnxruntime/int8", "export/student.int8.onnx"),
        ("onnxruntime/int8-trt", "export/student.int8.trt.onnx"),
        ("tensorrt/int8", "export/student.int8.plan"),
    ]
    assert format_label("export/other.onnx", "fp32") == "fp32"


# ----------------------------------------------------------------------------- the commands on a real run


def _make_digits_run(run: Path) -> Path:
    """A digits run as training leaves it (config, manifest, a cifar_resnet20 student) plus its fp32
    ONNX export. The student is untrained: these tests are about the plumbing, not its accuracy."""
    from safetensors.torch import save_file

    from deploy.manifest import new_manifest, record_artifact, write_manifest
    from export.pipeline import export_run
    from reviewkd.config import load_config, save_config
    from reviewkd.data import build_data
    from reviewkd.models import create_model

    run.mkdir(parents=True)
    config = load_config()
    save_config(config, run / "config.yaml")
    bundle = build_data(config)
    model = create_model("cifar_resnet20", bundle.num_classes).eval()
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, run / "student.safetensors")
    manifest = new_manifest()
    manifest.update(classes=list(bundle.classes), input=bundle.manifest_input(), data=bundle.manifest_data())
    manifest["method"] = {"name": "reviewkd", "params": {}}
    entry = record_artifact(run, manifest, "student.safetensors", "weights")
    manifest["student"] = {
        "arch": "cifar_resnet20",
        "num_classes": bundle.num_classes,
        "sha256": entry["sha256"],
    }
    write_manifest(run, manifest)
    export_run(run, ["onnx"], check_samples=32)
    return run


def test_validate_bench_report_commands_and_their_exit_codes(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import json

    from deploy.manifest import read_manifest, record_artifact, write_manifest
    from reviewkd.app.cli import main

    run = _make_digits_run(tmp_path / "run")
    common = ["--limit", "48", "--batch-size", "16", "--device", "cpu", "--threads", "1"]

    assert main(["validate", str(run), *common]) == 0
    out = capsys.readouterr().out
    assert "validation passed on 48 images" in out
    saved = json.loads((run / "report" / "validate.json").read_text())
    assert saved["results"]["onnxruntime/fp32"]["parity"]["max_abs_diff"] <= 1e-4
    assert saved["results"]["torch/fp16"]["status"] == "skipped"
    assert saved["environment"]["threads"]["requested"] == 1

    # A stricter gate set on the command line fails, naming the gate; exit code 1.
    assert main(["validate", str(run), *common, "--max-abs-diff-fp32", "1e-12"]) == 1
    err = capsys.readouterr().err
    assert "onnxruntime/fp32: gate max_abs_diff failed" in err and "<= 1e-12" in err

    # A damaged file, re-recorded in the manifest (as a buggy exporter would), fails its gates.
    onnx_path = run / "export" / "student.onnx"
    original = onnx_path.read_bytes()
    damage_onnx(onnx_path, onnx_path)
    manifest = read_manifest(run)
    exported_from = {"precision": "fp32", "student_sha256": manifest["student"]["sha256"]}
    record_artifact(run, manifest, "export/student.onnx", "onnx", **exported_from)
    write_manifest(run, manifest)
    assert main(["validate", str(run), *common]) == 1
    assert "onnxruntime/fp32: gate max_abs_diff failed" in capsys.readouterr().err

    # A file changed behind the manifest's back is refused by its sha256 check: bad input, exit 2
    # (issue 11 item 15: exit 1 is for a gate that failed), and the other formats' results are kept.
    onnx_path.write_bytes(original)
    assert main(["validate", str(run), *common]) == 2
    assert "cannot validate: onnxruntime/fp32:" in capsys.readouterr().err
    saved = json.loads((run / "report" / "validate.json").read_text())
    assert "sha256" in saved["results"]["onnxruntime/fp32"]["reason"]
    assert saved["results"]["torch/fp32"]["status"] == "ok"
    record_artifact(run, manifest, "export/student.onnx", "onnx", **exported_from)
    write_manifest(run, manifest)

    assert main(["validate", str(run), "--backends", "nonesuch"]) == 2
    assert "--backends nonesuch: not in this run" in capsys.readouterr().err
    assert main(["validate", str(run), "--gate", "fp32:speed=1"]) == 2
    capsys.readouterr()

    bench = ["--batch-sizes", "1,2", "--warmup", "1", "--iters", "2", "--device", "cpu", "--threads", "1"]
    assert main(["bench", str(run), *bench, "--backends", "onnxruntime"]) == 0
    assert "onnxruntime/fp32         batch    2" in capsys.readouterr().out

    assert main(["report", str(run)]) == 0
    table = capsys.readouterr().out
    assert "onnxruntime/fp32" in table and "torch/fp32" in table and "torch/fp16" in table
    report = json.loads((run / "report" / "report.json").read_text())
    assert report["torch/fp32"]["bench"]["status"] == "not measured"  # bench ran on onnxruntime only
    assert report["onnxruntime/fp32"]["status"] == "ok" and set(report["onnxruntime/fp32"]["latency"]) == {
        "1",
        "2",
    }
