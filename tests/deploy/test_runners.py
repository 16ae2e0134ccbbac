"""The runner contract over the CPU backends (ONNX Runtime, PyTorch) and open_runner.

Also home of the helpers the other deploy tests import: a tiny conv net, its ONNX export and a
run directory with a manifest, all written for real into tmp_path.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

from deploy.detection.outputs import OUTPUT_NAMES as DETECTION_OUTPUTS
from deploy.errors import MissingDependencyError, UsageError
from deploy.manifest import record_artifact
from deploy.runners import (
    OnnxRuntimeRunner,
    Runner,
    open_runner,
    precision_from_filename,
    providers_for_device,
    select_artifact,
)
from deploy.runners.onnxruntime_runner import (
    METADATA_KEY,
    UNFUSED_QDQ_KEY,
    check_session_providers,
    provider_options,
    qdq_fusion_disabled,
    runs_unfused,
    session_options,
)
from deploy.runners.torch_runner import TorchRunner
from deploy.trt_sidecar import (
    tensorrt_available,
)
from tests.helpers import (
    CLASSES,
    DETECTION_INPUT_SHAPE,
    INPUT_SHAPE,
    export_onnx,
    make_run,
    random_batch,
    tiny_net,
    write_detection_onnx,
    write_plan,
)


# A non-square input catches any H/W mix-up.
@pytest.fixture(scope="module")
def onnx_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A dynamic-batch ONNX file of tiny_net(0)."""
    return export_onnx(tiny_net(), tmp_path_factory.mktemp("onnx") / "student.onnx")


@pytest.fixture(params=["onnxruntime", "torch"])
def runner(request: pytest.FixtureRequest, onnx_file: Path) -> Runner:
    """Each CPU backend on the same weights."""
    if request.param == "onnxruntime":
        return OnnxRuntimeRunner(onnx_file, providers=["CPUExecutionProvider"], threads=1)
    return TorchRunner(tiny_net(), INPUT_SHAPE)


# --- the contract, for every CPU backend ----------------------------------------------------------


@pytest.mark.parametrize("batch", [1, 5])
def test_infer_returns_float32_logits(runner: Runner, batch: int) -> None:
    with runner:
        logits = runner.infer(random_batch(batch))
    assert logits.dtype == np.float32
    assert logits.shape == (batch, len(CLASSES))
    assert np.isfinite(logits).all()


def test_runner_describes_itself(runner: Runner) -> None:
    assert runner.name == f"{runner.backend}/fp32"
    assert runner.device == "cpu"
    assert runner.input_shape == INPUT_SHAPE
    assert runner.max_batch is None
    runner.close()


@pytest.mark.parametrize(
    ("images", "expected"),
    [
        (random_batch(2).astype(np.float64), "expected float32 images, got float64"),
        (random_batch(2, (1, 8, 10)), r"expected a batch of shape \(N, 3, 8, 10\)"),
        (random_batch(2, (3, 10, 8)), r"expected a batch of shape \(N, 3, 8, 10\)"),
        (random_batch(2, (3, 8, 11)), r"got \(2, 3, 8, 11\)"),
        (random_batch(1)[0], r"expected a batch of shape \(N, 3, 8, 10\), got \(3, 8, 10\)"),
        (random_batch(0), "batch 0 outside the model's range 1..any"),
        (random_batch(2).tolist(), "expected a numpy array, got list"),
    ],
    ids=["dtype", "channels", "height-width-swapped", "width", "ndim", "empty", "not-numpy"],
)
def test_check_input_says_what_was_expected(runner: Runner, images: Any, expected: str) -> None:
    with runner, pytest.raises(UsageError, match=expected):
        runner.infer(images)


def test_context_manager_closes(runner: Runner) -> None:
    with runner as opened:
        assert opened is runner
        opened.infer(random_batch(1))
    with pytest.raises(UsageError, match="after close"):
        runner.infer(random_batch(1))
    runner.close()  # closing twice is allowed


# --- ONNX Runtime --------------------------------------------------------------------------------


def test_onnx_runner_reads_names_and_shape_from_the_model(onnx_file: Path) -> None:
    with OnnxRuntimeRunner(onnx_file, threads=2) as runner:
        assert isinstance(runner, OnnxRuntimeRunner)
        assert (runner.input_name, runner.output_name) == ("images", "logits")
        assert runner.threads == 2
        assert runner.providers == ["CPUExecutionProvider"]


def test_fixed_batch_model_limits_the_batch(tmp_path: Path) -> None:
    path = export_onnx(tiny_net(), tmp_path / "fixed.onnx", batch=2)
    with OnnxRuntimeRunner(path) as runner:
        assert (runner.min_batch, runner.max_batch) == (2, 2)
        assert runner.infer(random_batch(2)).shape == (2, len(CLASSES))
        with pytest.raises(UsageError, match=r"batch 3 outside the model's range 2\.\.2"):
            runner.infer(random_batch(3))


def test_symbolic_spatial_dims_need_the_input_shape(tmp_path: Path) -> None:
    path = export_onnx(tiny_net(), tmp_path / "any_size.onnx", dynamic_spatial=True)
    with pytest.raises(UsageError, match="symbolic dimensions"):
        OnnxRuntimeRunner(path)
    with OnnxRuntimeRunner(path, input_shape=(3, 12, 6)) as runner:
        assert runner.input_shape == (3, 12, 6)
        assert runner.infer(random_batch(2, (3, 12, 6))).shape == (2, len(CLASSES))


def test_input_shape_must_match_the_model(onnx_file: Path) -> None:
    with pytest.raises(UsageError, match=r"takes \(C, H, W\) = \(3, 8, 10\), the manifest says \(3, 10, 8\)"):
        OnnxRuntimeRunner(onnx_file, input_shape=(3, 10, 8))


@pytest.mark.parametrize(
    ("name", "precision"),
    [
        ("student.onnx", "fp32"),
        ("student.fp16.onnx", "fp16"),
        ("student.int8.onnx", "int8"),
        ("student.int8-qdq.onnx", "int8"),
        ("student.INT8.symmetric.onnx", "int8"),
        ("student.fp16.plan", "fp16"),
        ("my.model.onnx", "fp32"),
    ],
)
def test_precision_from_filename(name: str, precision: str) -> None:
    assert precision_from_filename(name) == precision


def test_precision_comes_from_the_file_name_or_the_embedded_manifest(onnx_file: Path, tmp_path: Path) -> None:
    renamed = shutil.copyfile(onnx_file, tmp_path / "student.int8.onnx")
    with OnnxRuntimeRunner(renamed) as runner:
        assert runner.name == "onnxruntime/int8"
    tagged = export_onnx(
        tiny_net(), tmp_path / "plain.onnx", metadata={"precision": "fp16", "classes": CLASSES}
    )
    with OnnxRuntimeRunner(tagged) as runner:
        assert runner.name == "onnxruntime/fp16"
        assert runner.embedded_manifest() == {"precision": "fp16", "classes": CLASSES}
    with OnnxRuntimeRunner(tagged, precision="int8-qdq") as runner:
        assert runner.name == "onnxruntime/int8-qdq"


def _qdq_conv_file(path: Path, unfused: bool | None) -> Path:
    """A symmetric Q/DQ conv (int8 activations, 8-bit weights all at +-127, as TensorRT takes them)
    whose embedded manifest sets UNFUSED_QDQ_KEY to `unfused` (None: no int8 description)."""
    import json

    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    channels, height, width = INPUT_SHAPE
    weights = (np.sign(rng.standard_normal((8, channels, 3, 3))) * 127).astype(np.int8)
    inits = [
        numpy_helper.from_array(weights, "w_q"),
        numpy_helper.from_array(np.full(8, 0.05 / 127, np.float32), "w_scale"),
        numpy_helper.from_array(np.zeros(8, np.int8), "w_zero"),
        numpy_helper.from_array(np.array(1 / 127, np.float32), "x_scale"),
        numpy_helper.from_array(np.array(0, np.int8), "zero"),
        numpy_helper.from_array(np.array(1.35 / 127, np.float32), "y_scale"),
    ]
    nodes = [
        helper.make_node("QuantizeLinear", ["images", "x_scale", "zero"], ["x_q"]),
        helper.make_node("DequantizeLinear", ["x_q", "x_scale", "zero"], ["x_dq"]),
        helper.make_node("DequantizeLinear", ["w_q", "w_scale", "w_zero"], ["w_dq"], axis=0),
        helper.make_node("Conv", ["x_dq", "w_dq"], ["y"], pads=[1, 1, 1, 1]),
        helper.make_node("QuantizeLinear", ["y", "y_scale", "zero"], ["y_q"]),
        helper.make_node("DequantizeLinear", ["y_q", "y_scale", "zero"], ["y_dq"]),
        helper.make_node("Flatten", ["y_dq"], ["logits"]),
    ]
    graph = helper.make_graph(
        nodes,
        "qdq_conv",
        [helper.make_tensor_value_info("images", TensorProto.FLOAT, ["batch", channels, height, width])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 8 * height * width])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    manifest: dict[str, Any] = {"precision": "int8"}
    if unfused is not None:
        manifest["int8"] = {"flavour": "trt", "weight_bits": 8, UNFUSED_QDQ_KEY: unfused}
    model.metadata_props.add(key=METADATA_KEY, value=json.dumps(manifest))
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


def _disable_all(path: Path, images: np.ndarray) -> np.ndarray:
    """The file with no graph optimisation at all: Q/DQ as the float operations the file spells out."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return np.asarray(session.run(None, {"images": images})[0])


@pytest.mark.parametrize("unfused", [True, False, None])
def test_a_file_that_must_run_unfused_runs_its_qdq_as_float_operations(
    tmp_path: Path, unfused: bool | None
) -> None:
    path = _qdq_conv_file(tmp_path / "student.int8.trt.onnx", unfused)
    images = np.random.default_rng(1).integers(0, 2, (4, *INPUT_SHAPE)).astype(np.float32)
    with OnnxRuntimeRunner(path, providers=["CPUExecutionProvider"]) as runner:
        assert runner.unfused_qdq is bool(unfused)
        logits = runner.infer(images)
    if unfused:
        np.testing.assert_array_equal(logits, _disable_all(path, images))


def test_open_runner_runs_a_runs_unfused_file_unfused(tmp_path: Path) -> None:
    run, manifest = make_run(tmp_path)
    _qdq_conv_file(run / "export" / "student.int8.trt.onnx", unfused=True)
    # The Q/DQ convolution is no classifier: without class names its 640 outputs are not checked.
    manifest["classes"], manifest["student"] = [], {}
    record_artifact(run, manifest, "export/student.int8.trt.onnx", "onnx", precision="int8")
    with open_runner("export/student.int8.trt.onnx", manifest=manifest, run_dir=run) as runner:
        assert isinstance(runner, OnnxRuntimeRunner) and runner.unfused_qdq
    with open_runner("export/student.onnx", manifest=manifest, run_dir=run) as runner:
        assert isinstance(runner, OnnxRuntimeRunner) and not runner.unfused_qdq


@pytest.mark.parametrize(
    "manifest",
    [None, {}, {"int8": None}, {"int8": "yes"}, {"int8": {UNFUSED_QDQ_KEY: "true"}}, {"int8": {}}],
)
def test_only_a_true_unfused_flag_turns_qdq_fusion_off(manifest: dict[str, Any] | None) -> None:
    assert not runs_unfused(manifest)
    assert runs_unfused({"int8": {UNFUSED_QDQ_KEY: True}})


def test_session_options_follow_the_flag_unless_told_otherwise(tmp_path: Path) -> None:
    import onnxruntime as ort

    path = tmp_path / "qdq.onnx"
    _qdq_conv_file(path, unfused=False)
    flagged = {"int8": {UNFUSED_QDQ_KEY: True}}
    for manifest, unfused, expected in (
        (None, None, False),
        (flagged, None, True),
        (None, True, True),  # a measurement of the Q/DQ semantics of any file
        (flagged, False, False),
    ):
        options = session_options(manifest, 1, unfused=unfused)
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        assert qdq_fusion_disabled(session) is expected, (manifest, unfused)


def test_corrupt_onnx_file_is_a_usage_error_naming_it(tmp_path: Path) -> None:
    corrupt = tmp_path / "student.onnx"
    corrupt.write_bytes(b"\x08\x07 this is not a protobuf" * 10)
    with pytest.raises(UsageError, match=r"student\.onnx: cannot load as an ONNX model"):
        OnnxRuntimeRunner(corrupt)
    with pytest.raises(UsageError, match=r"missing\.onnx: no such ONNX file"):
        OnnxRuntimeRunner(tmp_path / "missing.onnx")


def test_truncated_onnx_file_is_a_usage_error(onnx_file: Path, tmp_path: Path) -> None:
    truncated = tmp_path / "truncated.onnx"
    truncated.write_bytes(onnx_file.read_bytes()[: onnx_file.stat().st_size // 2])
    with pytest.raises(UsageError, match=r"truncated\.onnx: cannot load"):
        open_runner(truncated)


def test_providers_not_installed_are_a_missing_dependency(onnx_file: Path) -> None:
    with pytest.raises(MissingDependencyError, match=r"NoSuchExecutionProvider.*onnxruntime-gpu"):
        OnnxRuntimeRunner(onnx_file, providers=["NoSuchExecutionProvider"])


def test_cuda_without_a_gpu_provider_is_a_missing_dependency(onnx_file: Path) -> None:
    import onnxruntime as ort

    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("this onnxruntime has CUDA")
    with pytest.raises(MissingDependencyError, match="onnxruntime-gpu"):
        open_runner(onnx_file, device="cuda")


CPU, CUDA, TRT = "CPUExecutionProvider", "CUDAExecutionProvider", "TensorrtExecutionProvider"


def test_providers_for_a_device_never_put_tensorrt_first() -> None:
    assert providers_for_device("cpu", [TRT, CUDA, CPU]) == [CPU]
    # onnxruntime-gpu lists TensorRT's provider with or without TensorRT: a device never picks it.
    assert providers_for_device("cuda", [TRT, CUDA, CPU]) == [CUDA, CPU]
    with pytest.raises(MissingDependencyError, match="no CUDA execution provider") as info:
        providers_for_device("cuda", [TRT, CPU])
    assert info.value.exit_code == 3
    with pytest.raises(UsageError, match="device"):
        providers_for_device("gpu", [CPU])


@pytest.mark.parametrize(
    ("requested", "loaded", "options", "error"),
    [
        ([CPU], [CPU], {CPU: {}}, None),
        ([CUDA, CPU], [CUDA, CPU], {CUDA: {"use_tf32": "0"}, CPU: {}}, None),
        # The CUDA provider did not load (no driver, cuDNN or GPU): onnxruntime ran on the CPU.
        ([CUDA, CPU], [CPU], {CPU: {}}, r"could not load CUDAExecutionProvider \(the session has CPU"),
        # TensorRT's provider failed while the session was made: onnxruntime re-created it without options.
        (
            [TRT, CUDA, CPU],
            [CUDA, CPU],
            {CUDA: {"use_tf32": "1"}},
            "could not load TensorrtExecutionProvider",
        ),
        ([CUDA, CPU], [CUDA, CPU], {CUDA: {"use_tf32": "1"}}, "TF32 on"),
    ],
    ids=["cpu", "cuda", "cuda-fell-back-to-cpu", "tensorrt-fell-back", "tf32-on"],
)
def test_a_gpu_session_must_have_what_was_asked(
    requested: list[str], loaded: list[str], options: dict[str, dict[str, str]], error: str | None
) -> None:
    if error is None:
        check_session_providers(Path("m.onnx"), requested, loaded, options)
        return
    kind = RuntimeError if "TF32" in error else MissingDependencyError
    with pytest.raises(kind, match=error) as info:
        check_session_providers(Path("m.onnx"), requested, loaded, options)
    assert str(info.value).startswith("m.onnx: ")
    if kind is MissingDependencyError:
        assert info.value.exit_code == 3 and "--device cpu" in str(info.value)


def test_cuda_provider_that_cannot_load_is_an_error_not_a_cpu_runner(
    onnx_file: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import onnxruntime as ort

    if CUDA in ort.get_available_providers():
        pytest.skip("this onnxruntime has CUDA; the check needs one whose CUDA provider cannot load")
    # What onnxruntime-gpu does on a machine whose CUDA libraries or driver are missing: it lists the
    # CUDA provider, and the real session below, asked for it, quietly runs on the CPU.
    monkeypatch.setattr(ort, "get_available_providers", lambda: [CUDA, CPU])
    with pytest.raises(MissingDependencyError, match="could not load CUDAExecutionProvider") as info:
        open_runner(onnx_file, device="cuda")
    assert info.value.exit_code == 3
    with pytest.raises(MissingDependencyError, match="could not load CUDAExecutionProvider"):
        OnnxRuntimeRunner(onnx_file)  # no providers named: CUDA is chosen because it is listed
    with open_runner(onnx_file, device="cpu") as runner:
        assert runner.providers == [CPU] and runner.device == "cpu"


def test_tensorrt_provider_needs_a_loadable_libnvinfer(
    onnx_file: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import onnxruntime as ort

    from deploy.runners import onnxruntime_runner

    monkeypatch.setattr(ort, "get_available_providers", lambda: [TRT, CUDA, CPU])
    monkeypatch.setattr(onnxruntime_runner, "libnvinfer_loadable", lambda: False)
    with pytest.raises(MissingDependencyError, match="libnvinfer does not load") as info:
        OnnxRuntimeRunner(onnx_file, providers=[TRT, CUDA, CPU])
    assert info.value.exit_code == 3


def test_libnvinfer_probe_tries_each_tensorrt_major(monkeypatch: pytest.MonkeyPatch) -> None:
    import ctypes

    from deploy.runners.onnxruntime_runner import libnvinfer_loadable

    tried: list[str] = []

    def fake_cdll(name: str) -> object:
        tried.append(name)
        if name != "libnvinfer.so.11":
            raise OSError(f"{name}: cannot open shared object file")
        return object()

    monkeypatch.setattr(ctypes, "CDLL", fake_cdll)
    assert libnvinfer_loadable() is True and tried == ["libnvinfer.so.10", "libnvinfer.so.11"]
    monkeypatch.setattr(ctypes, "CDLL", lambda name: (_ for _ in ()).throw(OSError(name)))
    assert libnvinfer_loadable() is False


# --- PyTorch -------------------------------------------------------------------------------------


def test_torch_and_onnxruntime_agree_on_the_same_weights(onnx_file: Path) -> None:
    images = random_batch(7)
    with OnnxRuntimeRunner(onnx_file) as ort_runner, TorchRunner(tiny_net(), INPUT_SHAPE) as torch_runner:
        ort_logits = ort_runner.infer(images)
        torch_logits = torch_runner.infer(images)
    np.testing.assert_allclose(ort_logits, torch_logits, atol=1e-5, rtol=1e-5)
    # A different seed gives different weights, so agreement above is not a coincidence.
    with TorchRunner(tiny_net(seed=1), INPUT_SHAPE) as other:
        assert np.abs(other.infer(images) - torch_logits).max() > 1e-2


def test_torch_fp16_casts_a_copy_and_returns_float32() -> None:
    model = tiny_net()
    images = random_batch(4)
    with TorchRunner(model, INPUT_SHAPE) as fp32, TorchRunner(model, INPUT_SHAPE, precision="fp16") as fp16:
        assert fp16.name == "torch/fp16"
        reference = fp32.infer(images)
        half = fp16.infer(images)
    assert half.dtype == np.float32
    np.testing.assert_allclose(half, reference, atol=2e-2)
    assert all(p.dtype == torch.float32 for p in model.parameters())


def test_torch_runner_rejects_bad_settings() -> None:
    with pytest.raises(UsageError, match="precision"):
        TorchRunner(tiny_net(), INPUT_SHAPE, precision="int8")
    with pytest.raises(UsageError, match="device"):
        TorchRunner(tiny_net(), INPUT_SHAPE, device="tpu")
    if not torch.cuda.is_available():
        with pytest.raises(MissingDependencyError, match="no CUDA GPU"):
            TorchRunner(tiny_net(), INPUT_SHAPE, device="cuda")


def test_torch_runner_needs_a_logits_tensor() -> None:
    class TwoOutputs(nn.Module):
        def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            return x, x

    with TorchRunner(TwoOutputs(), INPUT_SHAPE) as runner, pytest.raises(UsageError, match="returned tuple"):
        runner.infer(random_batch(1))


# --- open_runner ---------------------------------------------------------------------------------


def test_open_runner_verifies_the_manifest_hash(tmp_path: Path) -> None:
    run, manifest = make_run(tmp_path)
    with open_runner("export/student.onnx", manifest=manifest, run_dir=run) as runner:
        assert isinstance(runner, OnnxRuntimeRunner)
        assert runner.name == "onnxruntime/fp32"
    with open_runner(run / "export" / "student.onnx", manifest=manifest, run_dir=run) as runner:
        assert runner.infer(random_batch(1)).shape == (1, len(CLASSES))
    # Other weights under the same name: only the hash can tell.
    export_onnx(tiny_net(seed=3), run / "export" / "student.onnx")
    with pytest.raises(UsageError, match="does not match the manifest"):
        open_runner(run / "export" / "student.onnx", manifest=manifest, run_dir=run)


def test_open_runner_takes_precision_from_the_manifest(tmp_path: Path) -> None:
    run, manifest = make_run(tmp_path)
    shutil.copyfile(run / "export" / "student.onnx", run / "export" / "student.sym.onnx")
    record_artifact(run, manifest, "export/student.sym.onnx", "onnx", precision="int8-qdq")
    with open_runner("export/student.sym.onnx", manifest=manifest, run_dir=run) as runner:
        assert runner.name == "onnxruntime/int8-qdq"


def test_open_runner_refuses_files_the_manifest_does_not_vouch_for(tmp_path: Path, onnx_file: Path) -> None:
    run, manifest = make_run(tmp_path)
    with pytest.raises(UsageError, match="not inside the run"):
        open_runner(onnx_file, manifest=manifest, run_dir=run)
    stray = shutil.copyfile(onnx_file, run / "export" / "stray.onnx")
    with pytest.raises(UsageError, match="not listed in"):
        open_runner(stray, manifest=manifest, run_dir=run)
    with pytest.raises(UsageError, match="together"):
        open_runner(stray, manifest=manifest)


def test_open_runner_rejects_unknown_suffixes(tmp_path: Path) -> None:
    weights = tmp_path / "student.safetensors"
    weights.write_bytes(b"\0" * 16)
    with pytest.raises(UsageError, match=r"unknown model file type '\.safetensors'"):
        open_runner(weights)
    with pytest.raises(UsageError, match="device"):
        open_runner(weights, device="gpu")


def test_open_runner_sends_plans_to_tensorrt(tmp_path: Path) -> None:
    if tensorrt_available()[0]:
        pytest.skip("real TensorRT is installed; this checks the message where it is not")
    plan = write_plan(tmp_path / "student.fp16.plan", "fp16", max_batch=16)
    # The TensorRT runner got the file: it read the sidecar, then found no TensorRT to run it.
    with pytest.raises(MissingDependencyError, match="TensorRT"):
        open_runner(plan)
    with pytest.raises(UsageError, match="sidecar not found"):
        open_runner(plan.rename(tmp_path / "other.engine"))


def test_select_artifact_prefers_the_standard_file_name(tmp_path: Path) -> None:
    run, manifest = make_run(tmp_path)
    source = run / "export" / "student.onnx"
    # What export writes beside the fp32 file: a uint8-input fp32 variant and two int8 flavours.
    for name, precision in [("student.uint8.onnx", "fp32"), ("student.int8.trt.onnx", "int8")]:
        shutil.copyfile(source, run / "export" / name)
        record_artifact(run, manifest, f"export/{name}", "onnx", precision=precision)
    assert select_artifact(run, manifest, "onnxruntime", "int8") == "export/student.int8.trt.onnx"
    shutil.copyfile(source, run / "export" / "student.int8.onnx")
    record_artifact(run, manifest, "export/student.int8.onnx", "onnx", precision="int8")
    assert select_artifact(run, manifest, "onnxruntime", "fp32") == "export/student.onnx"
    assert select_artifact(run, manifest, "onnxruntime", "int8") == "export/student.int8.onnx"
    # Every format the run has is listed by the key that names it, and each key selects its file.
    has = "onnxruntime/fp32, onnxruntime/fp32-student.uint8, onnxruntime/int8, onnxruntime/int8-trt"
    with pytest.raises(UsageError, match=rf"no onnxruntime/fp16 file in the manifest \(has: {has}\);"):
        select_artifact(run, manifest, "onnxruntime", "fp16")
    assert select_artifact(run, manifest, "onnxruntime", "int8-trt") == "export/student.int8.trt.onnx"
    assert select_artifact(run, manifest, "onnxruntime", "fp32-student.uint8") == "export/student.uint8.onnx"
    # The advice names the format's own command, one that works here (torch is installed).
    with pytest.raises(UsageError, match=r"make it with `reviewkd export \S+ --formats fp16`$"):
        select_artifact(run, manifest, "onnxruntime", "fp16")
    with pytest.raises(UsageError, match=r"no tensorrt/fp16 file .*`reviewkd export \S+ --formats tensorrt`"):
        select_artifact(run, manifest, "tensorrt", "fp16")
    shutil.copyfile(source, run / "export" / "other.fp16.onnx")
    shutil.copyfile(source, run / "export" / "another.fp16.onnx")
    record_artifact(run, manifest, "export/other.fp16.onnx", "onnx")
    record_artifact(run, manifest, "export/another.fp16.onnx", "onnx")
    with pytest.raises(
        UsageError, match=r"several onnxruntime/fp16 files \(export/another\.fp16\.onnx, export/other"
    ):
        select_artifact(run, manifest, "onnxruntime", "fp16")
    with pytest.raises(UsageError, match="backend 'torch'"):
        select_artifact(run, manifest, "torch", "fp32")


def test_gpu_providers_run_on_the_device_index_asked_for() -> None:
    """ONNX Runtime's GPU providers default to CUDA device 0: the runner passes its device index, and
    keeps TF32 off on CUDA."""
    assert provider_options("CUDAExecutionProvider", 2) == {"use_tf32": "0", "device_id": "2"}
    assert provider_options("TensorrtExecutionProvider", 1) == {"device_id": "1"}
    assert provider_options("CPUExecutionProvider", 3) == {}


def test_a_detection_file_returns_its_named_outputs_not_logits(tmp_path: Path) -> None:
    path = write_detection_onnx(tmp_path / "detector.onnx")
    images = np.zeros((2, *DETECTION_INPUT_SHAPE), dtype=np.float32)
    with OnnxRuntimeRunner(path) as runner:
        assert runner.output_names == DETECTION_OUTPUTS and runner.output_name is None
        outputs = runner.infer_outputs(images)
        with pytest.raises(UsageError, match=r"several outputs \(num_detections, .*\) and none is named"):
            runner.infer(images)
        with pytest.raises(UsageError, match=r"expected a batch of shape \(N, 3, 16, 24\)"):
            runner.infer_outputs(images[:, :, :8])
    assert list(outputs) == list(DETECTION_OUTPUTS)
    assert outputs["num_detections"].dtype == np.int32 and outputs["num_detections"].shape == (2, 1)


def test_a_classifier_runner_has_no_named_outputs() -> None:
    with (
        TorchRunner(tiny_net(), INPUT_SHAPE) as runner,
        pytest.raises(UsageError, match="returns a classifier's logits only"),
    ):
        runner.infer_outputs(random_batch(1))
