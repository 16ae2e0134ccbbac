"""Strip a trained student and export it to an fp32 ONNX file.

The file has one input "images" (N, C, H, W) float32 with a symbolic batch dimension and one
output "logits" (N, num_classes); the run's manifest (classes, preprocessing, source hash) rides
along as JSON in metadata_props under METADATA_KEY, which `reviewkd predict` reads.

BatchNorm: the exporter runs in eval mode with constant folding, which folds every BatchNorm that
directly follows a convolution into that convolution (the running statistics become part of its
weight and bias). `expected_onnx_weight_count` counts what that leaves; BatchNorms that cannot be
folded (pre-activation networks: BN before the conv) stay as BatchNormalization nodes.
"""

from __future__ import annotations

import inspect
import json
import os
import tempfile
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
from torch import nn

from deploy.errors import UsageError
from deploy.fileio import ONNX_CONTENT_HASH_KEY, atomic_output, onnx_content_sha256
from deploy.optional import optional_import, optional_module

METADATA_KEY = "reviewkd_manifest"
INPUT_NAME = "images"
OUTPUT_NAME = "logits"
DEFAULT_OPSET = 18
MIN_OPSET = 18


@dataclass(frozen=True)
class WeightCount:
    """Weight bookkeeping of one export: what the student holds and what the ONNX file holds."""

    student_params: int  # trainable parameters of the student (BN weight and bias included)
    expected_onnx: int  # student_params after BN folding (see expected_onnx_weight_count)
    onnx: int  # elements of the ONNX file's floating-point initializers
    folded_bn: int  # BatchNorm layers folded into the preceding convolution
    unfolded_bn: int  # BatchNorm layers kept as BatchNormalization nodes

    def as_dict(self) -> dict[str, int | bool]:
        """A JSON-ready form for the manifest."""
        return {
            "student_params": self.student_params,
            "expected_onnx_weights": self.expected_onnx,
            "onnx_weights": self.onnx,
            "bn_folded": self.folded_bn > 0 and self.unfolded_bn == 0,
            "folded_bn_layers": self.folded_bn,
            "unfolded_bn_layers": self.unfolded_bn,
        }


def strip_student(model: nn.Module) -> nn.Module:
    """Return the bare student in eval mode with gradients off.

    Accepts either the student itself or a distiller that holds it as `.student` (the ABF head,
    teacher and losses are left behind).
    """
    student = getattr(model, "student", model)
    if not isinstance(student, nn.Module):
        raise UsageError(f"expected a torch module to export, got {type(student).__name__}")
    student.eval()
    for param in student.parameters():
        param.requires_grad_(False)
    return student


def _probe_bn_folding(
    model: nn.Module, input_shape: tuple[int, int, int]
) -> list[tuple[nn.Module, bool, bool]]:
    """Return (bn, folded, conv_has_bias) for every BatchNorm the forward runs, in call order.

    One probe forward records which BatchNorm consumes exactly the output tensor of a
    convolution: the exporter folds those into the convolution.
    """
    # Holding each conv output keeps it alive, so its id() is not reused by a later tensor.
    conv_outputs: dict[int, tuple[nn.Module, torch.Tensor]] = {}
    seen: dict[int, tuple[nn.Module, bool, bool]] = {}

    def conv_hook(module: nn.Module, _inputs: Any, output: torch.Tensor) -> None:
        conv_outputs[id(output)] = (module, output)

    def bn_hook(module: nn.Module, inputs: tuple[torch.Tensor, ...], _output: Any) -> None:
        conv = conv_outputs.get(id(inputs[0]), (None, None))[0]
        has_bias = conv is not None and getattr(conv, "bias", None) is not None
        seen.setdefault(id(module), (module, conv is not None, has_bias))

    handles = [
        m.register_forward_hook(conv_hook if isinstance(m, nn.modules.conv._ConvNd) else bn_hook)
        for m in model.modules()
        if isinstance(m, nn.modules.conv._ConvNd | nn.modules.batchnorm._BatchNorm)
    ]
    try:
        with torch.no_grad():
            model(torch.zeros((1, *input_shape)))
    finally:
        for handle in handles:
            handle.remove()
    return list(seen.values())


def count_weights(model: nn.Module, input_shape: tuple[int, int, int]) -> tuple[int, int, int, int]:
    """Return (student params, expected ONNX weight elements, folded BNs, unfolded BNs).

    Folding a BatchNorm of C channels into the conv before it removes its weight and bias (2C)
    and adds a conv bias (C) where the conv had none. An unfolded BatchNorm keeps weight and bias
    and adds its running mean and variance (2C) as initializers.
    """
    params = sum(p.numel() for p in model.parameters())
    expected = params
    folded = unfolded = 0
    for bn, is_folded, conv_has_bias in _probe_bn_folding(model, input_shape):
        channels = int(bn.num_features)  # type: ignore[arg-type]
        affine = 2 * channels if bn.affine else 0  # type: ignore[attr-defined]
        if is_folded:
            folded += 1
            expected += -affine + (0 if conv_has_bias else channels)
        else:
            unfolded += 1
            expected += 2 * channels
    return params, expected, folded, unfolded


def onnx_weight_count(model: onnx.ModelProto) -> int:
    """Elements of the floating-point weights the graph's nodes use, counted once per use.

    Counting per use (through Identity nodes) keeps the count honest where the exporter stores
    two equal tensors once. Integer shape constants and scalars (a Pad value, an epsilon) are
    operator constants, not weights, and are left out.
    """
    floating = {onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE}
    sizes = {
        init.name: int(np.prod(init.dims))
        for init in model.graph.initializer
        if init.data_type in floating and len(init.dims) > 0
    }
    aliases = {n.output[0]: n.input[0] for n in model.graph.node if n.op_type == "Identity"}
    total = 0
    for node in model.graph.node:
        if node.op_type == "Identity":
            continue
        for name in node.input:
            while name in aliases:
                name = aliases[name]
            total += sizes.get(name, 0)
    return total


def load_onnx(path: str | os.PathLike[str], *, full_check: bool = False) -> onnx.ModelProto:
    """Load and check an ONNX file; a missing, truncated or invalid one is a one-line UsageError."""
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"{path}: no such ONNX file")
    try:
        model = onnx.load(str(path))
        onnx.checker.check_model(model, full_check=full_check)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as exc:
        raise UsageError(f"{path}: not a valid ONNX model ({str(exc).splitlines()[0]})") from exc
    except Exception as exc:  # protobuf's DecodeError and friends do not share a public base class
        raise UsageError(f"{path}: not a readable ONNX file ({type(exc).__name__}: {exc})") from exc
    return model


def set_metadata(model: onnx.ModelProto, metadata: dict[str, Any]) -> None:
    """Store `metadata` as JSON under METADATA_KEY, replacing an earlier value."""
    kept = [p for p in model.metadata_props if p.key != METADATA_KEY]
    del model.metadata_props[:]
    model.metadata_props.extend(kept)
    model.metadata_props.add(key=METADATA_KEY, value=json.dumps(metadata, sort_keys=True))


def get_metadata(model: onnx.ModelProto) -> dict[str, Any]:
    """Return the JSON stored under METADATA_KEY ({} if absent)."""
    for prop in model.metadata_props:
        if prop.key == METADATA_KEY:
            value = json.loads(prop.value)
            return value if isinstance(value, dict) else {}
    return {}


def sealed_bytes(model: onnx.ModelProto) -> bytes:
    """The model's bytes with ONNX_CONTENT_HASH_KEY in its metadata: the sha256 of all its other
    bytes (deploy.fileio.onnx_content_sha256), which `reviewkd predict` checks on a loose copy."""
    kept = [p for p in model.metadata_props if p.key != ONNX_CONTENT_HASH_KEY]
    del model.metadata_props[:]
    model.metadata_props.extend(kept)
    digest, _ = onnx_content_sha256(model.SerializeToString())
    model.metadata_props.add(key=ONNX_CONTENT_HASH_KEY, value=digest)
    data = model.SerializeToString()
    if onnx_content_sha256(data) != (digest, digest):
        raise RuntimeError("protobuf serialised the same model two ways; its content hash would not hold")
    return data


def save_onnx(model: onnx.ModelProto, path: str | os.PathLike[str]) -> None:
    """Check `model` fully and write it, sealed with its content hash, atomically: a failed check
    leaves no file behind."""
    onnx.checker.check_model(model, full_check=True)
    data = sealed_bytes(model)
    with atomic_output(path) as tmp:
        tmp.write_bytes(data)


def torch_export(
    model: nn.Module,
    input_shape: tuple[int, int, int],
    opset: int,
    output_names: Sequence[str] = (OUTPUT_NAME,),
) -> onnx.ModelProto:
    """Trace `model` (input INPUT_NAME, outputs `output_names`) to an ONNX ModelProto with a symbolic
    batch dimension on the input and every output.

    We use the TorchScript exporter (dynamo=False). It exists with the same arguments on every
    torch from 2.4 to 2.14 (the `dynamo` switch itself only from 2.5, hence the check), exports a
    CIFAR ResNet in about a second where the dynamo exporter takes two to three times as long, and
    folds BatchNorm into the convolutions in eval mode. The dynamo exporter on 2.4 is the separate,
    experimental dynamo_export, which we would not want to ship on.
    """
    kwargs: dict[str, Any] = {}
    if "dynamo" in inspect.signature(torch.onnx.export).parameters:
        kwargs["dynamo"] = False
    with tempfile.TemporaryDirectory(prefix="reviewkd-export-") as tmp, warnings.catch_warnings():
        # The legacy-exporter deprecation notice and tracer warnings are about choices made above.
        warnings.simplefilter("ignore")
        traced = str(Path(tmp) / "traced.onnx")
        with torch.no_grad():
            torch.onnx.export(
                model,
                (torch.zeros((1, *input_shape)),),
                traced,
                input_names=[INPUT_NAME],
                output_names=list(output_names),
                dynamic_axes={name: {0: "batch"} for name in (INPUT_NAME, *output_names)},
                opset_version=opset,
                do_constant_folding=True,
                **kwargs,
            )
        return onnx.load(traced)


# What `module_path` names a node outside every module scope (the exporter's own glue).
TOP_LEVEL = "(top level)"


def module_path(node_name: str) -> str:
    """The PyTorch module path in an exporter node name: "/layer1/layer1.0/conv1/Conv" -> "layer1.0.conv1".

    The TorchScript exporter writes one scope per module: its attribute name ("conv1"), or, for a
    container's child, the parent's scope and the child's name ("layer1.0" inside "layer1",
    "block.0.0" inside "block.0"). Names without scopes belong to the top level. A module called more
    than once keeps the exporter's call suffix: a detector's head, shared by every FPN level, gives
    "head.classification_head.conv.4" on the first level and "head.classification_head.conv.4_1" on
    the second, which says which level the error is made on.
    """
    parts = [p for p in node_name.split("/") if p][:-1]
    path: list[str] = []
    previous = ""
    for part in parts:
        path.append(part[len(previous) + 1 :] if previous and part.startswith(previous + ".") else part)
        previous = part
    return ".".join(path) or TOP_LEVEL


def optimize_onnx(model: onnx.ModelProto) -> onnx.ModelProto:
    """Constant folding and dead-node removal with onnxscript's optimizer; metadata is kept."""
    with optional_import("optimizing the ONNX graph"):
        import onnxscript.optimizer

    metadata = [(p.key, p.value) for p in model.metadata_props]
    optimized: onnx.ModelProto = onnxscript.optimizer.optimize(model)
    del optimized.metadata_props[:]
    for key, value in metadata:
        optimized.metadata_props.add(key=key, value=value)
    return optimized


def max_opset() -> int:
    """The newest opset this torch's exporter writes (torch 2.14: 23). torch keeps the number in a
    private module; where a torch lacks it, only DEFAULT_OPSET is known to work."""
    constants = optional_module("torch.onnx._constants")
    if constants is None:
        return DEFAULT_OPSET
    return int(getattr(constants, "ONNX_MAX_OPSET", DEFAULT_OPSET))


def check_opset(opset: int) -> None:
    """UsageError naming --opset unless this torch exports `opset` (MIN_OPSET to max_opset())."""
    if opset < MIN_OPSET:
        raise UsageError(f"--opset {opset}: export needs opset {MIN_OPSET} or newer")
    if opset > max_opset():
        raise UsageError(
            f"--opset {opset}: torch {torch.__version__} exports opsets {MIN_OPSET} to {max_opset()}"
        )


def export_fp32(
    model: nn.Module,
    path: str | os.PathLike[str],
    input_shape: tuple[int, int, int],
    metadata: dict[str, Any],
    *,
    opset: int = DEFAULT_OPSET,
) -> dict[str, Any]:
    """Export the stripped `model` to an fp32 ONNX file at `path` and return what was done.

    The returned dict holds the opset, exporter, node count and the weight bookkeeping
    (WeightCount.as_dict()). Raises UsageError if the ONNX file's weight count differs from the
    student's (after BN folding): that would mean something besides the student was exported.
    """
    check_opset(opset)
    student = strip_student(model)
    params, expected, folded, unfolded = count_weights(student, input_shape)
    traced = torch_export(student, input_shape, opset)
    # Counted before optimisation: the optimiser may legitimately drop an all-zero bias.
    counts = WeightCount(params, expected, onnx_weight_count(traced), folded, unfolded)
    proto = optimize_onnx(traced)
    proto.producer_name = "reviewkd"
    set_metadata(proto, {**metadata, "precision": "fp32"})
    if counts.onnx != counts.expected_onnx:
        raise UsageError(
            f"{path}: the ONNX graph holds {counts.onnx} weights, the student {counts.expected_onnx}"
            f" after folding {folded} BatchNorms; the exported graph is not the bare student"
        )
    save_onnx(proto, path)
    return {
        "opset": opset,
        "exporter": "torch.onnx (TorchScript)",
        "optimizer": "onnxscript",
        "nodes": len(proto.graph.node),
        **counts.as_dict(),
    }
