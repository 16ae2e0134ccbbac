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

Both flavours keep weights in 7 bits ([-64, 64], ONNX Runtime's `reduce_range`). ONNX Runtime's
x86 int8 kernels on CPUs without VNNI (AVX2) multiply uint8 activations by int8 weights with
vpmaddubsw, which adds two products into a saturating int16: 255 * 127 * 2 overflows it, 255 * 64 * 2
does not. With full 8-bit weights a ResNet-20 on such a CPU (AMD EPYC, AVX2) lost 1.9 points
(cpu flavour) and 14 points (trt flavour, whose int8 activations are shifted to uint8) against the
same file run unfused (Q/DQ semantics, 91.4% and 92.2% for a 91.7% student). A file must hold its
accuracy on whatever CPU runs it, so the 7-bit range is the default for both.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from deploy.errors import UsageError
from export.onnx_export import INPUT_NAME, get_metadata, load_onnx, save_onnx, set_metadata

CALIBRATION_METHODS: tuple[str, ...] = ("minmax", "entropy", "percentile")


@dataclass(frozen=True)
class Int8Flavour:
    """How one int8 file is quantized."""

    name: str  # "cpu" or "trt"
    activation: str  # "uint8" or "int8"
    symmetric_activations: bool
    quantize_bias: bool
    per_channel: bool = True
    weight_bits: int = 7  # see the module docstring: 8-bit weights saturate ORT's AVX2 kernels

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
        }


INT8_FLAVOURS: dict[str, Int8Flavour] = {
    "cpu": Int8Flavour("cpu", activation="uint8", symmetric_activations=False, quantize_bias=True),
    # TensorRT's Q/DQ layers take 8-bit (and fp8/int4) tensors only, so biases stay float, as in
    # NVIDIA's own Q/DQ recipes; TensorRT fuses the float bias into its int8 convolution.
    "trt": Int8Flavour("trt", activation="int8", symmetric_activations=True, quantize_bias=False),
}


def convert_fp16(src: str | os.PathLike[str], dst: str | os.PathLike[str]) -> dict[str, Any]:
    """Write an fp16 copy of the fp32 ONNX file `src` to `dst`; inputs and outputs stay float32."""
    from onnxruntime.transformers.float16 import convert_float_to_float16

    model = load_onnx(src)
    metadata = get_metadata(model)
    half: onnx.ModelProto = convert_float_to_float16(model, keep_io_types=True)
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


def collect_calibration(batches: Iterable[np.ndarray], limit: int) -> list[np.ndarray]:
    """Take up to `limit` images from `batches` (float32 NCHW, already preprocessed)."""
    taken: list[np.ndarray] = []
    count = 0
    for batch in batches:
        if count >= limit:
            break
        part = np.asarray(batch, dtype=np.float32)[: limit - count]
        taken.append(part)
        count += len(part)
    if count == 0:
        raise UsageError("int8 calibration found no images")
    return taken


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
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    if flavour not in INT8_FLAVOURS:
        raise UsageError(f"int8 flavour {flavour!r}: expected one of {', '.join(INT8_FLAVOURS)}")
    if method not in CALIBRATION_METHODS:
        raise UsageError(f"--calib-method {method!r}: expected one of {', '.join(CALIBRATION_METHODS)}")
    spec = INT8_FLAVOURS[flavour]
    methods = {
        "minmax": CalibrationMethod.MinMax,
        "entropy": CalibrationMethod.Entropy,
        "percentile": CalibrationMethod.Percentile,
    }
    # ONNX Runtime's CalibrationDataReader accepts any object with get_next (its __subclasshook__).
    reader = ArrayCalibrationReader(calibration)
    metadata = get_metadata(load_onnx(src))
    with tempfile.TemporaryDirectory(prefix="reviewkd-quant-") as tmp:
        prepared = Path(tmp) / "prepared.onnx"
        quantized = Path(tmp) / "quantized.onnx"
        # Shape inference and ONNX Runtime's graph fusions before quantizing, as ORT recommends.
        quant_pre_process(str(src), str(prepared), skip_symbolic_shape=True)
        quantize_static(
            str(prepared),
            str(quantized),
            reader,
            quant_format=QuantFormat.QDQ,
            per_channel=spec.per_channel,
            reduce_range=spec.weight_bits == 7,
            activation_type=QuantType.QUInt8 if spec.activation == "uint8" else QuantType.QInt8,
            weight_type=QuantType.QInt8,
            calibrate_method=methods[method],
            extra_options={
                "ActivationSymmetric": spec.symmetric_activations,
                "WeightSymmetric": True,
                "CalibMovingAverage": False,
                "QuantizeBias": spec.quantize_bias,
            },
        )
        model = onnx.load(str(quantized))
    description = {**spec.describe(), "calibration": {"method": method, "samples": len(reader)}}
    set_metadata(model, {**metadata, "precision": "int8", "int8": description})
    save_onnx(model, dst)
    return description


def zero_points_all_zero(model: onnx.ModelProto) -> bool:
    """Whether every QuantizeLinear/DequantizeLinear zero point in `model` is 0 (symmetric Q/DQ)."""
    from onnx import numpy_helper

    inits = {i.name: i for i in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type in ("QuantizeLinear", "DequantizeLinear") and len(node.input) > 2:
            zero = inits.get(node.input[2])
            if zero is None or np.any(numpy_helper.to_array(zero) != 0):
                return False
    return True
