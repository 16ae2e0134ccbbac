"""Where export computes (`--check-device`): the choice, its record, and the one file kind that never
leaves the CPU. The CUDA sessions themselves need a GPU (benchmarks/scripts/gpu_first_contact.py
runs them); here the choice is made with ONNX Runtime's real CPU provider and, where a GPU would be
needed, with the providers a session is opened with recorded instead of loaded."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from deploy.errors import MissingDependencyError, UsageError
from deploy.run_lock import LOCK_NAME
from deploy.runners import onnxruntime_runner
from deploy.runners.onnxruntime_runner import (
    CPU_PROVIDER,
    CUDA_PROVIDER,
    UNFUSED_QDQ_KEY,
    open_session_on,
    runs_integer_kernels,
)
from export import check
from export.check import CPU_CHECKS, CheckDevice, onnxruntime_cuda_missing, resolve_check_device
from reviewkd.app.cli import main
from reviewkd.runtime import exact_fp32, torch_cuda_missing
from tests.helpers import (
    DETECTION_CLASSES,
    DETECTION_INPUT_SHAPE,
    add_int8_files,
    make_detection_run,
    make_run,
)

NO_TORCH_GPU = "torch sees no CUDA GPU (test)"


def _both_usable() -> bool:
    return torch.cuda.is_available() and onnxruntime_cuda_missing() is None


def test_cpu_asks_nothing_of_the_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    def probe() -> str | None:
        raise AssertionError("--check-device cpu probed a CUDA GPU")

    monkeypatch.setattr(check, "onnxruntime_cuda_missing", probe)
    assert resolve_check_device("cpu", probe) == CPU_CHECKS
    assert CPU_CHECKS.describe() == {"torch": "cpu", "onnxruntime": "cpu", "notes": []}


def test_auto_puts_each_side_where_it_can_run_and_says_why_not(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(check, "onnxruntime_cuda_missing", lambda: "no onnxruntime-gpu (test)")
    device = resolve_check_device("auto", lambda: None)
    assert (device.torch, device.onnxruntime) == ("cuda", "cpu")
    assert device.notes == ("ONNX Runtime on the CPU: no onnxruntime-gpu (test)",)
    monkeypatch.setattr(check, "onnxruntime_cuda_missing", lambda: None)
    assert resolve_check_device("auto", lambda: NO_TORCH_GPU) == CheckDevice(
        "cpu", "cuda", (f"PyTorch on the CPU: {NO_TORCH_GPU}",)
    )
    assert resolve_check_device("auto", lambda: None) == CheckDevice("cuda", "cuda")


def test_cuda_that_cannot_run_is_a_missing_dependency_naming_both_sides(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(check, "onnxruntime_cuda_missing", lambda: "no onnxruntime-gpu (test)")
    with pytest.raises(MissingDependencyError) as raised:
        resolve_check_device("cuda", lambda: NO_TORCH_GPU)
    message = str(raised.value)
    assert message.startswith("--check-device cuda: PyTorch: torch sees no CUDA GPU (test); ONNX Runtime: no")
    assert message.endswith("use --check-device cpu or auto")
    with pytest.raises(MissingDependencyError, match="ONNX Runtime: no onnxruntime-gpu"):
        resolve_check_device("cuda", lambda: None)  # PyTorch alone on the GPU is not what cuda asks for


def test_an_unknown_device_is_a_usage_error() -> None:
    with pytest.raises(UsageError, match=r"--check-device 'gpu': expected one of auto, cpu, cuda"):
        resolve_check_device("gpu", lambda: None)


@pytest.mark.skipif(_both_usable(), reason="PyTorch and ONNX Runtime can both use a CUDA GPU here")
def test_auto_on_this_machine_says_what_kept_it_on_the_cpu() -> None:
    torch_missing = None if torch.cuda.is_available() else NO_TORCH_GPU
    device = resolve_check_device("auto", lambda: torch_missing)
    assert device.onnxruntime == "cpu"
    reason = onnxruntime_cuda_missing()
    assert reason is not None and f"ONNX Runtime on the CPU: {reason}" in device.notes


def test_the_cuda_probe_model_loads_where_the_provider_is_asked_for(monkeypatch: pytest.MonkeyPatch) -> None:
    """The probe's one-operator model is valid for ONNX Runtime: with the provider list swapped for the
    CPU's (no GPU here), the probe loads it and finds nothing missing; without a GPU it says so."""
    monkeypatch.setattr(check, "available_providers", lambda: [CUDA_PROVIDER, CPU_PROVIDER])
    monkeypatch.setattr(check, "current_gpu", lambda: None)
    assert onnxruntime_cuda_missing() == "onnxruntime lists its CUDA provider, but no NVIDIA GPU was found"
    monkeypatch.setattr(check, "current_gpu", lambda: object())
    monkeypatch.setattr(check, "providers_for_device", lambda device: [CPU_PROVIDER])
    assert onnxruntime_cuda_missing() is None
    # A provider asked for that does not load is the reason, as open_session would raise it.
    monkeypatch.setattr(check, "providers_for_device", lambda device: [CUDA_PROVIDER, CPU_PROVIDER])
    reason = onnxruntime_cuda_missing()
    assert reason is not None and reason.startswith("onnxruntime's CUDA provider does not load: it needs")


@pytest.mark.parametrize(
    ("manifest", "integer"),
    [
        (None, False),
        ({}, False),
        ({"precision": "fp32"}, False),
        ({"int8": {"flavour": "cpu", UNFUSED_QDQ_KEY: False}}, True),
        ({"int8": {"flavour": "cpu"}}, True),
        ({"int8": {"flavour": "trt", UNFUSED_QDQ_KEY: True}}, False),
    ],
)
def test_only_a_fused_int8_file_runs_integer_kernels(manifest: dict[str, Any] | None, integer: bool) -> None:
    assert runs_integer_kernels(manifest) is integer


def test_on_cuda_the_cpu_int8_flavour_alone_is_reopened_on_the_cpu(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each of export's real files opened on "cuda": every session asks for CUDA first, and only the
    ONNX Runtime CPU int8 flavour is opened again on the CPU alone. The sessions are recorded, not
    loaded, since no GPU is here."""
    run, _ = make_run(tmp_path)
    files = {"fp32": "export/student.onnx", **add_int8_files(run)}
    opened: list[tuple[str, list[str]]] = []
    real_open = onnxruntime_runner.open_session

    def record(path: Any, providers: list[str], **options: Any) -> Any:
        opened.append((Path(path).name, providers))
        return real_open(path, [CPU_PROVIDER], **options)  # the file's own embedded manifest

    monkeypatch.setattr(onnxruntime_runner, "open_session", record)
    monkeypatch.setattr(onnxruntime_runner, "available_providers", lambda: [CUDA_PROVIDER, CPU_PROVIDER])
    for rel in files.values():
        open_session_on(run / rel, "cuda")
    gpu = [CUDA_PROVIDER, CPU_PROVIDER]
    assert opened == [
        ("student.onnx", gpu),
        ("student.int8.onnx", gpu),
        ("student.int8.onnx", [CPU_PROVIDER]),
        ("student.int8.trt.onnx", gpu),
    ]
    opened.clear()
    for rel in files.values():
        open_session_on(run / rel, "cpu")
    assert [providers for _, providers in opened] == [[CPU_PROVIDER]] * 3


def test_cuda_without_the_provider_is_a_missing_dependency(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    run, _ = make_run(tmp_path)
    monkeypatch.setattr(onnxruntime_runner, "available_providers", lambda: [CPU_PROVIDER])
    with pytest.raises(MissingDependencyError, match="onnxruntime has no CUDA execution provider"):
        open_session_on(run / "export/student.onnx", "cuda")


def test_a_detection_scorer_runs_its_files_on_its_device(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A detector's checks and held-out scores go through DetectionScorer: its device reaches the
    session (here "cuda" without the provider is refused, where "cpu" detects)."""
    from export.detection_pipeline import DetectionScorer

    run = make_detection_run(tmp_path)
    monkeypatch.setattr(onnxruntime_runner, "available_providers", lambda: [CPU_PROVIDER])
    scorers = {
        device: DetectionScorer([], (1, 1), 1, len(DETECTION_CLASSES), device) for device in ("cpu", "cuda")
    }
    for scorer in scorers.values():
        scorer.batches = [np.random.default_rng(0).random((2, *DETECTION_INPUT_SHAPE), dtype=np.float32)]
    assert len(scorers["cpu"].detect(run / "export/student.onnx")) == 2
    with pytest.raises(MissingDependencyError, match="no CUDA execution provider"):
        scorers["cuda"].detect(run / "export/student.onnx")


@pytest.mark.skipif(_both_usable(), reason="PyTorch and ONNX Runtime can both use a CUDA GPU here")
def test_export_check_device_cuda_here_exits_3_before_writing(tmp_path: Path) -> None:
    run, _ = make_run(tmp_path)
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    assert main(["export", str(run), "--formats", "onnx", "--check-device", "cuda"]) == 3
    after = {p: p.read_bytes() for p in run.rglob("*") if p.is_file() and p.name != LOCK_NAME}
    assert after == before


@pytest.mark.skipif(_both_usable(), reason="PyTorch and ONNX Runtime can both use a CUDA GPU here")
def test_export_model_check_device_cuda_here_exits_3_before_laying_out(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    from reviewkd.models import create_model

    weights = tmp_path / "w.safetensors"
    save_file(create_model("cifar_resnet20", 10).state_dict(), str(weights))
    out = tmp_path / "out"
    shape = ["--input-shape", "3,8,8", "--out", str(out), "--check-device", "cuda"]
    assert main(["export", "--model", "cifar_resnet20", "--weights", str(weights), *shape]) == 3
    assert not out.exists()


def test_without_onnxruntime_auto_stays_on_the_cpu_and_says_why(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(check, "installed", lambda module: module != "onnxruntime")
    assert onnxruntime_cuda_missing() == "onnxruntime is not installed"
    device = resolve_check_device("auto", lambda: NO_TORCH_GPU)
    assert (
        device.onnxruntime == "cpu"
        and "ONNX Runtime on the CPU: onnxruntime is not installed" in device.notes
    )


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the answer without a CUDA GPU")
def test_torch_without_a_gpu_says_so() -> None:
    assert torch_cuda_missing() == f"torch {torch.__version__} sees no CUDA GPU"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU for torch")
def test_torch_computes_on_its_gpu_and_the_reference_matches_the_cpus() -> None:
    """On a CUDA GPU: the probe computes, and the classifier reference on it (TF32 off) is within the
    fp32 gate of the CPU's."""
    from export.pipeline import torch_logits
    from reviewkd.models import create_model

    assert torch_cuda_missing() is None
    model = create_model("cifar_resnet20", 10).eval()
    batches = [np.random.default_rng(0).standard_normal((16, 3, 32, 32), dtype=np.float32)]
    on_gpu, on_cpu = torch_logits(model, batches, "cuda"), torch_logits(model, batches, "cpu")
    assert float(np.abs(on_gpu - on_cpu).max()) <= 1e-4
    assert next(model.parameters()).device.type == "cpu"  # the model itself was not moved


def test_exact_fp32_turns_tf32_off_inside_and_restores_it_after_an_error() -> None:
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = True
    try:
        with pytest.raises(RuntimeError, match="inside"), exact_fp32():
            assert not torch.backends.cudnn.allow_tf32 and not torch.backends.cuda.matmul.allow_tf32
            raise RuntimeError("inside")
        assert torch.backends.cudnn.allow_tf32 and torch.backends.cuda.matmul.allow_tf32
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved
