"""The small contract modules every layer shares: statuses, the format registry, the GPU probe."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

from deploy.formats import (
    ONNX_FORMATS,
    TENSORRT_SOURCES,
    display_order,
    kind_of_file,
    precision_family,
    standard_file,
)
from deploy.gpu import GpuInfo
from deploy.status import Status
from tests.helpers import REPO_ROOT


def test_statuses_are_the_plain_strings_in_json_and_text() -> None:
    assert json.dumps({"status": Status.NOT_MEASURED}) == '{"status": "not measured"}'
    assert f"{Status.SKIPPED}: why" == "skipped: why" and f"{Status.OK:>4}" == "  ok"
    assert Status("failed") is Status.FAILED and Status.OK == "ok"


def test_the_registry_names_export_files_and_what_runs_them() -> None:
    assert standard_file("onnx", "fp32") == "export/student.onnx"
    assert standard_file("onnx", "fp16") == ONNX_FORMATS["fp16"].file == "export/student.fp16.onnx"
    assert standard_file("tensorrt", "int8") == "export/student.int8.plan"
    assert {f.file for f in ONNX_FORMATS.values()} == {
        "export/student.onnx",
        "export/student.fp16.onnx",
        "export/student.int8.onnx",
        "export/student.int8.trt.onnx",
    }
    # Every engine is built from an ONNX format of the same precision.
    assert all(ONNX_FORMATS[source].precision == p for p, source in TENSORRT_SOURCES.items())
    assert kind_of_file("a/b.ENGINE") == "tensorrt" and kind_of_file("x.onnx") == "onnx"
    assert kind_of_file("weights.safetensors") is None
    assert precision_family("int8-trt") == "int8"
    assert sorted(
        ["tensorrt/int8", "onnx/int8", "onnx/fp16", "onnx/fp32"], key=lambda k: display_order(*k.split("/"))
    ) == ["onnx/fp32", "onnx/fp16", "onnx/int8", "tensorrt/int8"]


def test_the_gpu_probe_imports_no_torch_and_finds_no_gpu_here() -> None:
    script = textwrap.dedent(
        """
        import json, sys
        from deploy.gpu import current_gpu
        gpu = current_gpu()
        print(json.dumps({"gpu": None if gpu is None else gpu.as_dict(), "torch": "torch" in sys.modules}))
        """
    )
    out = subprocess.run(
        [sys.executable, "-c", script], cwd=REPO_ROOT, capture_output=True, text=True, check=True, timeout=60
    )
    result = json.loads(out.stdout)
    assert result["torch"] is False
    # This machine has no NVIDIA GPU; where the probe finds one, its record is complete.
    if result["gpu"] is not None:
        assert set(result["gpu"]) == {"name", "compute_capability", "count", "driver"}
    info = GpuInfo("Orin", (8, 7), count=1)
    assert info.cc == "8.7" and info == GpuInfo("Orin", (8, 7))  # count and driver do not compare
