"""Lower-precision ONNX files made from the fp32 export: fp16, and int8 in two Q/DQ flavours.

fp16: weights and compute in float16 with float32 inputs and outputs (Cast nodes at the edges),
the form TensorRT 11's strongly typed builder takes; ONNX Runtime's vendored copy of
onnxconverter-common's converter does the graph rewrite.

int8 comes from ONNX Runtime's static quantization, calibrated on images the caller supplies:
- "cpu" (student.int8.onnx): the fastest int8 for ONNX Runtime on CPUs. uint8 activations
  (asymmetric) and per-channel int8 weights, as Q/DQ pairs that ONNX Runtime fuses into
  QLinearConv kernels. Measured in benchmarks/scripts/export_speed.py against the alternatives.
- "trt" (student.int8.trt.onnx): symmetric Q/DQ for TensorRT: int8 activations and weights,
  every zero point 0, per-channel weights. ONNX Runtime runs it too, just slower on CPUs.

Weights: 7 bits for "cpu", 8 for "trt". ONNX Runtime's x86 int8 kernels on CPUs without VNNI
(AVX2) multiply uint8 activations by int8 weights with vpmaddubsw, which adds two products into a
saturating int16: 255 * 127 * 2 overflows it, 255 * 64 * 2 does not. With full 8-bit weights a
ResNet-20 on such a CPU (AMD EPYC, AVX2) lost 1.9 points (cpu flavour) and 14 points (trt flavour,
whose int8 activations are shifted to uint8) against the same file run unfused (Q/DQ semantics,
91.4% and 92.2% for a 91.7% student). So:
- the cpu file, made to run in those fused kernels, keeps its weights in [-64, 64] (ONNX Runtime's
  `reduce_range`), and holds its accuracy on whatever CPU runs it;
- the trt file keeps full 8-bit weights ([-127, 127]): TensorRT accumulates in int32 and does not
  saturate, and the 7-bit range cost it 0.3 points on the pretrained CIFAR ResNet-56
  (benchmarks/RESULTS.md). Its description sets deploy's UNFUSED_QDQ_KEY, so every ONNX Runtime
  session this project opens on it (export's checks, calibration and mixed-precision scoring,
  layer-wise parity, predict/validate/bench) runs its Q/DQ pairs as float operations: the file's
  semantics, which TensorRT computes, not the fused kernels'.

Mixed precision (export/mixed_precision.py) keeps the most sensitive layers out of int8: in fp32
in the cpu file, which ONNX Runtime runs; in fp16 in the trt file (`compute_in_fp16`: Casts around
those layers, their weights stored in fp16), because TensorRT 10.12+ and 11 build strongly typed
networks whose precision is the ONNX file's tensor types, so the file itself must say fp16. Every
quantized layer keeps its DequantizeLinear inputs right before it, and its Q/DQ scales stay
float32, so TensorRT's explicit-quantization fusions are unchanged.
"""

from __future__ import annotations

import contextlib
import inspect
import io
import os
import tempfile
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from deploy.errors import UsageError
from deploy.optional import optional_import
from deploy.runners.onnxruntime_runner import CPU_PROVIDER, UNFUSED_QDQ_KEY, session_options
from export.check import session_threads
from export.onnx_export import INPUT_NAME, get_metadata, load_onnx, save_onnx, set_metadata

CALIBRATION_METHODS: tuple[str, ...] = ("minmax", "entropy", "percentile")


@dataclass(frozen=True)
class Int8Flavour:
    """How one int8 file is quantized."""

    name: str  # "cpu" or "trt"
    activation: str  # "uint8" or "int8"
    symmetric_activations: bool
    quantize_bias: bool
    weight_bits: int  # 7 or 8; see the module docstring
    float_layers: str  # what the layers mixed precision keeps out of int8 compute in: "fp32" or "fp16"
    per_channel: bool = True

    @property
    def runs_unfused(self) -> bool:
        """Whether ONNX Runtime must run the file's Q/DQ pairs as float operations: 8-bit weights
        saturate its fused int8 kernels on CPUs without VNNI (module docstring)."""
        return self.weight_bits == 8

    def describe(self) -> dict[str, Any]:
        """The manifest's record of this flavour."""
        return {
            "flavour": self.name,
            "format": "QDQ",
            "activations": self.activation,
            "weights": "int8",
            "symmetric_activations": self.symmetric_activations,
            "symmetric_weights": True,
            "per_channel_weights": self.per_channel,
            "weight_bits": self.weight_bits,
            "bias": "int32" if self.quantize_bias else "float",
            UNFUSED_QDQ_KEY: self.runs_unfused,
        }


INT8_FLAVOURS: dict[str, Int8Flavour] = {
    "cpu": Int8Flavour(
        "cpu",
        activation="uint8",
        symmetric_activations=False,
        quantize_bias=True,
        weight_bits=7,
        float_layers="fp32",
    ),
    # TensorRT's Q/DQ layers take 8-bit (and fp8/int4) tensors only, so biases stay float, as in
    # NVIDIA's own Q/DQ recipes; TensorRT fuses the float bias into its int8 convolution. Layers kept
    # out of int8 compute in fp16 (module docstring, "Mixed precision").
    "trt": Int8Flavour(
        "trt",
        activation="int8",
        symmetric_activations=True,
        quantize_bias=False,
        weight_bits=8,
        float_layers="fp16",
    ),
}


def convert_fp16(
    src: str | os.PathLike[str], dst: str | os.PathLike[str], keep_float32: Collection[str] = ()
) -> dict[str, Any]:
    """Write an fp16 copy of the fp32 ONNX file `src` to `dst`; inputs and outputs stay float32, and
    so do the nodes named in `keep_float32` (a detector's box arithmetic)."""
    with optional_import("the fp16 conversion"):
        from onnxruntime.transformers.float16 import convert_float_to_float16

    model = load_onnx(src)
    metadata = get_metadata(model)
    half: onnx.ModelProto = convert_float_to_float16(
        model, keep_io_types=True, node_block_list=list(keep_float32) or None
    )
    # The converter appends its input Casts after the nodes that read them; ONNX wants them before.
    _sort_topologically(half.graph)
    set_metadata(half, {**metadata, "precision": "fp16"})
    save_onnx(half, dst)
    return {"io_types": "float32", "compute": "float16"}


def _sort_topologically(graph: onnx.GraphProto) -> None:
    """Reorder `graph`'s nodes so that every node comes after the producers of its inputs."""
    available = {i.name for i in graph.input} | {i.name for i in graph.initializer} | {""}
    pending = list(graph.node)
    ordered: list[onnx.NodeProto] = []
    while pending:
        ready = [n for n in pending if all(name in available for name in n.input)]
        if not ready:
            raise UsageError(f"graph {graph.name!r} has a cycle or an input no node produces")
        for node in ready:
            ordered.append(node)
            available.update(node.output)
        pending = [n for n in pending if all(n is not r for r in ready)]
    del graph.node[:]
    graph.node.extend(ordered)


def compute_in_fp16(model: onnx.ModelProto, names: Collection[str]) -> None:
    """Make the nodes of `model` named in `names` compute in float16, in place; the rest is untouched.

    Each such node reads fp16: its float32 initializers become fp16 copies, and each float32 tensor
    it reads is cast to fp16 once (or taken as fp16 straight from another such node). Each float32
    output is produced in fp16 under a new name and cast back to float32 under its own name, so
    every other consumer, and the graph's outputs, see what they saw before; a tensor one such node
    makes and another reads stays fp16 between them (ONNX lists producers before consumers, so the
    producer's fp16 name is known first). Quantized nodes keep their DequantizeLinear inputs, so
    TensorRT still fuses them into int8 layers.
    UsageError when a name is not a node of the model.
    """
    graph = model.graph
    wanted = set(names)
    missing = wanted - {node.name for node in graph.node}
    if missing:
        raise UsageError(f"no node named {', '.join(sorted(missing))} in the quantized graph")
    inferred = onnx.shape_inference.infer_shapes(model).graph
    float32 = {
        info.name
        for info in [*inferred.input, *inferred.value_info, *inferred.output]
        if info.type.tensor_type.elem_type == TensorProto.FLOAT
    }
    initializers = {init.name: init for init in graph.initializer}
    half_of: dict[str, str] = {}  # float32 tensor -> its fp16 counterpart
    casts: list[onnx.NodeProto] = []
    for node in graph.node:
        if node.name not in wanted:
            continue
        for i, name in enumerate(node.input):
            init = initializers.get(name)
            if init is not None and init.data_type == TensorProto.FLOAT:
                if name not in half_of:
                    half = numpy_helper.from_array(
                        numpy_helper.to_array(init).astype(np.float16), f"{name}_fp16"
                    )
                    graph.initializer.append(half)
                    half_of[name] = half.name
            elif name in float32 and name not in half_of:
                half_of[name] = f"{name}_fp16"
                casts.append(
                    helper.make_node(
                        "Cast", [name], [half_of[name]], f"{name}/to_fp16", to=TensorProto.FLOAT16
                    )
                )
            if name in half_of:
                node.input[i] = half_of[name]
        for i, name in enumerate(node.output):
            if name in float32:
                half_of[name] = f"{name}_fp16"
                node.output[i] = half_of[name]
                casts.append(
                    helper.make_node("Cast", [half_of[name]], [name], f"{name}/to_fp32", to=TensorProto.FLOAT)
                )
    # Only the float32 copies something still reads: a tensor that passes between two fp16 nodes
    # alone needs none.
    read = {name for node in [*graph.node, *casts] for name in node.input} | {o.name for o in graph.output}
    graph.node.extend(cast for cast in casts if cast.output[0] in read)
    _sort_topologically(graph)
    # The float32 weights that only these nodes read now exist in fp16 alone.
    unread = [init for init in graph.initializer if init.name in half_of and init.name not in read]
    for init in unread:
        graph.initializer.remove(init)


def name_unnamed_nodes(graph: onnx.GraphProto) -> int:
    """Give every nameless node of `graph` a unique name in its module's scope; return how many.

    ONNX Runtime's pre-processing inlines function ops (HardSwish into HardSigmoid and Mul, as in
    MobileNetV3) without naming the new nodes. Mixed precision and layer-wise parity address nodes by
    name and map names to module paths, so each gets "<scope>/<op type>", the scope taken from its
    output ("/features/features.0/features.0.2/HardSwish_output_0") or else its first input.
    """
    taken = {node.name for node in graph.node if node.name}
    named = 0
    for node in graph.node:
        if node.name:
            continue
        scoped = [t for t in (*node.output, *node.input) if t.startswith("/") and "/" in t[1:]]
        scope = scoped[0].rsplit("/", 1)[0] if scoped else ""
        name, suffix = f"{scope}/{node.op_type}", 1
        while name in taken:
            suffix += 1
            name = f"{scope}/{node.op_type}_{suffix}"
        node.name = name
        taken.add(name)
        named += 1
    return named


class ArrayCalibrationReader:
    """Feeds fixed calibration batches to ONNX Runtime's calibrator (a CalibrationDataReader).

    The batches are held in memory so that several flavours calibrate on the very same images.
    """

    def __init__(self, batches: Sequence[np.ndarray], input_name: str = INPUT_NAME) -> None:
        self._batches = list(batches)
        self._input_name = input_name
        self._next = 0

    def get_next(self) -> dict[str, np.ndarray] | None:
        """Return the next batch as an input feed, or None once all were given."""
        if self._next >= len(self._batches):
            return None
        batch = self._batches[self._next]
        self._next += 1
        return {self._input_name: np.ascontiguousarray(batch, dtype=np.float32)}

    def rewind(self) -> None:
        """Start again from the first batch."""
        self._next = 0

    def __len__(self) -> int:
        return sum(len(b) for b in self._batches)


# ONNX Runtime's histogram settings that quantize_static cannot pass on (it leaves entropy at 128
# bins and 128 quantized bins, which makes its entropy threshold the min-max range): TensorRT's
# entropy calibrator uses a 2048-bin histogram of |x| and 128 quantized levels; ORT's histogram is
# signed, so 256 quantized bins give the same 128 levels a side. ORT collects the histograms;
# entropy_threshold searches them (ORT's own search took 170 s for a ResNet-20).
CALIBRATOR_OPTIONS: dict[str, dict[str, Any]] = {
    "minmax": {},
    "entropy": {"num_bins": 2048, "num_quantized_bins": 256},
    "percentile": {"num_bins": 2048, "percentile": 99.999},
}


class ActivationStatistics:
    """One pass of activation statistics over the calibration images, read by every method.

    The prepared model (ORT's shape inference and fusions, `prepared`) runs once over the images, one
    batch at a time, with every tensor ORT calibrates as an output (ORT's histogram calibrator's
    augmented model and session). Each batch's tensors feed, as ORT's three calibrators would:
    - their minimum and maximum (what MinMaxCalibrater's ReduceMin/ReduceMax nodes compute);
    - ORT's HistogramCollector of signed values (entropy, and percentile for asymmetric ranges);
    - ORT's HistogramCollector of absolute values (percentile for symmetric ranges).
    `ranges(method, symmetric)` then computes a method's ranges from them without running the model
    again: the same TensorsData ORT's calibrator of that method computes from its own pass (tested
    in tests/export/test_precision.py), so the int8 files are the same, at a third of the passes for
    one flavour and a sixth for both. The entropy thresholds are `entropy_threshold`'s.

    One instance serves every flavour and method of one fp32 file and one list of calibration
    images; use it as a context manager (the prepared and augmented models live in a temporary folder).
    """

    def __init__(self, src: str | os.PathLike[str], calibration: Sequence[np.ndarray]) -> None:
        if not calibration:
            raise UsageError("int8 calibration needs at least one batch of images")
        self.src = Path(src)
        self.calibration = list(calibration)
        self._tmp = tempfile.TemporaryDirectory(prefix="reviewkd-calib-stats-")
        self._prepared: Path | None = None
        self._collected: tuple[dict[str, tuple[np.ndarray, np.ndarray]], Any, Any] | None = None
        self._ranges: dict[tuple[str, bool], Any] = {}

    def __enter__(self) -> ActivationStatistics:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Remove the temporary folder."""
        self._tmp.cleanup()

    @property
    def prepared(self) -> Path:
        """The fp32 model after ORT's shape inference and fusions: its node names are what quantizes."""
        if self._prepared is None:
            with optional_import("int8 quantization"):
                from onnxruntime.quantization.shape_inference import quant_pre_process

            self._prepared = Path(self._tmp.name) / "prepared.onnx"
            quant_pre_process(str(self.src), str(self._prepared), skip_symbolic_shape=True)
            model = onnx.load(str(self._prepared))
            if name_unnamed_nodes(model.graph):
                onnx.save(model, str(self._prepared))
        return self._prepared

    def collect(self) -> None:
        """Run the pass over the calibration images now (once; later calls return at once)."""
        if self._collected is not None:
            return
        with optional_import("int8 quantization"):
            import onnxruntime as ort
            from onnxruntime.quantization.calibrate import EntropyCalibrater, HistogramCollector

        options = CALIBRATOR_OPTIONS["percentile"]

        def collector(method: str, symmetric: bool) -> Any:
            return HistogramCollector(
                method=method,
                symmetric=symmetric,
                num_bins=options["num_bins"],
                num_quantized_bins=CALIBRATOR_OPTIONS["entropy"]["num_quantized_bins"],
                percentile=options["percentile"],
                scenario="same",
            )

        # The entropy calibrator's augmented model (every calibrated tensor an output), run as ORT's
        # calibrators run it (every graph optimisation off: the tensors are the graph's own), on
        # export's threads (export.check.open_check_session).
        calibrator = EntropyCalibrater(
            self.prepared,
            augmented_model_path=str(Path(self._tmp.name) / "augmented.onnx"),
            **CALIBRATOR_OPTIONS["entropy"],
        )
        calibrator.augment_graph()
        session_settings = session_options(None, session_threads(), spinning=False)
        session_settings.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        session = ort.InferenceSession(
            calibrator.augmented_model_path, session_settings, providers=[CPU_PROVIDER]
        )
        input_name = session.get_inputs()[0].name
        names = [output.name for output in session.get_outputs()]
        calibrated = calibrator.tensors_to_calibrate
        signed, absolute = collector("entropy", False), collector("percentile", True)
        extremes: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        # ORT's collectors print their progress to stdout, which is the CLI's output: kept out of it.
        with contextlib.redirect_stdout(io.StringIO()):
            for batch in self.calibration:
                outputs = session.run(None, {input_name: np.ascontiguousarray(batch, dtype=np.float32)})
                tensors = {n: [v] for n, v in zip(names, outputs, strict=True) if n in calibrated}
                for name, (value,) in tensors.items():
                    # As MinMaxCalibrater: ReduceMin/ReduceMax with keepdims, reshaped to [-1]; on an
                    # empty tensor (a detector's boxes after NMS) their identities, +inf and -inf.
                    low = np.min(value, keepdims=True, initial=np.inf).reshape(-1).astype(value.dtype)
                    high = np.max(value, keepdims=True, initial=-np.inf).reshape(-1).astype(value.dtype)
                    if name in extremes:
                        low = np.nanmin([extremes[name][0], low], axis=0)
                        high = np.nanmax([extremes[name][1], high], axis=0)
                    extremes[name] = (low, high)
                signed.collect(tensors)
                absolute.collect(tensors)
        self._collected = (extremes, signed, absolute)

    def ranges(self, method: str, symmetric: bool) -> Any:
        """The TensorsData of `method` (CALIBRATION_METHODS) with symmetric ranges or not, computed
        once from the collected statistics. Entropy's thresholds do not depend on `symmetric` (ORT's
        entropy calibrator histograms signed values either way), so both flavours share them."""
        with optional_import("int8 quantization"):
            from onnxruntime.quantization.calibrate import CalibrationMethod, HistogramCollector, TensorsData

        key = (method, symmetric and method != "entropy")
        if key in self._ranges:
            return self._ranges[key]
        self.collect()
        assert self._collected is not None
        extremes, signed, absolute = self._collected
        if method == "minmax":
            pairs = {}
            for name, (low, high) in extremes.items():
                widest = np.nanmax([np.abs(low), np.abs(high)], axis=0)
                pairs[name] = (-widest, widest) if symmetric else (low, high)
            result = TensorsData(CalibrationMethod.MinMax, pairs)
        elif method == "entropy":
            bins = CALIBRATOR_OPTIONS["entropy"]["num_quantized_bins"]
            result = TensorsData(
                CalibrationMethod.Entropy,
                {
                    name: (*entropy_threshold(histogram, bins), *histogram[:2])
                    for name, histogram in signed.histogram_dict.items()
                },
            )
        else:
            # ORT's percentile reads |x| histograms for symmetric ranges and signed ones otherwise.
            source = absolute if symmetric else signed
            cut = HistogramCollector("percentile", symmetric, source.num_bins, 0, source.percentile, "same")
            cut.histogram_dict = source.histogram_dict
            with contextlib.redirect_stdout(io.StringIO()):
                result = TensorsData(CalibrationMethod.Percentile, cut.compute_percentile())
        self._ranges[key] = result
        return result


class Int8Quantizer:
    """Quantizes one fp32 ONNX file to int8 Q/DQ, calibrating once and writing as many files as asked.

    Use as a context manager: the calibration ranges live in a temporary folder. `write` can exclude
    nodes (mixed precision) or quantize only some (sensitivity). `statistics` are the calibration
    images' ActivationStatistics of `src`, shared with other quantizers of the same file and images
    (every method and flavour of an export); None collects them here for this quantizer alone.
    """

    def __init__(
        self,
        src: str | os.PathLike[str],
        calibration: Sequence[np.ndarray],
        *,
        flavour: str = "cpu",
        method: str = "minmax",
        statistics: ActivationStatistics | None = None,
    ) -> None:
        if flavour not in INT8_FLAVOURS:
            raise UsageError(f"int8 flavour {flavour!r}: expected one of {', '.join(INT8_FLAVOURS)}")
        if method not in CALIBRATION_METHODS:
            raise UsageError(f"--calib-method {method!r}: expected one of {', '.join(CALIBRATION_METHODS)}")
        self.src, self.flavour, self.method = Path(src), INT8_FLAVOURS[flavour], method
        self.calibration = list(calibration)
        self.metadata = get_metadata(load_onnx(src))
        self._tmp = tempfile.TemporaryDirectory(prefix="reviewkd-quant-")
        self._own_statistics = statistics is None
        self.statistics = statistics or ActivationStatistics(src, self.calibration)
        self._ranges: Path | None = None

    def __enter__(self) -> Int8Quantizer:
        return self

    def __exit__(self, *_exc: object) -> None:
        self._tmp.cleanup()
        if self._own_statistics:
            self.statistics.close()

    @property
    def prepared(self) -> Path:
        """The fp32 model after ORT's shape inference and fusions: its node names are what quantizes."""
        return self.statistics.prepared

    def calibrate(self) -> None:
        """Prepare the model and compute the activation ranges now, not at the first `write`."""
        self._calibration_cache()

    def _calibration_cache(self) -> Path | None:
        """This method's activation ranges (from `statistics`), as ORT's calibration cache file.

        None where this onnxruntime's quantize_static takes no cache (then it calibrates itself,
        with its own histogram defaults).
        """
        with optional_import("int8 quantization"):
            from onnxruntime.quantization import quantize_static
            from onnxruntime.quantization.calibrate import TensorData, TensorsData, save_tensors_data

        if "calibration_cache_path" not in inspect.signature(quantize_static).parameters:
            return None
        if self._ranges is None:
            ranges = self.statistics.ranges(self.method, self.flavour.symmetric_activations)
            # Only the ranges: quantize_static reads nothing else from the cache. With the histograms
            # (2,048 bins and their edges per tensor) a ResNet-56's entropy ranges were 8.8 MB of
            # JSON, 0.43 s of CPU to write and read back again by every write; without, 17 kB.
            ranges_only = TensorsData(
                ranges.calibration_method,
                {
                    name: TensorData(lowest=data.lowest, highest=data.highest)
                    for name, data in ranges.data.items()
                },
            )
            self._ranges = Path(self._tmp.name) / f"ranges.{self.method}.json"
            save_tensors_data(ranges_only, self._ranges)
        return self._ranges

    def write(
        self,
        dst: str | os.PathLike[str],
        *,
        exclude_nodes: Sequence[str] = (),
        only_nodes: Sequence[str] | None = None,
        calibration_record: dict[str, Any] | None = None,
        record: dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        """Write the int8 file to `dst`; nodes (names in `prepared`) in `exclude_nodes` stay float,
        and with `only_nodes` nothing else is quantized. `calibration_record` joins the description's
        calibration block, `record` the description itself. Returns the manifest's description,
        also stored in the file's metadata."""
        with optional_import("int8 quantization"):
            from onnxruntime.quantization import QuantFormat, QuantType, quantize_static

        spec = self.flavour
        cache = self._calibration_cache()
        quantized = Path(self._tmp.name) / "quantized.onnx"
        quantize_static(
            str(self.prepared),
            str(quantized),
            # ONNX Runtime's CalibrationDataReader accepts any object with get_next.
            None if cache else ArrayCalibrationReader(self.calibration),
            quant_format=QuantFormat.QDQ,
            per_channel=spec.per_channel,
            reduce_range=spec.weight_bits == 7,
            activation_type=QuantType.QUInt8 if spec.activation == "uint8" else QuantType.QInt8,
            weight_type=QuantType.QInt8,
            calibrate_method=_ort_method(self.method),
            nodes_to_exclude=list(exclude_nodes),
            nodes_to_quantize=list(only_nodes) if only_nodes is not None else None,
            extra_options={
                "ActivationSymmetric": spec.symmetric_activations,
                "WeightSymmetric": True,
                "CalibMovingAverage": False,
                "QuantizeBias": spec.quantize_bias,
            },
            **({"calibration_cache_path": str(cache)} if cache else {}),
        )
        model = onnx.load(str(quantized))
        if exclude_nodes and spec.float_layers == "fp16":
            compute_in_fp16(model, exclude_nodes)
        description = {
            **spec.describe(),
            "calibration": {
                "method": self.method,
                "samples": sum(len(b) for b in self.calibration),
                "calibrator": CALIBRATOR_OPTIONS[self.method] if cache else "onnxruntime defaults",
                **(calibration_record or {}),
            },
        }
        if exclude_nodes:
            description["float_nodes"] = sorted(exclude_nodes)
            description["float_precision"] = spec.float_layers
        description.update(record or {})
        set_metadata(model, {**self.metadata, "precision": "int8", "int8": description})
        save_onnx(model, dst)
        return description


def _smooth(counts: np.ndarray, eps: float = 1e-4) -> np.ndarray | None:
    """ORT's smooth_distribution: zeros become eps, taken off the non-zero bins (float32)."""
    zeros = counts == 0
    nonzero = counts.size - int(zeros.sum())
    if nonzero == 0:
        return None
    smoothed = counts.astype(np.float32)
    smoothed += np.where(zeros, np.float32(eps), np.float32(-eps * (counts.size - nonzero) / nonzero))
    return smoothed


def _kl(p: np.ndarray, q: np.ndarray) -> float:
    """KL(p || q) of two positive float32 histograms, normalised as ORT's entropy() does."""
    p = p / p.sum()
    q = q / q.sum()
    return float(np.sum(p * np.log(p / q)))


def entropy_threshold(histogram: Sequence[Any], num_quantized_bins: int) -> tuple[np.ndarray, np.ndarray]:
    """The (low, high) range minimising KL(fp32 || quantized) over a signed, zero-centred histogram.

    The same search as ONNX Runtime's HistogramCollector.get_entropy_threshold (after TensorRT's
    entropy calibration: every symmetric window from num_quantized_bins wide to the whole
    histogram, outliers folded into the edge bins, the window merged into num_quantized_bins and
    spread back over its non-empty bins), with the per-bin Python loops replaced by reshapes.
    `histogram` is ORT's (counts, edges, min, max, threshold) tuple.
    """
    hist, edges, min_value, max_value = histogram[0], histogram[1], histogram[2], histogram[3]
    hist = np.asarray(hist, dtype=np.int64)
    size = hist.size
    zero_bin = size // 2
    half = num_quantized_bins // 2
    cumulative = np.concatenate([[0], np.cumsum(hist)])
    best_divergence, best = np.inf, (edges[zero_bin - half], edges[min(zero_bin + half + 1, size)])
    for i in range(half, zero_bin + 1):
        start, end = zero_bin - i, min(zero_bin + i + 1, size)
        window = hist[start:end]
        p = window.copy()
        p[0] += cumulative[start]
        p[-1] += cumulative[size] - cumulative[end]
        merged = window.size // num_quantized_bins
        covered = merged * num_quantized_bins
        sums = window[:covered].reshape(num_quantized_bins, merged).sum(1)
        sums[-1] += window[covered:].sum()
        norms = (p[:covered] != 0).reshape(num_quantized_bins, merged).sum(1)
        q = np.zeros(p.size, dtype=np.int64)
        # ORT stores sum / norm into an int64 array: truncated.
        q[:covered] = np.repeat(np.where(norms > 0, sums / np.maximum(norms, 1), 0).astype(np.int64), merged)
        p_smooth, q_smooth = _smooth(p), _smooth(q)
        divergence = np.inf if p_smooth is None or q_smooth is None else _kl(p_smooth, q_smooth)
        if divergence < best_divergence:  # the first minimum, as np.argmin picks
            best_divergence, best = divergence, (edges[start], edges[end])
    low, high = best
    return max(low, min_value), min(high, max_value)


def _ort_method(method: str) -> Any:
    with optional_import("int8 quantization"):
        from onnxruntime.quantization import CalibrationMethod

    return {
        "minmax": CalibrationMethod.MinMax,
        "entropy": CalibrationMethod.Entropy,
        "percentile": CalibrationMethod.Percentile,
    }[method]


def quantize_int8(
    src: str | os.PathLike[str],
    dst: str | os.PathLike[str],
    calibration: Sequence[np.ndarray],
    *,
    flavour: str = "cpu",
    method: str = "minmax",
) -> dict[str, Any]:
    """Quantize the fp32 ONNX file `src` to int8 Q/DQ at `dst`, calibrated on `calibration`.

    `flavour` is a key of INT8_FLAVOURS, `method` one of CALIBRATION_METHODS. Returns the
    manifest's description of the file.
    """
    with Int8Quantizer(src, calibration, flavour=flavour, method=method) as quantizer:
        return quantizer.write(dst)


def zero_points_all_zero(model: onnx.ModelProto) -> bool:
    """Whether every QuantizeLinear/DequantizeLinear zero point in `model` is 0 (symmetric Q/DQ)."""
    inits = {i.name: i for i in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type in ("QuantizeLinear", "DequantizeLinear") and len(node.input) > 2:
            zero = inits.get(node.input[2])
            if zero is None or np.any(numpy_helper.to_array(zero) != 0):
                return False
    return True
