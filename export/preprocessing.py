"""The --bake-preprocessing variant: uint8 NHWC pixels in, normalisation inside the graph.

Cameras on edge devices hand over uint8 HWC frames; this file takes them directly, as input
"images" (N, H, W, C) uint8, and computes ((x / 255) - mean) / std in the graph in the same
order as torchvision's ToTensor and Normalize, so its logits match the fp32 file's.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import numpy as np
from onnx import TensorProto, helper, numpy_helper

from deploy.errors import UsageError
from export.onnx_export import INPUT_NAME, get_metadata, load_onnx, save_onnx, set_metadata

_NORMALISED = "reviewkd_normalised_images"


def bake_preprocessing(
    src: str | os.PathLike[str], dst: str | os.PathLike[str], mean: Sequence[float], std: Sequence[float]
) -> dict[str, Any]:
    """Write a copy of the ONNX file `src` that takes uint8 NHWC images and normalises them itself."""
    model = load_onnx(src)
    graph = model.graph
    channels = len(mean)
    if len(std) != channels or any(s <= 0 for s in std):
        raise UsageError(f"{src}: mean {list(mean)} and std {list(std)} must match and std be positive")
    old_input = next(i for i in graph.input if i.name == INPUT_NAME)
    dims = [d.dim_param or d.dim_value for d in old_input.type.tensor_type.shape.dim]
    if len(dims) != 4 or dims[1] != channels:
        raise UsageError(f"{src}: expected an NCHW input with {channels} channels, got {dims}")
    for node in graph.node:
        for index, name in enumerate(node.input):
            if name == INPUT_NAME:
                node.input[index] = _NORMALISED
    shape = (1, channels, 1, 1)
    graph.initializer.extend(
        [
            numpy_helper.from_array(np.array(255.0, dtype=np.float32), "reviewkd_255"),
            numpy_helper.from_array(np.asarray(mean, dtype=np.float32).reshape(shape), "reviewkd_mean"),
            numpy_helper.from_array(np.asarray(std, dtype=np.float32).reshape(shape), "reviewkd_std"),
        ]
    )
    prefix = [
        helper.make_node("Cast", [INPUT_NAME], ["reviewkd_f32"], to=TensorProto.FLOAT),
        helper.make_node("Transpose", ["reviewkd_f32"], ["reviewkd_nchw"], perm=[0, 3, 1, 2]),
        helper.make_node("Div", ["reviewkd_nchw", "reviewkd_255"], ["reviewkd_unit"]),
        helper.make_node("Sub", ["reviewkd_unit", "reviewkd_mean"], ["reviewkd_centred"]),
        helper.make_node("Div", ["reviewkd_centred", "reviewkd_std"], [_NORMALISED]),
    ]
    nodes = prefix + list(graph.node)
    del graph.node[:]
    graph.node.extend(nodes)
    new_input = helper.make_tensor_value_info(
        INPUT_NAME, TensorProto.UINT8, [dims[0], dims[2], dims[3], channels]
    )
    inputs = [new_input if i.name == INPUT_NAME else i for i in graph.input]
    del graph.input[:]
    graph.input.extend(inputs)
    metadata = get_metadata(model)
    input_block = {
        **metadata.get("input", {}),
        "layout": "NHWC",
        "dtype": "uint8",
        "normalised_in_graph": True,
    }
    set_metadata(model, {**metadata, "precision": "fp32", "input": input_block})
    save_onnx(model, dst)
    return {"input_layout": "NHWC", "input_dtype": "uint8", "normalised_in_graph": True}


def to_uint8_nhwc(
    images: np.ndarray, mean: Sequence[float], std: Sequence[float]
) -> tuple[np.ndarray, np.ndarray]:
    """Undo the normalisation of float NCHW `images`: return (uint8 NHWC, the float NCHW they give).

    Rounding to whole pixel values changes the images slightly, so the second array (the uint8
    pixels normalised again, as torchvision would) is the one to compute reference logits on.
    """
    shape = (1, len(mean), 1, 1)
    m = np.asarray(mean, dtype=np.float32).reshape(shape)
    s = np.asarray(std, dtype=np.float32).reshape(shape)
    pixels = np.clip(np.rint((images * s + m) * 255.0), 0, 255).astype(np.uint8)
    renormalised = ((pixels.astype(np.float32) / np.float32(255.0)) - m) / s
    return np.ascontiguousarray(pixels.transpose(0, 2, 3, 1)), renormalised.astype(np.float32)
