"""`reviewkd doctor`'s verdicts on made-up machines, and its run on this one."""

from __future__ import annotations

import json

import pytest

from deploy.doctor import (
    ERROR,
    OK,
    Distribution,
    Snapshot,
    diagnose,
    onnxruntime_gpu_cuda_major,
    parse_nvidia_smi_cuda,
    tensorrt_cuda_major,
    torch_cuda_major,
)

# Requirements as the packages declare them on PyPI (their METADATA's Requires-Dist).
TORCH_CU13 = Distribution(
    "torch",
    "2.14.1",
    (
        'cuda-toolkit[cublas,cudart]==13.0.3; platform_system == "Linux"',
        'cuda-bindings<14,>=13.0.3; platform_system == "Linux" and python_version < "3.15"',
    ),
)
TORCH_CU12 = Distribution("torch", "2.10.0", ('cuda-bindings==12.9.4; platform_system == "Linux"',))
ORT_GPU_CU12 = Distribution("onnxruntime-gpu", "1.26.0", ('nvidia-cuda-runtime-cu12~=12.0; extra == "cuda"',))
ORT_GPU_CU13 = Distribution("onnxruntime-gpu", "1.28.0", ('nvidia-cuda-runtime~=13.0; extra == "cuda"',))
ORT_CPU = Distribution("onnxruntime", "1.31.1")
BINDINGS_13 = Distribution("cuda-bindings", "13.0.3")
BINDINGS_12 = Distribution("cuda-bindings", "12.9.4")
TRT_CU13 = Distribution("tensorrt-cu13", "11.4.0.106")
TRT_CU12 = Distribution("tensorrt-cu12", "10.16.1.11")


def snapshot(
    *dists: Distribution, driver: tuple[int, int] | None = (13, 0), machine: str = "x86_64"
) -> Snapshot:
    return Snapshot(
        machine=machine,
        distributions={d.name: d for d in dists},
        driver_cuda=driver,
        driver_reason="" if driver else "nvidia-smi is not on PATH",
        gpu="NVIDIA H100 (cc 9.0)" if driver else None,
        gpu_reasons=() if driver else ("no probe found a GPU",),
        tensorrt_importable=any(d.name.startswith("tensorrt") for d in dists),
    )


def errors(diagnosis_snapshot: Snapshot) -> dict[str, str]:
    return {f.component: f.fix for f in diagnose(diagnosis_snapshot).findings if f.status == ERROR}


def test_cuda_majors_from_metadata() -> None:
    assert torch_cuda_major(TORCH_CU13) == 13
    assert torch_cuda_major(TORCH_CU12) == 12
    assert torch_cuda_major(Distribution("torch", "2.13.0+cpu")) is None
    assert torch_cuda_major(Distribution("torch", "2.9.1+cu126")) == 12
    assert torch_cuda_major(Distribution("torch", "2.9.0+cu130")) == 13
    assert onnxruntime_gpu_cuda_major(ORT_GPU_CU12) == 12
    assert onnxruntime_gpu_cuda_major(ORT_GPU_CU13) == 13
    # NVIDIA's Jetson wheels declare no CUDA packages: the release decides.
    assert onnxruntime_gpu_cuda_major(Distribution("onnxruntime-gpu", "1.20.0")) == 12
    assert onnxruntime_gpu_cuda_major(Distribution("onnxruntime-gpu", "1.27.0")) == 13
    assert tensorrt_cuda_major({"tensorrt-cu12": TRT_CU12})[0] == 12
    meta = Distribution("tensorrt", "11.4.0.106", ("tensorrt_cu13==11.4.0.106",))
    assert tensorrt_cuda_major({"tensorrt": meta})[0] == 13
    jetpack = tensorrt_cuda_major({"tensorrt": Distribution("tensorrt", "10.3.0")})
    assert jetpack[0] is None and "JetPack" in jetpack[1]
    assert parse_nvidia_smi_cuda(
        "| NVIDIA-SMI 550.54.15   Driver Version: 550.54.15   CUDA Version: 12.4 |"
    ) == (12, 4)


def test_a_consistent_cuda13_install_is_ok() -> None:
    diagnosis = diagnose(snapshot(ORT_GPU_CU13, TORCH_CU13, BINDINGS_13, TRT_CU13, driver=(13, 0)))
    assert diagnosis.ok, diagnosis.findings
    assert set(diagnosis.cuda_majors.values()) == {13}
    assert diagnosis.gpu_paths == {"onnxruntime/cuda": "yes", "tensorrt": "yes", "torch/cuda": "yes"}


def test_two_onnx_runtimes_are_an_error_with_the_fix() -> None:
    found = errors(snapshot(ORT_CPU, ORT_GPU_CU13, BINDINGS_13, driver=(13, 0)))
    assert (
        found["onnxruntime"]
        == "pip uninstall -y onnxruntime onnxruntime-gpu && pip install 'reviewkd[cuda13]'"
    )


def test_no_onnx_runtime_names_the_target_for_the_driver() -> None:
    assert errors(snapshot(BINDINGS_12, driver=(12, 4)))["onnxruntime"] == "pip install 'reviewkd[cuda12]'"
    assert errors(snapshot(driver=None))["onnxruntime"] == "pip install 'reviewkd[cpu]'"


def test_a_cuda13_build_on_a_cuda12_driver_is_named() -> None:
    """The faked mismatch of issue 20: PyPI's torch and TensorRT (CUDA 13) on a CUDA 12.4 driver."""
    diagnosis = diagnose(snapshot(ORT_GPU_CU13, TORCH_CU13, BINDINGS_13, TRT_CU13, driver=(12, 4)))
    driver = next(f for f in diagnosis.findings if f.component == "driver")
    assert driver.status == ERROR and "12.4" in driver.detail and "torch 2.14.1 (CUDA 13)" in driver.detail
    assert driver.fix == "update the NVIDIA driver to >= 580.65.06, or pip install 'reviewkd[cuda12]'"
    assert all(v.startswith("no: driver") for v in diagnosis.gpu_paths.values())


def test_mixed_cuda_majors_are_an_error() -> None:
    found = errors(snapshot(ORT_GPU_CU12, TORCH_CU13, BINDINGS_13, driver=(13, 0)))
    assert "cuda" in found and found["cuda"] == "pip install 'reviewkd[cuda13]'"


def test_cuda_python_12_over_cuda_bindings_13_is_named() -> None:
    cuda_python_12 = Distribution("cuda-python", "12.6.2.post1")
    found = errors(snapshot(ORT_GPU_CU13, BINDINGS_13, cuda_python_12, driver=(13, 0)))
    assert found["cuda-bindings"].startswith("pip uninstall -y cuda-python cuda-bindings && ")


def test_a_cpu_install_without_a_driver_is_ok() -> None:
    diagnosis = diagnose(snapshot(ORT_CPU, Distribution("torch", "2.13.0+cpu"), driver=None))
    assert diagnosis.ok
    assert next(f for f in diagnosis.findings if f.component == "driver").status == OK
    assert diagnosis.gpu_paths["onnxruntime/cuda"] == "no: no GPU found"


def test_jetson_advice_keeps_jetpack_packages() -> None:
    fix = errors(snapshot(BINDINGS_12, driver=(12, 6), machine="aarch64"))["onnxruntime"]
    assert "JetPack" in fix and "reviewkd[jetson]" in fix


def test_doctor_runs_here(capsys: pytest.CaptureFixture[str]) -> None:
    from reviewkd.app.cli import main

    code = main(["doctor", "--json"])
    report = json.loads(capsys.readouterr().out)
    assert code == (0 if report["ok"] else 3)
    assert report["findings"][0]["component"] == "onnxruntime"
    assert set(report["gpu_paths"]) == {"onnxruntime/cuda", "tensorrt", "torch/cuda"}
