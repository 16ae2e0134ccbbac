"""Sensitivity-driven mixed precision on a tiny net with one deliberately fragile layer."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from torch import nn

from deploy.errors import UsageError
from export.calibration import quantize_calibrated, split_training_images
from export.check import run_onnx
from export.mixed_precision import confirmable, fit_budget, rank_layers
from export.precision import Int8Quantizer
from tests.helpers import export_onnx

SHAPE = (3, 8, 8)
SPREAD = 1e-3  # channel 0 of the fragile conv's input is divided by this: a 1000x activation range


def _quadrant_images(count: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Four classes: a bright quadrant (which one is the class) on noise."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 4, count)
    images = (rng.standard_normal((count, *SHAPE)) * 0.5).astype(np.float32)
    for i, label in enumerate(labels):
        row, col = divmod(int(label), 2)
        images[i, :, row * 4 : row * 4 + 4, col * 4 : col * 4 + 4] += 1.0
    return images, labels


class ChannelSpread(nn.Module):
    """Divides each channel by a constant: ONNX Div, an op ONNX Runtime does not quantize."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.register_buffer("divisor", torch.ones(1, channels, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x / self.divisor


class FragileNet(nn.Module):
    """stem -> spread -> fragile -> head -> fc. The spread blows channel 0 of the fragile conv's input
    up 1000x and the fragile conv's weights on it shrink 1000x: the same function in fp32, but a
    per-tensor int8 scale for that input leaves every other channel a step or two."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.spread = ChannelSpread(8)
        self.fragile = nn.Conv2d(8, 8, 3, padding=1)
        self.head = nn.Conv2d(8, 8, 3, padding=1)
        self.fc = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.spread(torch.relu(self.stem(x)))
        x = torch.relu(self.head(torch.relu(self.fragile(x))))
        return self.fc(x.mean((2, 3)))


@pytest.fixture(scope="module")
def fragile_onnx(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    model = FragileNet()
    images, labels = _quadrant_images(2000, 0)
    optimizer = torch.optim.Adam(model.parameters(), 2e-2)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a net this small trains 50x slower when two threads contend
    for step in range(100):
        pick = np.random.default_rng(step).integers(0, len(images), 32)
        loss = nn.functional.cross_entropy(
            model(torch.from_numpy(images[pick])), torch.from_numpy(labels[pick])
        )
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    torch.set_num_threads(threads)
    model.eval()
    with torch.no_grad():
        model.spread.divisor[0, 0] = SPREAD
        model.fragile.weight[:, 0] *= SPREAD
    return export_onnx(model, tmp_path_factory.mktemp("fragile") / "fp32.onnx", SHAPE)


def _held_out() -> tuple[list[np.ndarray], np.ndarray]:
    images, labels = _quadrant_images(400, 2)
    return [images[:200], images[200:]], labels


@pytest.mark.parametrize("flavour", ["cpu", "trt"])
def test_ranking_names_the_fragile_layer_and_keeps_only_it_in_float(
    fragile_onnx: Path, tmp_path: Path, flavour: str
) -> None:
    images, labels = _held_out()
    reference = run_onnx(fragile_onnx, images)
    assert np.mean(reference.argmax(1) == labels) > 0.95  # a real classifier to lose accuracy from
    calibration = [_quadrant_images(64, 1)[0]]
    with Int8Quantizer(fragile_onnx, calibration, flavour=flavour) as quantizer:
        ranking = rank_layers(quantizer, images, labels, reference, tmp_path)
        assert ranking[0].module == "fragile" and ranking[0].top1_cost > 20
        assert all(layer.top1_cost < 2 for layer in ranking[1:])
        description, search = fit_budget(quantizer, fragile_onnx, tmp_path / "mixed.onnx", images, labels)
    assert search.full_int8_drop > 20 and search.met and search.drop <= 0.3
    assert [layer.module for layer in search.float_layers] == ["fragile"]
    assert description["float_nodes"] == ["/fragile/Conv"]
    # fp16 for TensorRT, fp32 for ONNX Runtime, as the flavour says.
    float_type = {"cpu": onnx.TensorProto.FLOAT, "trt": onnx.TensorProto.FLOAT16}[flavour]
    assert description["float_precision"] == {"cpu": "fp32", "trt": "fp16"}[flavour]
    assert len(search.latency_ms) == 2 and all(ms > 0 for ms in search.latency_ms)
    graph = onnx.load(str(tmp_path / "mixed.onnx")).graph
    quantized_inputs = {n.output[0] for n in graph.node if n.op_type == "DequantizeLinear"}
    fragile = next(n for n in graph.node if n.name == "/fragile/Conv")
    assert not set(fragile.input) & quantized_inputs  # float in, float weights
    weights = {i.name: i.data_type for i in graph.initializer}
    assert [weights[name] for name in fragile.input[1:]] == [float_type, float_type]
    cast_to = {n.output[0]: n.attribute[0].i for n in graph.node if n.op_type == "Cast"}
    if flavour == "trt":  # a Cast to fp16 in, a Cast back to fp32 for the int8 layer that reads it
        assert cast_to[fragile.input[0]] == onnx.TensorProto.FLOAT16
        assert [cast_to[n.output[0]] for n in graph.node if fragile.output[0] in n.input] == [
            onnx.TensorProto.FLOAT
        ]
    else:
        assert not cast_to
    head = next(n for n in graph.node if n.name == "/head/Conv")
    assert set(head.input) & quantized_inputs  # the rest stays int8
    mixed = run_onnx(tmp_path / "mixed.onnx", images)
    assert np.mean(mixed.argmax(1) == labels) >= np.mean(reference.argmax(1) == labels) - 0.003


def test_export_keeps_the_fragile_layer_in_float_and_records_why(fragile_onnx: Path, tmp_path: Path) -> None:
    images, labels = _quadrant_images(600, 3)
    pairs = [(images[i : i + 100], labels[i : i + 100]) for i in range(0, 600, 100)]
    data = split_training_images(iter(pairs), 200, 400, seed=None)
    description = quantize_calibrated(
        fragile_onnx, tmp_path / "int8.onnx", data, flavour="trt", method="minmax", max_top1_drop=0.3
    )
    record = description["mixed_precision"]
    assert record["met"] and [layer["module"] for layer in record["float_layers"]] == ["fragile"]
    assert record["held_out_drop_points"]["all_int8"] > 20
    assert "latency_ms_batch32" in record["float_layers"][0]


def test_a_good_file_stays_all_int8_and_bad_budgets_are_usage_errors(
    fragile_onnx: Path, tmp_path: Path
) -> None:
    images, labels = _held_out()
    with Int8Quantizer(fragile_onnx, [_quadrant_images(64, 1)[0]], flavour="cpu") as quantizer:
        _, search = fit_budget(quantizer, fragile_onnx, tmp_path / "loose.onnx", images, labels, budget=100.0)
        assert search.float_layers == [] and search.ranking == []
        with pytest.raises(UsageError, match="max-top1-drop-int8"):
            fit_budget(quantizer, fragile_onnx, tmp_path / "bad.onnx", images, labels, budget=-1.0)


def test_the_budget_is_confirmed_on_the_interval_not_the_point_estimate(
    fragile_onnx: Path, tmp_path: Path
) -> None:
    """A budget the all-int8 file meets on its point estimate, but which its interval cannot
    confirm, keeps the fragile layer in float; the written file is confirmed within the budget."""
    images, labels = _quadrant_images(2000, 4)
    batches = [images[i : i + 100] for i in range(0, 2000, 100)]
    assert confirmable(2000, 1.0) and not confirmable(400, 1.0) and not confirmable(2000, 0.3)
    with Int8Quantizer(fragile_onnx, [_quadrant_images(64, 1)[0]], flavour="cpu") as quantizer:
        _, loose = fit_budget(quantizer, fragile_onnx, tmp_path / "loose.onnx", batches, labels, budget=100.0)
        assert loose.decided_by == "interval" and loose.float_layers == []
        point = loose.full_int8_drop
        low, high = loose.full_int8.as_dict()["interval_points"]
        budget = point + 0.25 * (high - point)  # above the point estimate, inside the interval
        assert point > 20 and low < budget < high
        mixed = tmp_path / "mixed.onnx"
        _, search = fit_budget(quantizer, fragile_onnx, mixed, batches, labels, budget=budget)
    assert search.full_int8.verdict.status == "inconclusive"
    assert [layer.module for layer in search.float_layers] == ["fragile"] and search.met
    record = search.as_dict()
    assert record["decided_by"] == "interval"
    written = record["held_out"]["written"]
    assert written["verdict"] == "ok" and written["interval_points"][1] <= budget
    assert written["images"] <= 2000 and record["held_out"]["all_int8"]["images"] == 2000


def test_too_few_held_out_images_fall_back_to_the_point_estimate_and_say_so(
    fragile_onnx: Path, tmp_path: Path
) -> None:
    images, labels = _held_out()  # 400 images: a typical file's interval is wider than 0.3 points
    with Int8Quantizer(fragile_onnx, [_quadrant_images(64, 1)[0]], flavour="cpu") as quantizer:
        _, search = fit_budget(quantizer, fragile_onnx, tmp_path / "mixed.onnx", images, labels)
    assert search.decided_by.startswith("point estimate: 400 held-out images cannot confirm")
    assert search.met and search.drop <= 0.3
