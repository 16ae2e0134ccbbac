"""TensorRT engine builder, sidecar and runner.

The sidecar, profile and compatibility rules are pure and tested everywhere. Building and running
an engine needs TensorRT and an NVIDIA GPU: here that must fail with exit code 3 and leave nothing
half-written; where both exist, the end-to-end test builds a real engine and compares it with
onnxruntime.
"""

from __future__ import annotations

import enum
import json
import re
import sys
import types
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from deploy.errors import MissingDependencyError, UsageError
from deploy.fileio import sha256_file
from deploy.gpu import GpuInfo, GpuProbe, probe_gpu
from deploy.trt_sidecar import (
    DlaSettings,
    Sidecar,
    check_engine_compatible,
    gpu_mismatch,
    host_machine,
    host_os,
    machine_mismatch,
    parse_version,
    profile_shapes,
    read_sidecar,
    register_tensorrt_plugins,
    require_tensorrt_and_gpu,
    sidecar_path,
    start_tensorrt,
    tensorrt_available,
    uses_strong_typing,
    version_mismatch,
    write_sidecar,
)
from export.tensorrt_engine import (
    apply_builder_flags,
    build_engine,
    check_dla_request,
    describe_parser_error,
    inspect_onnx,
    weak_typing_flags,
)
from tests.helpers import export_onnx, tensorrt_gpu_missing

A100 = GpuInfo("NVIDIA A100-SXM4-80GB", (8, 0))
H100 = GpuInfo("NVIDIA H100 80GB HBM3", (9, 0))
ORIN = GpuInfo("Orin", (8, 7))
T4 = GpuInfo("Tesla T4", (7, 5))


TRT_GPU_MISSING = tensorrt_gpu_missing()


# --------------------------------------------------------------------------- tiny ONNX files


def _conv_graph(
    path: Path, *, batch: int | str = "N", chw: tuple[int, int, int] = (3, 8, 6), fp16: bool = False
) -> Path:
    """A conv -> relu -> global pool -> flatten -> gemm classifier, NCHW input "images"."""
    rng = np.random.default_rng(0)
    c, _, _ = chw
    weights = {
        "w": rng.normal(size=(4, c, 3, 3)).astype(np.float32),
        "b": rng.normal(size=(4,)).astype(np.float32),
        "fc_w": rng.normal(size=(5, 4)).astype(np.float32),
        "fc_b": rng.normal(size=(5,)).astype(np.float32),
    }
    inits = [numpy_helper.from_array(v.astype(np.float16) if fp16 else v, name=k) for k, v in weights.items()]
    nodes = []
    source = "images"
    if fp16:
        nodes.append(helper.make_node("Cast", ["images"], ["x16"], to=TensorProto.FLOAT16))
        source = "x16"
    nodes += [
        helper.make_node("Conv", [source, "w", "b"], ["c"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c"], ["r"]),
        helper.make_node("GlobalAveragePool", ["r"], ["p"]),
        helper.make_node("Flatten", ["p"], ["f"]),
        helper.make_node("Gemm", ["f", "fc_w", "fc_b"], ["l16" if fp16 else "logits"], transB=1),
    ]
    if fp16:
        nodes.append(helper.make_node("Cast", ["l16"], ["logits"], to=TensorProto.FLOAT))
    graph = helper.make_graph(
        nodes,
        "tiny",
        [helper.make_tensor_value_info("images", TensorProto.FLOAT, [batch, *chw])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [batch, 5])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 9
    onnx.checker.check_model(model, full_check=True)
    onnx.save(model, str(path))
    return path


def _quantized(tmp_path: Path, activation: str) -> Path:
    """Q/DQ-quantise the tiny graph with onnxruntime's static quantisation (activation int8 or uint8)."""
    from onnxruntime.quantization import (
        CalibrationDataReader,
        QuantFormat,
        QuantType,
        quantize_static,
    )

    source = _conv_graph(tmp_path / "fp32.onnx")

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            rng = np.random.default_rng(1)
            batches = [rng.normal(size=(2, 3, 8, 6)).astype(np.float32) for _ in range(4)]
            self._batches = iter([{"images": batch} for batch in batches])

        def get_next(self) -> dict[str, np.ndarray] | None:
            return next(self._batches, None)

    out = tmp_path / f"int8_{activation}.onnx"
    quantize_static(
        str(source),
        str(out),
        Reader(),
        quant_format=QuantFormat.QDQ,
        activation_type=QuantType.QInt8 if activation == "int8" else QuantType.QUInt8,
        weight_type=QuantType.QInt8,
        per_channel=True,
        extra_options={"ActivationSymmetric": True, "WeightSymmetric": True},
    )
    return out


def _sidecar(**changes: object) -> Sidecar:
    fields: dict[str, object] = dict(
        plan_file="student.fp16.plan",
        plan_sha256="ab" * 32,
        tensorrt_version="10.13.0.35",
        gpu=A100,
        precision="fp16",
        compatibility=None,
        strongly_typed=True,
        input_names=("images",),
        output_names=("logits",),
        profile=profile_shapes((3, 32, 32), 1, 8, 32),
        source_onnx="student.fp16.onnx",
        source_onnx_sha256="cd" * 32,
        machine="x86_64",
        os="linux",
        build={"workspace_mib": 1024, "optimization_level": 3},
    )
    fields.update(changes)
    return Sidecar(**fields)  # type: ignore[arg-type]


# --------------------------------------------------------------------------- profile shapes


def test_profile_shapes_nchw_and_batches() -> None:
    profile = profile_shapes((3, 32, 24), 1, 8, 32)
    assert profile.min == (1, 3, 32, 24)
    assert profile.opt == (8, 3, 32, 24)
    assert profile.max == (32, 3, 32, 24)
    assert (profile.min_batch, profile.max_batch, profile.chw) == (1, 32, (3, 32, 24))
    assert profile_shapes([1, 5, 5], 4, 4, 4).max == (4, 1, 5, 5)


@pytest.mark.parametrize(
    ("chw", "batches", "needle"),
    [
        ((3, 32, 32), (0, 1, 2), "1 <= min"),
        ((3, 32, 32), (4, 2, 8), "min=4 opt=2"),
        ((3, 32, 32), (1, 16, 8), "opt=16 max=8"),
        ((3, 32), (1, 1, 1), "(C, H, W)"),
        ((3, 0, 32), (1, 1, 1), "(C, H, W)"),
        ((3, 32, 32), (1, 2.5, 4), "integers"),
    ],
)
def test_profile_shapes_rejects(chw: tuple[int, ...], batches: tuple, needle: str) -> None:
    with pytest.raises(UsageError) as info:
        profile_shapes(chw, *batches)
    assert needle in str(info.value)
    assert info.value.exit_code == 2


# --------------------------------------------------------------------------- sidecar file


def test_sidecar_round_trip(tmp_path: Path) -> None:
    sidecar = _sidecar(compatibility="hardware", precision="int8")
    path = write_sidecar(sidecar_path(tmp_path / "student.int8.plan"), sidecar)
    assert path.name == "student.int8.plan.json"
    assert read_sidecar(path) == sidecar
    data = json.loads(path.read_text())
    assert data["gpu"] == {"name": A100.name, "compute_capability": "8.0"}
    assert data["machine"] == "x86_64" and data["os"] == "linux" and data["dla"] is None
    assert data["schema_version"] == 3
    assert data["profile"]["max"] == [32, 3, 32, 32]
    assert data["tensorrt_version"] == "10.13.0.35"


def test_sidecar_records_the_dla_core_and_gpu_fallback(tmp_path: Path) -> None:
    sidecar = _sidecar(machine="aarch64", gpu=ORIN, dla=DlaSettings(core=1, gpu_fallback=True))
    path = write_sidecar(tmp_path / "student.fp16.plan.json", sidecar)
    assert json.loads(path.read_text())["dla"] == {"core": 1, "gpu_fallback": True}
    assert read_sidecar(path) == sidecar


def test_missing_sidecar_names_the_file(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match=r"model\.plan\.json: TensorRT sidecar not found"):
        read_sidecar(tmp_path / "model.plan.json")


@pytest.mark.parametrize(
    ("mutate", "needle"),
    [
        (lambda d: d.pop("gpu"), "missing 'gpu'"),
        (lambda d: d.update(precision="bf16"), "precision 'bf16'"),
        (lambda d: d.update(schema="other"), "'schema'"),
        (lambda d: d.update(schema_version=99), "schema_version"),
        (lambda d: d["gpu"].update(compute_capability="eight"), "major.minor"),
        (lambda d: d.update(tensorrt_version="ten"), "not a TensorRT version"),
        (lambda d: d.update(compatibility="any"), "compatibility 'any'"),
        (lambda d: d["profile"].update(min=[64, 3, 32, 32]), "1 <= min <= opt <= max"),
        (lambda d: d["profile"].update(opt=[8, 3, 16, 32]), "outside the batch"),
        (lambda d: d["profile"].update(max=[32, 3, 32]), "four positive integers"),
        (lambda d: d.update(strongly_typed=1), "'strongly_typed' has the wrong type"),
        (lambda d: d.update(outputs=[]), "non-empty list"),
        (lambda d: d["plan"].pop("sha256"), "missing plan.'sha256'"),
        (lambda d: d.pop("machine"), "missing 'machine'"),
        (lambda d: d.update(machine=""), "'machine' is empty"),
        (lambda d: d.update(dla={"core": -1, "gpu_fallback": True}), "dla.core must be 0 or more"),
        (lambda d: d.update(dla={"core": 0, "gpu_fallback": "yes"}), "dla.'gpu_fallback' has the wrong type"),
        (lambda d: d.update(dla={"gpu_fallback": True}), "missing dla.'core'"),
        # A sidecar from before the architecture was recorded: the plan must be rebuilt.
        (lambda d: d.update(schema_version=1), "unsupported schema_version 1"),
    ],
)
def test_malformed_sidecar_is_a_usage_error(tmp_path: Path, mutate, needle: str) -> None:
    data = _sidecar().to_json()
    mutate(data)
    path = tmp_path / "m.plan.json"
    path.write_text(json.dumps(data))
    with pytest.raises(UsageError) as info:
        read_sidecar(path)
    assert str(path) in str(info.value)
    assert needle in str(info.value)


def test_sidecar_that_is_not_json(tmp_path: Path) -> None:
    path = tmp_path / "m.plan.json"
    path.write_text("{not json")
    with pytest.raises(UsageError, match="not JSON"):
        read_sidecar(path)


# --------------------------------------------------------------------------- compatibility rules


def test_parse_version() -> None:
    assert parse_version("10.13.0.35") == (10, 13, 0)
    assert parse_version("11.0") == (11, 0, 0)
    assert parse_version("10.8.0.43+cuda12") == (10, 8, 0)
    with pytest.raises(ValueError):
        parse_version("latest")


def test_strong_typing_from_10_12() -> None:
    assert not uses_strong_typing("10.3.0.26")
    assert not uses_strong_typing("10.11.0.33")
    assert uses_strong_typing("10.12.0.36")
    assert uses_strong_typing("11.0.0.1")


def test_weak_typing_flags_follow_the_file() -> None:
    assert weak_typing_flags("fp32") == ()
    assert weak_typing_flags("fp16") == ("FP16",)
    assert weak_typing_flags("int8") == ("INT8",)
    # mixed precision's TensorRT file: the layers kept out of int8 are fp16 in the file
    assert weak_typing_flags("int8", fp16_layers=True) == ("INT8", "FP16")
    assert weak_typing_flags("fp32", fp16_layers=True) == ()


@pytest.mark.parametrize(
    ("built", "installed", "version_compatible", "ok"),
    [
        ("10.13.0.35", "10.13.0.35", False, True),
        # TensorRT refuses a plan of another build (opaquely): so does the sidecar check, in words.
        ("10.13.0.35", "10.13.0.99", False, False),
        ("10.13.3.9", "10.13.3.9.post1", False, True),  # a wheel's re-release, the same TensorRT build
        ("10.13.0.35", "10.13.1.0", False, False),
        ("10.13.0.35", "10.12.0.36", False, False),
        ("10.13.0.35", "11.0.0.1", False, False),
        ("10.8.0.43", "10.13.0.35", True, True),
        ("10.13.0.35", "10.13.0.35", True, True),
        ("10.13.0.35", "10.8.0.43", True, False),
        ("10.13.0.35", "11.0.0.1", True, False),
    ],
)
def test_version_rule(built: str, installed: str, version_compatible: bool, ok: bool) -> None:
    assert (version_mismatch(built, installed, version_compatible) is None) is ok


@pytest.mark.parametrize(
    ("built", "present", "hardware_compatible", "ok"),
    [
        (A100, A100, False, True),
        (A100, GpuInfo("NVIDIA A30", (8, 0)), False, True),
        (A100, H100, False, False),
        (A100, ORIN, False, False),
        (A100, H100, True, True),
        (A100, ORIN, True, True),
        (A100, T4, True, False),
    ],
)
def test_gpu_rule(built: GpuInfo, present: GpuInfo, hardware_compatible: bool, ok: bool) -> None:
    assert (gpu_mismatch(built, present, hardware_compatible) is None) is ok


@pytest.mark.parametrize(
    ("raw", "recorded"),
    [
        ("x86_64", "x86_64"),
        ("AMD64", "x86_64"),
        ("aarch64", "aarch64"),
        ("arm64", "aarch64"),
        ("ppc64le", "ppc64le"),
    ],
)
def test_host_machine_unifies_os_spellings(raw: str, recorded: str) -> None:
    assert host_machine(raw) == recorded


def test_a_plan_built_on_another_cpu_architecture_is_refused() -> None:
    assert machine_mismatch("x86_64", "x86_64") is None
    assert machine_mismatch("x86_64", "AMD64") is None
    assert machine_mismatch("x86_64", "aarch64") == "it was built on a x86_64 host, but this host is aarch64"
    # The case of the issue: a hardware-compatible plan from an x86 server passes the GPU rule on an
    # Orin (8.7 >= 8.0), and only the architecture tells it cannot load there.
    server_plan = _sidecar(compatibility="hardware")
    check_engine_compatible(
        server_plan, tensorrt_version="10.13.0.35", gpu=ORIN, plan_path="e.plan", machine="x86_64"
    )
    with pytest.raises(UsageError) as info:
        check_engine_compatible(
            server_plan, tensorrt_version="10.13.0.35", gpu=ORIN, plan_path="e.plan", machine="aarch64"
        )
    message = str(info.value)
    assert message.startswith("e.plan: this TensorRT engine cannot run here: it was built on a x86_64 host")
    assert "rebuild it on this device from student.fp16.onnx" in message
    # Without `machine` and `system`, the host's own architecture and OS are compared.
    here = _sidecar(machine=host_machine(), os=host_os())
    check_engine_compatible(here, tensorrt_version="10.13.0.35", gpu=A100, plan_path="e.plan")


def test_a_plan_built_on_another_os_is_refused_though_the_cpu_matches() -> None:
    """Windows' AMD64 is Linux's x86_64, but a plan's host code belongs to one OS."""
    windows_plan = _sidecar(machine=host_machine("AMD64"), os=host_os("Windows"))
    with pytest.raises(UsageError, match="it was built on windows, but this host runs linux"):
        check_engine_compatible(
            windows_plan, tensorrt_version="10.13.0.35", gpu=A100, plan_path="e.plan", system="Linux"
        )
    check_engine_compatible(
        windows_plan, tensorrt_version="10.13.0.35", gpu=A100, plan_path="e.plan", system="Windows"
    )


def test_a_tensorrt_that_cannot_start_cuda_is_exit_3_naming_the_mismatch(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """trt.Builder/trt.Runtime raise pybind11's nullptr TypeError when TensorRT cannot initialise CUDA
    (a CUDA 13 TensorRT on a CUDA 12 driver): one line, exit 3, with doctor's finding and fix."""
    import deploy.trt_sidecar as sidecar_module
    from tests.deploy.test_doctor import BINDINGS_13, ORT_GPU_CU13, TRT_CU13, snapshot

    def failing_builder(logger: object) -> object:
        raise TypeError("pybind11::init(): factory function returned nullptr")

    monkeypatch.setattr(
        sidecar_module, "collect", lambda: snapshot(ORT_GPU_CU13, TRT_CU13, BINDINGS_13, driver=(12, 4))
    )
    with pytest.raises(MissingDependencyError) as info:
        start_tensorrt(failing_builder, None, "trt.Builder", "11.4.0.106")
    message = str(info.value)
    assert info.value.exit_code == 3 and "\n" not in message
    assert message.startswith("TensorRT 11.4.0.106 could not initialise CUDA (trt.Builder): the driver runs")
    assert "tensorrt-cu13 11.4.0.106 (CUDA 13)" in message and "pip install 'reviewkd[cuda12]'" in message
    # Any other TypeError is a bug to see, not a missing dependency.
    def broken(logger: object) -> object:
        raise TypeError("an unrelated bug")

    with pytest.raises(TypeError, match="unrelated"):
        start_tensorrt(broken, None, "trt.Runtime", "11.4.0.106")
    made = start_tensorrt(lambda logger: ("runtime", logger), "log", "trt.Runtime", "11.4.0.106")
    assert made == ("runtime", "log")


def test_incompatible_engine_says_how_to_rebuild() -> None:
    sidecar = _sidecar()
    check_engine_compatible(sidecar, tensorrt_version="10.13.0.35", gpu=A100, plan_path="e.plan")
    with pytest.raises(UsageError) as info:
        check_engine_compatible(sidecar, tensorrt_version="10.14.1.48", gpu=T4, plan_path="e.plan")
    message = str(info.value)
    assert "TensorRT 10.13.0.35" in message and "10.14.1.48" in message
    assert "Tesla T4" in message and "7.5" in message
    assert "rebuild it on this device from student.fp16.onnx" in message
    # Hardware- and version-compatible engines travel further.
    relaxed = _sidecar(compatibility="hardware")
    check_engine_compatible(relaxed, tensorrt_version="10.13.0.35", gpu=H100, plan_path="e.plan")
    with pytest.raises(UsageError, match="Ampere"):
        check_engine_compatible(relaxed, tensorrt_version="10.13.0.35", gpu=T4, plan_path="e.plan")


# --------------------------------------------------------------------------- dependency probe


def test_tensorrt_available_tells_stubs_from_tensorrt(monkeypatch: pytest.MonkeyPatch) -> None:
    # None in sys.modules makes the import fail as for an absent package.
    monkeypatch.setitem(sys.modules, "tensorrt", None)
    ok, reason = tensorrt_available()
    assert not ok and "not installed" in reason and "reviewkd[cuda13]" in reason and "JetPack" in reason

    # What `import tensorrt` gives when only tensorrt-stubs is installed: a namespace without classes.
    monkeypatch.setitem(sys.modules, "tensorrt", types.ModuleType("tensorrt"))
    ok, reason = tensorrt_available()
    assert not ok and "type stubs" in reason

    real = types.ModuleType("tensorrt")
    real.Builder = object  # type: ignore[attr-defined]
    real.__version__ = "10.13.0.35"  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "tensorrt", real)
    assert tensorrt_available() == (True, "TensorRT 10.13.0.35")


class FakeCudaError(enum.Enum):
    """cuda-python's cudaError_t members the probe meets."""

    cudaSuccess = 0
    cudaErrorInsufficientDriver = 35
    cudaErrorNoDevice = 100
    cudaErrorLaunchFailure = 719


def fake_cudart(count_error: FakeCudaError, count: int = 0) -> types.SimpleNamespace:
    """cuda-python's runtime module as far as the GPU probe uses it: (error, value) tuples."""
    props = types.SimpleNamespace(name=b"Orin\0\0\0", major=8, minor=7)
    return types.SimpleNamespace(
        cudaError_t=FakeCudaError,
        cudaGetDeviceCount=lambda: (count_error, count),
        cudaGetDevice=lambda: (FakeCudaError.cudaSuccess, 0),
        cudaGetDeviceProperties=lambda device: (FakeCudaError.cudaSuccess, props),
    )


@pytest.mark.parametrize(
    ("error", "count", "expected"),
    [
        (
            FakeCudaError.cudaErrorInsufficientDriver,
            0,
            "cudaGetDeviceCount returned cudaErrorInsufficientDriver (the NVIDIA driver is missing, or older",
        ),
        (FakeCudaError.cudaErrorNoDevice, 0, "returned cudaErrorNoDevice (no CUDA device is visible"),
        (FakeCudaError.cudaErrorLaunchFailure, 0, "returned cudaErrorLaunchFailure"),
        (FakeCudaError.cudaSuccess, 0, "cudaGetDeviceCount found 0 devices"),
    ],
)
def test_gpu_probe_reports_the_cuda_error(
    monkeypatch: pytest.MonkeyPatch, error: FakeCudaError, count: int, expected: str
) -> None:
    import deploy.gpu as gpu_module

    def torch_without_driver(index: int) -> GpuInfo:
        raise RuntimeError("Found no NVIDIA driver on your system.\nPlease check ...")

    monkeypatch.setattr(gpu_module, "import_cudart", lambda: fake_cudart(error, count))
    monkeypatch.setattr(
        gpu_module,
        "_PROBES",
        (("torch", torch_without_driver), ("cuda-python", gpu_module._from_cuda_python)),
    )
    probe = probe_gpu()
    assert probe.gpu is None
    assert probe.reasons[0] == "torch: RuntimeError: Found no NVIDIA driver on your system."
    assert probe.reasons[1].startswith("cuda-python: ") and expected in probe.reasons[1]
    real = types.ModuleType("tensorrt")
    real.Builder = object  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "tensorrt", real)
    with pytest.raises(MissingDependencyError) as info:
        require_tensorrt_and_gpu("building a TensorRT engine")
    assert info.value.exit_code == 3 and expected in str(info.value)
    assert "no GPU" not in str(info.value) and "none was found" not in str(info.value)


def test_gpu_probe_finds_a_device_through_cuda_python(monkeypatch: pytest.MonkeyPatch) -> None:
    import deploy.gpu as gpu_module

    monkeypatch.setattr(gpu_module, "import_cudart", lambda: fake_cudart(FakeCudaError.cudaSuccess, 1))
    monkeypatch.setattr(gpu_module, "_PROBES", (("cuda-python", gpu_module._from_cuda_python),))
    assert probe_gpu() == GpuProbe(ORIN, ())
    # Device 1 of a machine that shows one: named, not device 0 instead.
    missing = probe_gpu(1)
    assert missing.gpu is None and "found 1 device(s), so no device 1" in missing.reasons[0]


@pytest.mark.parametrize(
    ("visible", "index", "physical"),
    [
        (None, 0, 0),
        (None, 1, 1),
        ("2,0", 0, 2),  # CUDA device 0 is physical GPU 2
        ("2,0", 1, 0),
        ("GPU-8f6b2c1e-aaaa-bbbb-cccc-0123456789ab", 0, "GPU-8f6b2c1e-aaaa-bbbb-cccc-0123456789ab"),
        ("1,foo,3", 0, 1),  # CUDA stops reading at the first invalid entry
    ],
)
def test_nvml_and_nvidia_smi_map_cuda_devices_through_cuda_visible_devices(
    visible: str | None, index: int, physical: int | str
) -> None:
    from deploy.gpu import visible_device

    environ = {} if visible is None else {"CUDA_VISIBLE_DEVICES": visible}
    assert visible_device(index, environ) == physical


@pytest.mark.parametrize(
    ("visible", "index", "reason"),
    [
        ("", 0, "leaves 0 device(s) visible"),
        ("-1", 0, "leaves 0 device(s) visible"),
        ("1,foo,3", 1, "leaves 1 device(s) visible, so no CUDA device 1"),
        ("MIG-1234", 0, "MIG instance"),
    ],
)
def test_cuda_visible_devices_that_hide_the_device_are_named(visible: str, index: int, reason: str) -> None:
    from deploy.gpu import GpuProbeError, visible_device

    with pytest.raises(GpuProbeError, match=re.escape(reason)):
        visible_device(index, {"CUDA_VISIBLE_DEVICES": visible})


def test_nvidia_smi_rows_are_picked_by_physical_index_or_uuid() -> None:
    from deploy.gpu import parse_nvidia_smi_gpus

    out = (
        "0, GPU-aaaa, NVIDIA A100-SXM4-80GB, 8.0, 550.54.15\n"
        "1, GPU-bbbb, NVIDIA H100 80GB HBM3, 9.0, 550.54.15\n"
    )
    assert parse_nvidia_smi_gpus(out, 1).name == "NVIDIA H100 80GB HBM3"
    assert parse_nvidia_smi_gpus(out, "GPU-aaaa").compute_capability == (8, 0)


def test_describe_parser_error_names_the_node() -> None:
    error = types.SimpleNamespace(
        node=lambda: 7,
        node_name=lambda: "/layer1/Conv",
        node_operator=lambda: "Conv",
        desc=lambda: "unsupported auto_pad",
    )
    assert describe_parser_error(error) == "node 7 (/layer1/Conv, Conv): unsupported auto_pad"
    whole_model = types.SimpleNamespace(node=lambda: -1, desc=lambda: "invalid protobuf")
    assert describe_parser_error(whole_model) == "invalid protobuf"


# --------------------------------------------------------------------------- builder flags


class FakeBuilderFlag(enum.Enum):
    """The BuilderFlag members the builder touches, with TensorRT's values."""

    FP16 = 0
    INT8 = 1
    GPU_FALLBACK = 3
    TF32 = 6
    VERSION_COMPATIBLE = 13


class FakeBuilderConfig:
    """An IBuilderConfig's flag set, starting as TensorRT's does: TF32 on, nothing else."""

    def __init__(self) -> None:
        self.flags = {FakeBuilderFlag.TF32}
        self.hardware_compatibility_level: Any = "NONE"

    def set_flag(self, flag: FakeBuilderFlag) -> None:
        assert isinstance(flag, FakeBuilderFlag)
        self.flags.add(flag)

    def clear_flag(self, flag: FakeBuilderFlag) -> None:
        assert isinstance(flag, FakeBuilderFlag)
        self.flags.discard(flag)

    def get_flag(self, flag: FakeBuilderFlag) -> bool:
        return flag in self.flags


@pytest.fixture
def fake_trt(monkeypatch: pytest.MonkeyPatch) -> types.ModuleType:
    """A `tensorrt` module with the builder enums `apply_precision_flags` uses."""
    module = types.ModuleType("tensorrt")
    module.BuilderFlag = FakeBuilderFlag  # type: ignore[attr-defined]
    module.HardwareCompatibilityLevel = types.SimpleNamespace(AMPERE_PLUS="AMPERE_PLUS")  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "tensorrt", module)
    return module


@pytest.mark.parametrize("precision", ["fp32", "fp16", "int8"])
@pytest.mark.parametrize("strongly_typed", [True, False])
def test_every_engine_is_built_with_tf32_cleared(
    fake_trt: types.ModuleType, precision: str, strongly_typed: bool
) -> None:
    config = FakeBuilderConfig()
    flags, cleared = apply_builder_flags(config, precision, strongly_typed=strongly_typed, compatibility=None)
    assert not config.get_flag(FakeBuilderFlag.TF32) and cleared == ["TF32"]
    expected = set() if strongly_typed else {FakeBuilderFlag[name] for name in weak_typing_flags(precision)}
    assert config.flags == expected and flags == [
        flag.name for flag in sorted(expected, key=lambda f: f.value)
    ]


@pytest.mark.parametrize("gpu_fallback", [True, False])
def test_dla_builds_default_to_the_dla_core(fake_trt: types.ModuleType, gpu_fallback: bool) -> None:
    fake_trt.DeviceType = types.SimpleNamespace(GPU="GPU", DLA="DLA")  # type: ignore[attr-defined]
    config = FakeBuilderConfig()
    config.default_device_type, config.DLA_core = "GPU", -1
    dla = DlaSettings(core=1, gpu_fallback=gpu_fallback)
    flags, cleared = apply_builder_flags(config, "fp16", strongly_typed=False, compatibility=None, dla=dla)
    assert (config.default_device_type, config.DLA_core) == ("DLA", 1)
    assert config.get_flag(FakeBuilderFlag.GPU_FALLBACK) is gpu_fallback
    assert flags == (["FP16", "GPU_FALLBACK"] if gpu_fallback else ["FP16"]) and cleared == ["TF32"]


@pytest.mark.parametrize(
    ("dla_core", "precision", "compatibility", "needle"),
    [
        (0, "fp16", None, None),
        (1, "int8", "version", None),
        (None, "fp32", "hardware", None),
        (-1, "fp16", None, "expected a DLA core number"),
        (True, "fp16", None, "expected a DLA core number"),
        (0, "fp32", None, "fp16 and int8 only"),
        (0, "fp16", "hardware", "GPUs only"),
    ],
)
def test_dla_requests_that_cannot_build_are_usage_errors(
    dla_core: Any, precision: str, compatibility: str | None, needle: str | None
) -> None:
    if needle is None:
        check_dla_request(dla_core, precision, compatibility, (8, 8, 8))
        return
    with pytest.raises(UsageError, match=needle) as info:
        check_dla_request(dla_core, precision, compatibility, (8, 8, 8))
    assert info.value.exit_code == 2 and str(info.value).startswith("--dla-core")


def test_a_dla_build_needs_one_static_batch_size() -> None:
    """The DLA has no dynamic shapes: the default profile 1,8,32 is refused with the static form."""
    with pytest.raises(UsageError, match=r"not the profile 1,8,32; give one, e.g. --trt-batch 8,8,8"):
        check_dla_request(0, "fp16", None, (1, 8, 32))
    check_dla_request(0, "int8", None, (4, 4, 4))
    check_dla_request(None, "fp16", None, (1, 8, 32))  # the GPU takes any profile


def test_build_engine_checks_the_dla_request_before_dependencies(tmp_path: Path) -> None:
    onnx_file = _conv_graph(tmp_path / "student.onnx")
    with pytest.raises(UsageError, match="fp16 and int8 only"):
        build_engine(onnx_file, tmp_path / "s.plan", dla_core=0)
    assert not (tmp_path / "s.plan").exists()


def test_compatibility_modes_set_their_flag(fake_trt: types.ModuleType) -> None:
    config = FakeBuilderConfig()
    flags, _ = apply_builder_flags(config, "fp16", strongly_typed=False, compatibility="version")
    assert flags == ["FP16", "VERSION_COMPATIBLE"]
    assert config.flags == {FakeBuilderFlag.FP16, FakeBuilderFlag.VERSION_COMPATIBLE}
    config = FakeBuilderConfig()
    flags, _ = apply_builder_flags(config, "fp32", strongly_typed=True, compatibility="hardware")
    assert flags == [] and config.flags == set()
    assert config.hardware_compatibility_level == "AMPERE_PLUS"


# --------------------------------------------------------------------------- ONNX inspection


def test_inspect_fp32_and_fp16(tmp_path: Path) -> None:
    fp32 = inspect_onnx(_conv_graph(tmp_path / "a.onnx", chw=(3, 8, 6)))
    assert (fp32.input_name, fp32.input_chw, fp32.fixed_batch) == ("images", (3, 8, 6), None)
    assert fp32.output_names == ("logits",)
    assert fp32.precision == "fp32"
    assert inspect_onnx(_conv_graph(tmp_path / "b.onnx", fp16=True)).precision == "fp16"
    assert inspect_onnx(_conv_graph(tmp_path / "c.onnx", batch=4)).fixed_batch == 4


def test_inspect_int8_qdq(tmp_path: Path) -> None:
    summary = inspect_onnx(_quantized(tmp_path, "int8"))
    assert summary.precision == "int8" and not summary.fp16_layers
    with pytest.raises(UsageError, match=r"UINT8.*symmetric int8"):
        inspect_onnx(_quantized(tmp_path, "uint8"))


def test_inspect_int8_file_with_a_layer_in_fp16(tmp_path: Path) -> None:
    import onnx

    from export.precision import compute_in_fp16

    model = onnx.load(str(_quantized(tmp_path, "int8")))
    float_nodes = [
        n.name for n in model.graph.node if n.op_type not in ("QuantizeLinear", "DequantizeLinear")
    ]
    compute_in_fp16(model, float_nodes[-1:])
    onnx.save(model, str(tmp_path / "mixed.onnx"))
    summary = inspect_onnx(tmp_path / "mixed.onnx")
    assert summary.precision == "int8" and summary.fp16_layers


def test_inspect_rejects_unfit_files(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="ONNX file not found"):
        inspect_onnx(tmp_path / "absent.onnx")
    corrupt = tmp_path / "corrupt.onnx"
    corrupt.write_bytes(b"\x08\x07garbage that is not a model")
    with pytest.raises(UsageError, match="not a readable ONNX file"):
        inspect_onnx(corrupt)
    renamed = _conv_graph(tmp_path / "renamed.onnx")
    model = onnx.load(str(renamed))
    model.graph.input[0].name = "input"
    model.graph.node[0].input[0] = "input"
    onnx.save(model, str(renamed))
    with pytest.raises(UsageError, match="one input named 'images'"):
        inspect_onnx(renamed)


# --------------------------------------------------------------------------- without TensorRT


@pytest.mark.skipif(TRT_GPU_MISSING is None, reason="TensorRT and a GPU are present")
def test_build_engine_without_tensorrt_exits_3_and_writes_nothing(tmp_path: Path) -> None:
    onnx_file = _conv_graph(tmp_path / "student.onnx")
    out = tmp_path / "export"
    out.mkdir()
    old_plan = out / "student.fp32.plan"
    old_plan.write_bytes(b"previous engine")
    with pytest.raises(MissingDependencyError) as info:
        build_engine(onnx_file, old_plan, timing_cache=out / "timing.cache")
    assert info.value.exit_code == 3
    assert "reviewkd[cuda13]" in str(info.value) or "GPU" in str(info.value)
    assert old_plan.read_bytes() == b"previous engine"
    assert sorted(p.name for p in out.iterdir()) == ["student.fp32.plan"]
    with pytest.raises(MissingDependencyError):
        build_engine(onnx_file, out / "new.plan")
    assert not (out / "new.plan").exists() and not (out / "new.plan.json").exists()


def test_build_engine_checks_arguments_before_dependencies(tmp_path: Path) -> None:
    onnx_file = _conv_graph(tmp_path / "student.onnx")
    with pytest.raises(UsageError, match="1 <= min <= opt <= max"):
        build_engine(onnx_file, tmp_path / "s.plan", min_batch=8, opt_batch=4)
    with pytest.raises(UsageError, match="holds a fp32 graph, not fp16"):
        build_engine(onnx_file, tmp_path / "s.plan", precision="fp16")
    with pytest.raises(UsageError, match="compatibility"):
        build_engine(onnx_file, tmp_path / "s.plan", compatibility="everything")
    fixed = _conv_graph(tmp_path / "fixed.onnx", batch=4)
    with pytest.raises(UsageError, match="fixed at 4"):
        build_engine(fixed, tmp_path / "s.plan")
    assert not (tmp_path / "s.plan").exists()


@pytest.mark.skipif(TRT_GPU_MISSING is None, reason="TensorRT and a GPU are present")
def test_runner_without_tensorrt(tmp_path: Path) -> None:
    from deploy.runners.tensorrt_runner import TensorRTRunner

    plan = tmp_path / "student.fp16.plan"
    with pytest.raises(UsageError, match="plan not found"):
        TensorRTRunner(plan)
    plan.write_bytes(b"engine bytes")
    with pytest.raises(UsageError, match=r"student\.fp16\.plan\.json: TensorRT sidecar not found"):
        TensorRTRunner(plan)
    write_sidecar(sidecar_path(plan), _sidecar(plan_sha256=sha256_file(plan)))
    with pytest.raises(MissingDependencyError) as info:
        TensorRTRunner(plan)
    assert info.value.exit_code == 3


def test_runner_points_the_runtime_at_the_plans_dla_core() -> None:
    from deploy.runners.tensorrt_runner import TensorRTRunner

    runner = TensorRTRunner.__new__(TensorRTRunner)  # only the DLA step, which needs no TensorRT
    runner.plan_path = Path("student.fp16.plan")
    orin = types.SimpleNamespace(num_DLA_cores=2, DLA_core=-1)
    runner._select_dla_core(orin, 1)  # type: ignore[arg-type]
    assert orin.DLA_core == 1
    with pytest.raises(UsageError, match=r"built for DLA core 2, and this device has 2 DLA core\(s\)"):
        runner._select_dla_core(orin, 2)  # type: ignore[arg-type]
    discrete_gpu = types.SimpleNamespace(num_DLA_cores=0, DLA_core=-1)
    with pytest.raises(UsageError, match="has 0 DLA core") as info:
        runner._select_dla_core(discrete_gpu, 0)  # type: ignore[arg-type]
    assert "rebuild the engine on this device" in str(info.value) and discrete_gpu.DLA_core == -1


# --------------------------------------------------------------------------- with TensorRT and a GPU


@pytest.mark.tensorrt
@pytest.mark.gpu
@pytest.mark.skipif(TRT_GPU_MISSING is not None, reason=f"needs TensorRT and a GPU: {TRT_GPU_MISSING}")
def test_engine_end_to_end_matches_onnxruntime(tmp_path: Path) -> None:
    import onnxruntime as ort
    from torch import nn

    from deploy.runners.tensorrt_runner import TensorRTRunner

    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 8, 3, stride=2, padding=1), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 10),
    ).eval()  # fmt: skip
    onnx_file = export_onnx(model, tmp_path / "student.onnx", (3, 16, 12))
    plan = tmp_path / "student.fp32.plan"
    cache = tmp_path / "timing.cache"
    sidecar = build_engine(onnx_file, plan, min_batch=1, opt_batch=4, max_batch=8, timing_cache=cache)
    assert plan.read_bytes()[:1] != b"{"  # a plain plan, no JSON prepended
    assert cache.stat().st_size > 0
    assert sidecar == json.loads(sidecar_path(plan).read_text())
    assert sidecar["precision"] == "fp32" and sidecar["profile"]["max"] == [8, 3, 16, 12]
    assert sidecar["plan"]["sha256"] == sha256_file(plan)

    images = np.random.default_rng(0).normal(size=(5, 3, 16, 12)).astype(np.float32)
    expected = ort.InferenceSession(str(onnx_file), providers=["CPUExecutionProvider"]).run(
        None, {"images": images}
    )[0]
    with TensorRTRunner(plan) as runner:
        assert runner.name == "tensorrt/fp32"
        assert (runner.min_batch, runner.max_batch, runner.input_shape) == (1, 8, (3, 16, 12))
        # The fp32 gate: TF32 is cleared at build time, so TensorRT's fp32 agrees to 1e-4.
        np.testing.assert_allclose(runner.infer(images), expected, atol=1e-4, rtol=0)
        np.testing.assert_allclose(runner.infer(images[:1]), expected[:1], atol=1e-4, rtol=0)
        with pytest.raises(UsageError, match=r"outside the model's range 1\.\.8"):
            runner.infer(np.zeros((9, 3, 16, 12), np.float32))


# --------------------------------------------------------------------------- plugin layers


def _efficient_nms_graph(path: Path) -> Path:
    """A detector-shaped graph whose NMS is TensorRT's EfficientNMS_TRT plugin (a custom domain,
    as export.detection writes it), giving the four detection outputs."""
    outputs = ["num_detections", "detection_boxes", "detection_scores", "detection_classes"]
    nodes = [
        helper.make_node("Flatten", ["images"], ["flat"]),
        helper.make_node("EfficientNMS_TRT", ["flat", "flat"], outputs, domain="trt.plugins"),
    ]
    graph = helper.make_graph(
        nodes,
        "nms",
        [helper.make_tensor_value_info("images", TensorProto.FLOAT, ["N", 3, 8, 6])],
        [helper.make_tensor_value_info(name, TensorProto.FLOAT, None) for name in outputs],
    )
    opsets = [helper.make_opsetid("", 18), helper.make_opsetid("trt.plugins", 1)]
    model = helper.make_model(graph, opset_imports=opsets)
    onnx.save(model, str(path))
    return path


def test_inspect_names_the_tensorrt_plugin_layers(tmp_path: Path) -> None:
    summary = inspect_onnx(_efficient_nms_graph(tmp_path / "nms.onnx"))
    assert summary.plugins == ("EfficientNMS_TRT",) and summary.precision == "fp32"
    assert summary.output_names[0] == "num_detections"
    assert inspect_onnx(_conv_graph(tmp_path / "plain.onnx")).plugins == ()


def test_plugins_are_registered_only_where_a_file_uses_them() -> None:
    calls: list[tuple[object, str]] = []

    def init_plugins(logger: object, namespace: str) -> bool:
        calls.append((logger, namespace))
        return True

    logger = object()
    register_tensorrt_plugins(init_plugins, logger, (), "plain.onnx")
    assert calls == []
    register_tensorrt_plugins(init_plugins, logger, ("EfficientNMS_TRT",), "nms.onnx")
    assert calls == [(logger, "")]  # TensorRT's own plugins live in the empty namespace


def test_a_plugin_library_that_does_not_load_is_exit_3_naming_the_layer() -> None:
    def plugin_library_missing(_logger: object, _namespace: str) -> bool:
        return False

    named = r"nms\.onnx: uses TensorRT plugin layer\(s\) EfficientNMS_TRT"
    with pytest.raises(MissingDependencyError, match=named):
        register_tensorrt_plugins(plugin_library_missing, object(), ("EfficientNMS_TRT",), "nms.onnx")
