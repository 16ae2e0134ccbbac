"""Int8 fake quantization of a student, placed the way TensorRT's explicit quantization wants it.

`quantize_student(model, input_shape)` returns a copy of the student in which

- every BatchNorm that follows a convolution is folded into it (as the exported graph has it), and
  in-place activations are made out-of-place, so that quantizing one tensor never edits another;
- every Conv2d and Linear is swapped, under the same module path, for a subclass that quantizes its
  weight per output channel, symmetric int8 (zero point 0, scale = max |w| / 127 of the channel);
- every tensor a convolution or linear layer reads, and every residual-add operand that is not a
  convolution's own output, is quantized per tensor, symmetric int8, at the module that produced it
  (an `output_quantizer` child, run at the end of that module's forward), or, where no module
  produced it (the network's input, a functional flatten), by an `input_quantizer` child of the
  reading layer. One quantizer
  per tensor: a block input read by a convolution and by the shortcut add passes one Q/DQ pair,
  which is the pattern TensorRT fuses into an int8 convolution with a fused residual add.

Quantization uses torch's own fake-quantize ops (torch.fake_quantize_per_channel_affine and
torch.fake_quantize_per_tensor_affine), which the ONNX exporter writes as QuantizeLinear and
DequantizeLinear nodes; gradients pass straight through inside the clipping range. Activation ranges
are observed: `calibrate` averages the batch maxima of |x| over calibration batches, and in train
mode each batch moves the range by an exponential moving average (momentum ACTIVATION_MOMENTUM), so
ranges follow the weights as they fine-tune. In eval mode every range is frozen.

Module paths stay those of the student, so ONNX node names (/layer1/layer1.0/conv1/...) still name
the PyTorch module each node comes from.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

from deploy.errors import UsageError
from reviewkd.distiller import fold_batchnorm

INT8_MIN, INT8_MAX = -128, 127
ACTIVATION_MOMENTUM = 0.01
_MIN_AMAX = 1e-8
_ADD_FUNCTIONS = {
    torch.add,
    torch.Tensor.add,
    torch.Tensor.add_,
    torch.Tensor.__add__,
    torch.Tensor.__iadd__,
    torch.Tensor.__radd__,
}


class ActivationQuantizer(nn.Module):
    """Per-tensor symmetric int8 fake quantization with an observed range (the `amax` buffer).

    Observes (updates `amax` from the batch) in train mode and inside `calibrate`; frozen otherwise.
    The first observed batch sets the range; later ones move it by the running mean of the batch
    maxima until `1 / ACTIVATION_MOMENTUM` batches were seen, then by an exponential moving average.
    """

    amax: torch.Tensor
    batches: torch.Tensor

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("amax", torch.tensor(0.0))
        self.register_buffer("batches", torch.tensor(0, dtype=torch.int64))
        self.calibrating = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x fake-quantized to int8 with scale amax / 127 and zero point 0."""
        amax = self.amax
        if self.training or self.calibrating:
            with torch.no_grad():
                seen = self.batches.add_(1)
                weight = torch.clamp(1.0 / seen.to(amax.dtype), min=ACTIVATION_MOMENTUM)
                amax.add_(weight * (x.detach().abs().amax().to(amax.dtype) - amax))
        scale = amax.clamp_min(_MIN_AMAX) / INT8_MAX
        zero_point = torch.zeros((), dtype=torch.int32, device=x.device)
        return torch.fake_quantize_per_tensor_affine(x, scale.to(x.dtype), zero_point, INT8_MIN, INT8_MAX)


def quantize_weight(weight: torch.Tensor) -> torch.Tensor:
    """Per-output-channel symmetric int8 fake quantization: zero point 0, scale max|w| / 127."""
    amax = weight.detach().abs().amax(dim=tuple(range(1, weight.ndim))).clamp_min(_MIN_AMAX)
    zero_point = torch.zeros(weight.shape[0], dtype=torch.int32, device=weight.device)
    return torch.fake_quantize_per_channel_affine(weight, amax / INT8_MAX, zero_point, 0, INT8_MIN, INT8_MAX)


def _quantized_input(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    quantizer = layer._modules.get("input_quantizer")
    return x if quantizer is None else quantizer(x)


class QuantConv2d(nn.Conv2d):
    """nn.Conv2d whose weight is fake-quantized per output channel on every forward, and whose input
    is fake-quantized when it has an `input_quantizer` child."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The convolution with the int8-rounded weight (the bias stays float, as TensorRT keeps it)."""
        return self._conv_forward(_quantized_input(self, x), quantize_weight(self.weight), self.bias)


class QuantLinear(nn.Linear):
    """nn.Linear whose weight is fake-quantized per output row on every forward, and whose input is
    fake-quantized when it has an `input_quantizer` child."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The affine map with the int8-rounded weight."""
        return F.linear(_quantized_input(self, x), quantize_weight(self.weight), self.bias)


_OUTPUT_QUANTIZED: dict[type, type] = {}


def _output_quantized(cls: type[nn.Module]) -> type[nn.Module]:
    """A subclass of `cls` that passes its forward's output through its `output_quantizer` child.

    The quantizer runs inside the module's own forward (a forward hook would run outside it), so the
    exported Q/DQ nodes carry the module's path in their names.
    """
    if cls not in _OUTPUT_QUANTIZED:

        def forward(self: nn.Module, *args: Any, **kwargs: Any) -> Any:
            return self.get_submodule("output_quantizer")(cls.forward(self, *args, **kwargs))

        doc = f"{cls.__name__} with its output fake-quantized to int8 (reviewkd.fake_quant)."
        _OUTPUT_QUANTIZED[cls] = type(
            f"OutputQuantized{cls.__name__}", (cls,), {"forward": forward, "__doc__": doc}
        )
    return _OUTPUT_QUANTIZED[cls]


@dataclass
class QuantizationPlan:
    """Where the quantizers go, by module path, as the probe forward found them."""

    weights: list[str] = field(default_factory=list)  # Conv2d / Linear layers, weights per channel
    outputs: list[str] = field(default_factory=list)  # modules whose output is quantized
    inputs: list[str] = field(default_factory=list)  # layers whose input is quantized
    residual_adds: int = 0  # adds with a quantized (or convolution-output) operand pair
    unquantized_add_operands: int = 0  # add operands made by functional code, left in float

    def as_dict(self) -> dict[str, Any]:
        """A JSON-ready form for the manifest."""
        return {
            "weights": len(self.weights),
            "output_quantizers": self.outputs,
            "input_quantizers": self.inputs,
            "residual_adds": self.residual_adds,
            "unquantized_add_operands": self.unquantized_add_operands,
        }


class _AddRecorder(TorchFunctionMode):
    """Records the operand pairs of every same-shape tensor addition run inside it."""

    def __init__(self, keep_alive: list[torch.Tensor]) -> None:
        super().__init__()
        self.pairs: list[tuple[int, int]] = []
        self._keep_alive = keep_alive

    def __torch_function__(
        self, func: Any, types: Any, args: Sequence[Any] = (), kwargs: dict[str, Any] | None = None
    ) -> Any:
        if func in _ADD_FUNCTIONS and len(args) >= 2:
            a, b = args[0], args[1]
            if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.shape == b.shape:
                self.pairs.append((id(a), id(b)))
                self._keep_alive.extend((a, b))
        return func(*args, **(kwargs or {}))


def plan_quantization(model: nn.Module, input_shape: Sequence[int]) -> QuantizationPlan:
    """Find the quantization points of a (BatchNorm-folded) model with one probe forward.

    Conv2d and Linear layers get weight quantizers; the tensors they read and the residual-add
    operands get one activation quantizer each, at the module that first returned the tensor, or
    at the reading layer where no module did.
    """
    producers: dict[int, str] = {}  # tensor id -> path of the first module that returned it
    layer_outputs: set[int] = set()
    layer_inputs: list[tuple[int, str]] = []
    keep_alive: list[torch.Tensor] = []  # so that no id() is reused during the probe

    def output_hook(path: str) -> Any:
        def hook(module: nn.Module, _inputs: Any, output: Any) -> None:
            if isinstance(output, torch.Tensor):
                producers.setdefault(id(output), path)
                keep_alive.append(output)
                if isinstance(module, nn.Conv2d | nn.Linear):
                    layer_outputs.add(id(output))

        return hook

    def input_hook(path: str) -> Any:
        def hook(_module: nn.Module, inputs: tuple[Any, ...]) -> None:
            if inputs and isinstance(inputs[0], torch.Tensor):
                layer_inputs.append((id(inputs[0]), path))
                keep_alive.append(inputs[0])

        return hook

    plan = QuantizationPlan()
    handles = []
    for path, module in model.named_modules():
        if not path:
            continue
        handles.append(module.register_forward_hook(output_hook(path)))
        if type(module) in (nn.Conv2d, nn.Linear):
            plan.weights.append(path)
            handles.append(module.register_forward_pre_hook(input_hook(path)))
    recorder = _AddRecorder(keep_alive)
    probe = torch.zeros((2, *input_shape))
    try:
        with torch.no_grad(), recorder:
            model(probe)
    finally:
        for handle in handles:
            handle.remove()

    def place(tensor: int, reader: str | None) -> bool:
        producer = producers.get(tensor)
        if producer is not None:
            if producer not in plan.outputs:
                plan.outputs.append(producer)
            return True
        if reader is not None and reader not in plan.inputs:
            plan.inputs.append(reader)
        return reader is not None

    for tensor, reader in layer_inputs:
        place(tensor, reader)
    for pair in recorder.pairs:
        plan.residual_adds += 1
        for operand in pair:
            if operand not in layer_outputs and not place(operand, None):
                plan.unquantized_add_operands += 1
    keep_alive.clear()
    return plan


def quantize_student(model: nn.Module, input_shape: Sequence[int]) -> tuple[nn.Module, QuantizationPlan]:
    """A trainable copy of `model` with BatchNorm folded and int8 fake quantizers placed (module doc).

    The activation quantizers start uncalibrated: run `calibrate` (or load a quantized state_dict)
    before using the copy. Raises UsageError when the model has no Conv2d or Linear layer to quantize.
    """
    folded = fold_batchnorm(model, input_shape)
    for module in folded.modules():
        if isinstance(getattr(module, "inplace", None), bool):
            module.inplace = False  # type: ignore[assignment]
    plan = plan_quantization(folded, input_shape)
    if not plan.weights:
        raise UsageError(f"{type(model).__name__} has no Conv2d or Linear layer to quantize")
    for path in plan.weights:
        layer = folded.get_submodule(path)
        # The copy is ours: re-classing keeps the parameters, the path and every hook on the layer.
        layer.__class__ = QuantConv2d if isinstance(layer, nn.Conv2d) else QuantLinear
    for path in plan.outputs:
        module = folded.get_submodule(path)
        module.add_module("output_quantizer", ActivationQuantizer())
        module.__class__ = _output_quantized(type(module))
    for path in plan.inputs:
        folded.get_submodule(path).add_module("input_quantizer", ActivationQuantizer())
    return folded.requires_grad_(True), plan


def activation_quantizers(model: nn.Module) -> list[ActivationQuantizer]:
    """Every activation quantizer of a quantized model."""
    return [m for m in model.modules() if isinstance(m, ActivationQuantizer)]


@contextmanager
def _calibrating(model: nn.Module) -> Iterator[None]:
    quantizers = activation_quantizers(model)
    for quantizer in quantizers:
        quantizer.calibrating = True
    try:
        yield
    finally:
        for quantizer in quantizers:
            quantizer.calibrating = False


@torch.no_grad()
def calibrate(model: nn.Module, batches: Iterable[torch.Tensor]) -> int:
    """Set every activation range from `batches` (preprocessed inputs), in eval mode; return the image count.

    Raises UsageError when `batches` is empty: an uncalibrated model would quantize to garbage.
    """
    was_training = model.training
    model.eval()
    images = 0
    with _calibrating(model):
        for batch in batches:
            model(batch)
            images += len(batch)
    model.train(was_training)
    if images == 0:
        raise UsageError("int8 calibration of the fake-quantized student found no images")
    return images
