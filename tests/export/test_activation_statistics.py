"""One pass of calibration statistics computes what ORT's three calibrators compute in three passes."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from export.precision import (
    CALIBRATION_METHODS,
    CALIBRATOR_OPTIONS,
    ActivationStatistics,
    ArrayCalibrationReader,
    Int8Quantizer,
    entropy_threshold,
)
from tests.helpers import INPUT_SHAPE, export_onnx, tiny_net


def _batches() -> list[np.ndarray]:
    """Batches whose scale grows, so that ORT's histograms widen and merge between batches."""
    rng = np.random.default_rng(3)
    return [(1 + i / 2) * rng.standard_normal((8, *INPUT_SHAPE)).astype(np.float32) for i in range(3)]


def _one_method_pass(
    prepared: Path, batches: list[np.ndarray], method: str, symmetric: bool, tmp: Path
) -> Any:
    """The three-pass way: ORT's calibrator of `method` runs the model over the images itself, one
    batch at a time, as export did before the statistics were shared."""
    from onnxruntime.quantization.calibrate import CalibrationMethod, TensorsData, create_calibrator

    ort_method = {
        "minmax": CalibrationMethod.MinMax,
        "entropy": CalibrationMethod.Entropy,
        "percentile": CalibrationMethod.Percentile,
    }[method]
    calibrator = create_calibrator(
        prepared,
        augmented_model_path=str(tmp / f"augmented.{method}.{symmetric}.onnx"),
        calibrate_method=ort_method,
        extra_options={**CALIBRATOR_OPTIONS[method], "symmetric": symmetric},
    )
    for batch in batches:
        calibrator.collect_data(ArrayCalibrationReader([batch]))
    if method != "entropy":
        return calibrator.compute_data()
    bins = CALIBRATOR_OPTIONS["entropy"]["num_quantized_bins"]
    return TensorsData(
        ort_method,
        {
            name: (*entropy_threshold(histogram, bins), *histogram[:2])
            for name, histogram in calibrator.collector.histogram_dict.items()
        },
    )


class _ThreePassStatistics(ActivationStatistics):
    """ActivationStatistics whose ranges come from one ORT calibrator pass per method."""

    def ranges(self, method: str, symmetric: bool) -> Any:
        return _one_method_pass(self.prepared, self.calibration, method, symmetric, Path(self._tmp.name))


def test_every_methods_ranges_equal_its_own_calibrator_pass(tmp_path: Path) -> None:
    fp32 = export_onnx(tiny_net(), tmp_path / "fp32.onnx")
    batches = _batches()
    with ActivationStatistics(fp32, batches) as statistics:
        for method in CALIBRATION_METHODS:
            for symmetric in (False, True):  # from one statistics object: what is shared must not leak
                shared = statistics.ranges(method, symmetric)
                alone = _one_method_pass(statistics.prepared, batches, method, symmetric, tmp_path)
                assert shared.calibration_method == alone.calibration_method
                assert set(shared.keys()) == set(alone.keys()) and len(alone.keys()) > 5
                for name in alone:
                    for ours, theirs in zip(shared[name].range_value, alone[name].range_value, strict=True):
                        assert np.asarray(ours).dtype == np.asarray(theirs).dtype, (method, name)
                        assert np.array_equal(ours, theirs), (method, symmetric, name, ours, theirs)


@pytest.mark.parametrize("flavour", ["cpu", "trt"])
def test_the_int8_files_equal_the_three_pass_ones(tmp_path: Path, flavour: str) -> None:
    fp32 = export_onnx(tiny_net(), tmp_path / "fp32.onnx")
    batches = _batches()
    with ActivationStatistics(fp32, batches) as shared, _ThreePassStatistics(fp32, batches) as alone:
        for method in CALIBRATION_METHODS:
            written = []
            for statistics in (shared, alone):
                path = tmp_path / f"{method}.{len(written)}.onnx"
                with Int8Quantizer(fp32, batches, flavour=flavour, method=method, statistics=statistics) as q:
                    q.write(path)
                written.append(path.read_bytes())
            assert written[0] == written[1], method


class _FullCacheQuantizer(Int8Quantizer):
    """Int8Quantizer whose calibration cache holds every range's histogram too, as ORT saves it."""

    def _calibration_cache(self) -> Path | None:
        from onnxruntime.quantization.calibrate import save_tensors_data

        path = Path(self._tmp.name) / "full.json"
        save_tensors_data(self.statistics.ranges(self.method, self.flavour.symmetric_activations), path)
        return path


@pytest.mark.parametrize("flavour", ["cpu", "trt"])
def test_the_calibration_cache_holds_only_the_ranges_and_writes_the_same_file(
    tmp_path: Path, flavour: str
) -> None:
    fp32 = export_onnx(tiny_net(), tmp_path / "fp32.onnx")
    with ActivationStatistics(fp32, _batches()) as statistics:
        for method in CALIBRATION_METHODS:
            written = []
            for quantizer_type in (Int8Quantizer, _FullCacheQuantizer):
                path = tmp_path / f"{method}.{quantizer_type.__name__}.onnx"
                with quantizer_type(
                    fp32, _batches(), flavour=flavour, method=method, statistics=statistics
                ) as q:
                    q.write(path)
                    cache = q._calibration_cache()
                    assert cache is not None
                    written.append((path.read_bytes(), "hist" in cache.read_text()))
            (slim, slim_has_histograms), (full, full_has_histograms) = written
            assert slim == full, method
            assert not slim_has_histograms and (full_has_histograms or method == "minmax"), method


def test_the_model_runs_once_over_the_images_for_every_method_and_flavour(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import onnxruntime as ort

    fp32 = export_onnx(tiny_net(), tmp_path / "fp32.onnx")
    batches = _batches()
    runs: list[int] = []
    real_run = ort.InferenceSession.run

    def counting_run(self: Any, *args: Any, **kwargs: Any) -> Any:
        runs.append(1)
        return real_run(self, *args, **kwargs)

    monkeypatch.setattr(ort.InferenceSession, "run", counting_run)
    with ActivationStatistics(fp32, batches) as statistics:
        for method in CALIBRATION_METHODS:
            for symmetric in (False, True):
                statistics.ranges(method, symmetric)
    assert len(runs) == len(batches)


def _model_with_an_empty_tensor(path: Path) -> Path:
    """images -> an empty slice of them, concatenated back: one calibrated tensor holds no values
    (as a detector's boxes after NMS can)."""
    ends = [numpy_helper.from_array(np.array([0], np.int64), name) for name in ("start", "end")]
    graph = helper.make_graph(
        [
            helper.make_node("Slice", ["images", "start", "end", "axis"], ["empty"]),
            helper.make_node("Concat", ["images", "empty"], ["joined"], axis=1),
            helper.make_node("Relu", ["joined"], ["logits"]),
        ],
        "empty",
        [helper.make_tensor_value_info("images", TensorProto.FLOAT, ["N", 4])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 4])],
        [*ends, numpy_helper.from_array(np.array([1], np.int64), "axis")],
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    return path


def test_an_empty_tensor_gets_the_ranges_each_calibrator_gives_it(tmp_path: Path) -> None:
    model = _model_with_an_empty_tensor(tmp_path / "empty.onnx")
    batches = [np.random.default_rng(0).standard_normal((8, 4)).astype(np.float32)]
    with ActivationStatistics(model, batches) as statistics:
        for method in CALIBRATION_METHODS:
            shared = statistics.ranges(method, False)["empty"].range_value
            alone = _one_method_pass(statistics.prepared, batches, method, False, tmp_path)
            alone = alone["empty"].range_value
            assert all(np.array_equal(ours, theirs) for ours, theirs in zip(shared, alone, strict=True))
