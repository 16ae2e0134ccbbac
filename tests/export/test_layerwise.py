"""Layer-wise parity: every layer compared in graph order, named by its PyTorch module path."""

from __future__ import annotations

import json
import re
from collections import OrderedDict
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from torch import nn

from deploy.errors import UsageError
from export.layerwise import compare_layers, write_report
from export.onnx_export import TOP_LEVEL, export_fp32, module_path
from export.precision import quantize_int8
from reviewkd.app.cli import main

SHAPE = (3, 8, 8)


class Nested(nn.Module):
    """Modules two levels deep, as a real student has them."""

    def __init__(self) -> None:
        super().__init__()
        block = OrderedDict(conv=nn.Conv2d(8, 8, 3, padding=1), act=nn.ReLU())
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.layer1 = nn.Sequential(nn.Sequential(block), nn.Sequential(OrderedDict(conv=nn.Conv2d(8, 8, 1))))
        self.fc = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.layer1(torch.relu(self.stem(x))).mean((2, 3)))


@pytest.mark.parametrize(
    ("name", "path"),
    [
        ("/layer1/layer1.0/conv1/Conv", "layer1.0.conv1"),
        ("/layer1/layer1.0/Add", "layer1.0"),
        ("/conv1/Conv", "conv1"),
        ("/fc/Gemm", "fc"),
        ("node_Reshape_2", TOP_LEVEL),
        ("/features/features.3/block/block.0/block.0.0/Conv", "features.3.block.0.0"),
        # the second call of a module shared over FPN levels keeps the exporter's call suffix
        ("/head/classification_head/conv/conv.4_1/Conv", "head.classification_head.conv.4_1"),
    ],
)
def test_module_path_from_exporter_scopes(name: str, path: str) -> None:
    assert module_path(name) == path


def test_report_names_module_paths_and_marks_the_jump(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = Nested().eval()
    fp32 = tmp_path / "fp32.onnx"
    export_fp32(model, fp32, SHAPE, {})
    images = np.random.default_rng(0).standard_normal((32, *SHAPE)).astype(np.float32)
    int8 = tmp_path / "int8.onnx"
    quantize_int8(fp32, int8, [images[:16]], flavour="trt")
    report = compare_layers(fp32, int8, images)
    modules = [layer.module for layer in report.layers]
    assert {"stem", "layer1.0.conv", "layer1.1.conv", "fc"} <= set(modules)
    assert [layer.index for layer in report.layers] == sorted(layer.index for layer in report.layers)
    assert all(0.9 < layer.cosine <= 1.0 + 1e-9 and layer.rel_l2 > 0 for layer in report.layers)
    worst = report.worst_jump
    assert worst is not None and worst.jump == max(layer.jump for layer in report.layers)
    paths = write_report(report, tmp_path / "report", "int8-trt", "onnxruntime/int8-trt")
    text = paths["md"].read_text()
    assert "| layer1.0.conv |" in text and "**<- jump**" in text and f"**{worst.module}**" in text
    assert paths["png"].read_bytes()[:4] == b"\x89PNG"
    assert json.loads(paths["json"].read_text())["jump"]["module"] == worst.module
    identical = compare_layers(fp32, fp32, images)
    assert all(layer.rel_l2 == 0.0 and layer.cosine == pytest.approx(1.0) for layer in identical.layers)


def test_unrelated_files_and_bad_formats_are_usage_errors(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from tests.helpers import tiny_net

    a, b = tmp_path / "a.onnx", tmp_path / "b.onnx"
    export_fp32(Nested().eval(), a, SHAPE, {})
    export_fp32(tiny_net(in_channels=3).eval(), b, SHAPE, {})
    with pytest.raises(UsageError):
        compare_layers(a, b, np.zeros((2, *SHAPE), np.float32))
    assert main(["layerwise", str(tmp_path), "--format", "onnxruntime/int4"]) == 2
    assert "--format onnxruntime/int4: expected one of" in capsys.readouterr().err


def test_the_run_report_shows_the_layerwise_table_and_plot(tmp_path: Path) -> None:
    from benchmarks.report.writer import write_report as write_run_report
    from export.layerwise import LAYERWISE_PREFIX
    from tests.helpers import INPUT_SHAPE, make_run

    run, _ = make_run(tmp_path)
    fp32 = run / "export" / "student.onnx"
    images = np.random.default_rng(1).standard_normal((16, *INPUT_SHAPE)).astype(np.float32)
    int8 = tmp_path / "int8.onnx"
    quantize_int8(fp32, int8, [images], flavour="cpu")
    report = compare_layers(fp32, int8, images)
    write_report(report, run / "report", LAYERWISE_PREFIX + "int8", "onnxruntime/int8")
    written = write_run_report(run)
    assert written["layerwise"]["int8"]["jump"]["module"] == report.worst_jump.module  # type: ignore[union-attr]
    markdown = (run / "report" / "report.md").read_text()
    assert "## Layer-wise parity (reviewkd layerwise)" in markdown
    assert f"| onnxruntime/int8 | {report.worst_jump.module}" in markdown  # type: ignore[union-attr]
    assert "![Layer-wise parity: onnxruntime/int8](layerwise_int8.png)" in markdown
    assert "data:image/png;base64" in (run / "report" / "report.html").read_text()


def test_the_comparison_stops_at_the_end_outputs(tmp_path: Path) -> None:
    torch.manual_seed(0)
    fp32 = tmp_path / "fp32.onnx"
    export_fp32(Nested().eval(), fp32, SHAPE, {})
    images = np.random.default_rng(0).standard_normal((8, *SHAPE)).astype(np.float32)
    int8 = tmp_path / "int8.onnx"
    quantize_int8(fp32, int8, [images], flavour="trt")
    whole = compare_layers(fp32, int8, images)
    model = onnx.load(str(fp32))
    stem = next(node.output[0] for node in model.graph.node if module_path(node.name) == "stem")
    cut = compare_layers(fp32, int8, images, end_outputs=(stem,))
    # only the stem and what feeds it: nothing after the end output is compared
    assert [layer.module for layer in cut.layers] == ["stem"] and cut.layers == whole.layers[:1]
    assert list(cut.end_outputs) == [stem] and list(whole.end_outputs) == ["logits"]
    error = cut.end_outputs[stem]
    assert error.marked_rel_l2 == pytest.approx(cut.layers[0].rel_l2) and error.deployed_rel_l2 > 0
    with pytest.raises(UsageError, match="no node makes no_such_tensor"):
        compare_layers(fp32, int8, images, end_outputs=("no_such_tensor",))


def test_a_report_written_before_end_outputs_still_shows_its_logits(tmp_path: Path) -> None:
    from benchmarks.report.writer import write_report as write_run_report
    from tests.helpers import make_run

    run, _ = make_run(tmp_path)
    earlier = {
        "images": 16,
        "jump": {
            "module": "layer1.0.conv1",
            "node": "/layer1/layer1.0/conv1/Conv",
            "rel_l2": 0.5,
            "jump": 0.25,
        },
        "marked_logits_rel_l2": 0.0123,
        "deployed_logits_rel_l2": 0.0456,
        "layers": [],
    }
    (run / "report").mkdir(exist_ok=True)
    (run / "report" / "layerwise_int8.json").write_text(json.dumps(earlier))
    written = write_run_report(run)
    assert written["layerwise"]["int8"]["end_outputs"] == {
        "logits": {"marked_rel_l2": 0.0123, "deployed_rel_l2": 0.0456}
    }
    # the table's columns are padded to a common width: compare with single spaces
    markdown = re.sub(r" +", " ", (run / "report" / "report.md").read_text())
    row = (
        "| onnxruntime/int8 | layer1.0.conv1 | /layer1/layer1.0/conv1/Conv | 0.5000 | 0.2500"
        " | 0.0123 | 0.0456 |"
    )
    assert row in markdown
