"""Sensitivity-driven mixed precision on a tiny net with one deliberately fragile layer."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import onnx
import pytest
import torch
from torch import nn

from deploy.errors import UsageError
from export.calibration import quantize_calibrated, split_training_images
from export.check import run_onnx
from export.mixed_precision import confirmable, fit_budget, rank_layers, search_float_count
from export.precision import Int8Quantizer
from tests.helpers import export_onnx, sessions_as_if_on_gpu

SHAPE = (3, 8, 8)
SPREAD = 1e-3  # channel 0 of the fragile conv's input is divided by this: a 1000x activation range


NetT = TypeVar("NetT", bound=nn.Module)


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


def _trained_on_quadrants(model: NetT) -> NetT:
    """`model` trained for 100 steps on the quadrant images (seeded), in eval mode."""
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
    return model.eval()


@pytest.fixture(scope="module")
def fragile_onnx(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    model = _trained_on_quadrants(FragileNet())
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
    # The all-int8 file, then k = 1, which met: a lone fragile layer needs no bisection.
    assert [(step.float_count, step.met) for step in search.steps] == [(0, False), (1, True)]
    assert all(step.latency_ms > 0 for step in search.steps)
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
    assert [step["float_layers"] for step in record["steps"]] == [0, 1]
    assert record["latency_ms_batch32"]["written"] == record["steps"][1]["latency_ms_batch32"] > 0


@pytest.mark.parametrize(("flavour", "int8_providers"), [("cpu", ["CPUExecutionProvider"]), ("trt", None)])
def test_the_race_ranking_and_search_run_on_the_device_the_flavour_allows(
    fragile_onnx: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, flavour: str, int8_providers: Any
) -> None:
    """With the device "cuda" (ONNX Runtime made to look as if it had its CUDA provider): the fp32
    reference, the calibration candidates, every layer's file and every search step ask for CUDA,
    except the ONNX Runtime CPU flavour's int8 files, opened on the CPU alone."""
    gpu = ["CUDAExecutionProvider", "CPUExecutionProvider"]
    opened = sessions_as_if_on_gpu(monkeypatch)
    images, labels = _quadrant_images(600, 3)
    pairs = [(images[i : i + 100], labels[i : i + 100]) for i in range(0, 600, 100)]
    data = split_training_images(iter(pairs), 200, 400, seed=None)
    description = quantize_calibrated(
        fragile_onnx, tmp_path / "int8.onnx", data, flavour=flavour, max_top1_drop=0.3, device="cuda"
    )
    record = description["mixed_precision"]
    ranked = len(record["ranking"])
    assert ranked >= 2 and len(record["steps"]) >= 2  # the budget was missed: the search ran
    assert [providers for kind, providers in opened if kind is None] == [gpu]  # the fp32 reference
    int8 = [providers for kind, providers in opened if kind == flavour]
    assert int8 == [int8_providers or gpu] * (3 + ranked + len(record["steps"]))


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


class FragileChain(nn.Module):
    """stem -> (spread -> fragile conv) x FRAGILE_COUNT -> fc: FragileNet's fragile conv, repeated.
    Quantizing these layers costs from nothing to 75 points alone and more together; the search
    needs five of the eight ranked layers in float (the seeded net below)."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.spreads = nn.ModuleList(ChannelSpread(8) for _ in range(FRAGILE_COUNT))
        self.fragiles = nn.ModuleList(nn.Conv2d(8, 8, 3, padding=1) for _ in range(FRAGILE_COUNT))
        self.fc = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.stem(x))
        for spread, fragile in zip(self.spreads, self.fragiles, strict=True):
            x = torch.relu(fragile(spread(x)))
        return self.fc(x.mean((2, 3)))


FRAGILE_COUNT = 6


@pytest.fixture(scope="module")
def chain_onnx(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    model = _trained_on_quadrants(FragileChain())
    with torch.no_grad():
        for spread, fragile in zip(model.spreads, model.fragiles, strict=True):
            spread.divisor[0, 0] = SPREAD
            fragile.weight[:, 0] *= SPREAD
    return export_onnx(model, tmp_path_factory.mktemp("chain") / "fp32.onnx", SHAPE)


def _judged_files(quantizer: Int8Quantizer, monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The float layer counts of the files the search writes to judge, in order, seen at the
    quantizer (not in the search's own record)."""
    written: list[int] = []
    write = quantizer.write

    def counting_write(path: Path, **options: Any) -> dict[str, Any]:
        if Path(path).name.startswith("float"):
            written.append(len(options.get("exclude_nodes") or []))
        return write(path, **options)

    monkeypatch.setattr(quantizer, "write", counting_write)
    return written


def test_the_search_gallops_then_bisects_and_judges_no_file_twice(
    chain_onnx: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Judged: all int8, then k = 1, 2, 4 (not met), 8 (all ranked layers: met), then the bisection's
    6 and 5 (met); 5 is written, with 4 judged and not met. One more at a time judged 0 to 5."""
    images, labels = _held_out()
    reference = run_onnx(chain_onnx, images)
    assert np.mean(reference.argmax(1) == labels) > 0.95
    with Int8Quantizer(chain_onnx, [_quadrant_images(64, 1)[0]], flavour="cpu") as quantizer:
        judged = _judged_files(quantizer, monkeypatch)
        description, search = fit_budget(quantizer, chain_onnx, tmp_path / "mixed.onnx", images, labels)
    assert len(search.ranking) == 8
    assert judged == [step.float_count for step in search.steps] == [0, 1, 2, 4, 8, 6, 5]
    assert [step.met for step in search.steps] == [False, False, False, False, True, True, True]
    assert search.met and search.float_layers == search.ranking[:5] and search.drop <= 0.3
    assert sorted(description["float_nodes"]) == sorted(layer.node for layer in search.ranking[:5])
    assert search.written == search.steps[-1].judgement


def test_the_record_lists_every_judged_file_in_the_order_judged(chain_onnx: Path, tmp_path: Path) -> None:
    images, labels = _held_out()
    with Int8Quantizer(chain_onnx, [_quadrant_images(64, 1)[0]], flavour="cpu") as quantizer:
        description, search = fit_budget(quantizer, chain_onnx, tmp_path / "mixed.onnx", images, labels)
    record = json.loads(json.dumps(description["mixed_precision"]))  # as the manifest holds it
    assert record == json.loads(json.dumps(search.as_dict()))
    steps = record["steps"]
    assert [step["float_layers"] for step in steps] == [step.float_count for step in search.steps]
    for step, judged in zip(steps, search.steps, strict=True):
        assert step == {
            **judged.judgement.as_dict(),
            "float_layers": judged.float_count,
            "met": judged.met,
            "latency_ms_batch32": judged.latency_ms,
        }
        assert step["latency_ms_batch32"] > 0 and step["images"] == 400
    all_int8 = record["held_out"]["all_int8"]
    assert all_int8 == {key: steps[0][key] for key in all_int8} and steps[0]["float_layers"] == 0
    written = next(step for step in steps if step["float_layers"] == len(record["float_layers"]))
    assert written["met"] and record["latency_ms_batch32"] == {
        "all_int8": steps[0]["latency_ms_batch32"],
        "written": written["latency_ms_batch32"],
    }
    assert [layer["node"] for layer in record["float_layers"]] == [layer.node for layer in search.ranking[:5]]
    assert all("latency_ms_batch32" not in layer for layer in record["float_layers"])


def test_when_no_count_meets_every_ranked_layer_stays_in_float_and_met_is_false(
    chain_onnx: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Against a reference no file can match (it is right on every image, and a tenth of the labels
    are changed so that the net is not), the search gallops to every ranked layer, judges no more,
    and writes that file with met=False."""
    images, labels = _held_out()
    changed = labels.copy()
    changed[::10] = (changed[::10] + 1) % 4
    perfect = np.eye(4, dtype=np.float32)[changed] * 10
    with Int8Quantizer(chain_onnx, [_quadrant_images(64, 1)[0]], flavour="cpu") as quantizer:
        judged = _judged_files(quantizer, monkeypatch)
        description, search = fit_budget(
            quantizer, chain_onnx, tmp_path / "mixed.onnx", images, changed, reference=perfect
        )
    assert judged == [step.float_count for step in search.steps] == [0, 1, 2, 4, 8]
    assert not search.met and not any(step.met for step in search.steps) and search.drop > 5
    assert search.float_layers == search.ranking and len(description["float_nodes"]) == 8
    assert description["mixed_precision"]["met"] is False


@pytest.mark.parametrize(
    ("meets", "ranked", "asked", "answer"),
    [
        (lambda k: k >= 86, 100, [1, 2, 4, 8, 16, 32, 64, 100, 82, 91, 86, 84, 85], 86),
        (lambda k: k >= 1, 100, [1], 1),
        (lambda k: k >= 3, 3, [1, 2, 3], 3),
        (lambda k: False, 5, [1, 2, 4, 5], None),
        # Not monotone: 3 meets, but the gallop passes it and the bisection between 4 and 8 never
        # returns to it; 8 is written, met, with 7 judged and not met.
        (lambda k: k == 3 or k >= 8, 10, [1, 2, 4, 8, 6, 7], 8),
    ],
)
def test_search_float_count_gallops_bisects_and_asks_once(
    meets: Callable[[int], bool], ranked: int, asked: list[int], answer: int | None
) -> None:
    calls: list[int] = []

    def meets_with(count: int) -> bool:
        calls.append(count)
        return meets(count)

    assert search_float_count(meets_with, ranked) == answer
    assert calls == asked and len(set(calls)) == len(calls)
