"""Helpers shared by the test modules: tiny real models, their ONNX files, run directories, runners.

Two families of tiny classifiers:
- `TinyNet` (conv, BN, ReLU, pool, linear) on a non-square INPUT_SHAPE, exported with torch's
  exporter, and `make_run`, which writes a run directory around it;
- `tiny_module` on TINY_INPUT_SHAPE, written node by node as ONNX by `export_tiny_onnx`, with
  numpy/torch runners and validation targets around it.
"""

from __future__ import annotations

import inspect
import json
import os
import socket
import subprocess
import sys
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper, numpy_helper
from PIL import Image
from torch import nn

from benchmarks.targets import Target
from deploy.errors import MissingDependencyError
from deploy.fileio import sha256_file
from deploy.gpu import GpuInfo
from deploy.manifest import new_manifest, read_manifest, record_artifact, write_manifest
from deploy.runners.base import Runner
from deploy.runners.onnxruntime_runner import METADATA_KEY, OnnxRuntimeRunner
from deploy.trt_sidecar import Sidecar, host_machine, host_os, profile_shapes, sidecar_path, write_sidecar
from export.onnx_export import sealed_bytes
from export.pipeline import tensorrt_status

REPO_ROOT = Path(__file__).resolve().parents[1]

# --- run directories around a TinyNet ----------------------------------------------------------------

INPUT_SHAPE = (3, 8, 10)
CLASSES = ["cat", "dog", "ship", "frog"]
MEAN = [0.5, 0.4, 0.3]
STD = [0.25, 0.2, 0.3]


class TinyNet(nn.Module):
    """conv -> BN -> ReLU -> global pool -> linear: every op an exporter and runtime must agree on."""

    def __init__(self, in_channels: int = 3, num_classes: int = len(CLASSES)) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, 6, 3, padding=1)
        self.bn = nn.BatchNorm2d(6)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(6, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.pool(torch.relu(self.bn(self.conv(x)))).flatten(1))


def tiny_net(seed: int = 0, in_channels: int = 3) -> TinyNet:
    """A TinyNet in eval mode with non-trivial BatchNorm statistics."""
    torch.manual_seed(seed)
    model = TinyNet(in_channels)
    with torch.no_grad():
        model.bn.running_mean.uniform_(-0.5, 0.5)
        model.bn.running_var.uniform_(0.5, 2.0)
    return model.eval()


def export_onnx(
    model: nn.Module,
    path: Path,
    input_shape: tuple[int, int, int] = INPUT_SHAPE,
    *,
    batch: int | None = None,
    dynamic_spatial: bool = False,
    metadata: dict[str, Any] | None = None,
) -> Path:
    """Export `model` with input "images" and output "logits"; batch None makes the batch dynamic."""
    axes: dict[str, dict[int, str]] = {}
    if batch is None:
        axes = {"images": {0: "batch"}, "logits": {0: "batch"}}
    if dynamic_spatial:
        axes.setdefault("images", {}).update({2: "height", 3: "width"})
    kwargs: dict[str, Any] = {}
    if "dynamo" in inspect.signature(torch.onnx.export).parameters:
        kwargs["dynamo"] = False  # the TorchScript exporter is much faster for a test-sized net
    path.parent.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # exporter deprecation and constant-folding notices
        torch.onnx.export(
            model,
            (torch.zeros(batch or 1, *input_shape),),
            str(path),
            input_names=["images"],
            output_names=["logits"],
            dynamic_axes=axes or None,
            opset_version=18,
            **kwargs,
        )
    if metadata is not None:
        proto = onnx.load(str(path))
        proto.metadata_props.add(key=METADATA_KEY, value=json.dumps(metadata))
        path.write_bytes(sealed_bytes(proto))  # as export writes it: with its content hash
    return path


def input_block(resize: int | None = None, shape: tuple[int, int, int] = INPUT_SHAPE) -> dict[str, Any]:
    """A manifest "input" block for `shape`."""
    channels = shape[0]
    return {
        "shape": list(shape),
        "layout": "NCHW",
        "dtype": "float32",
        "mean": MEAN[:channels],
        "std": STD[:channels],
        "resize": resize,
    }


def make_run(
    tmp_path: Path, model: nn.Module | None = None, resize: int | None = None
) -> tuple[Path, dict[str, Any]]:
    """Write a run directory holding export/student.onnx of `model` (a fresh tiny net by default)."""
    run = tmp_path / "run"
    model = model if model is not None else tiny_net()
    manifest = new_manifest()
    manifest["classes"] = list(CLASSES)
    manifest["input"] = input_block(resize)
    manifest["student"] = {"arch": "tiny_net", "num_classes": len(CLASSES)}
    export_onnx(model, run / "export" / "student.onnx", metadata={**manifest, "precision": "fp32"})
    record_artifact(run, manifest, "export/student.onnx", "onnx", precision="fp32")
    write_manifest(run, manifest)
    return run, manifest


def write_plan(
    path: Path,
    precision: str,
    max_batch: int,
    min_batch: int = 1,
    input_shape: tuple[int, int, int] = INPUT_SHAPE,
    output_names: tuple[str, ...] = ("logits",),
) -> Path:
    """Write stand-in plan bytes and a valid sidecar for them (no TensorRT here to build a real one)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"stand-in for a serialized TensorRT engine " + precision.encode())
    sidecar = Sidecar(
        plan_file=path.name,
        plan_sha256=sha256_file(path),
        tensorrt_version="10.13.0.35",
        gpu=GpuInfo("NVIDIA H100 80GB HBM3", (9, 0)),
        precision=precision,
        compatibility=None,
        strongly_typed=True,
        input_names=("images",),
        output_names=output_names,
        profile=profile_shapes(input_shape, min_batch, min(8, max_batch), max_batch),
        source_onnx=f"student.{precision}.onnx",
        source_onnx_sha256="0" * 64,
        machine=host_machine(),
        os=host_os(),
    )
    write_sidecar(sidecar_path(path), sidecar)
    return path


def random_batch(n: int, shape: tuple[int, ...] = INPUT_SHAPE, seed: int = 1) -> np.ndarray:
    """A float32 (n, *shape) batch of standard normal values."""
    return np.random.default_rng(seed).standard_normal((n, *shape)).astype(np.float32)


def write_image(path: Path, size: tuple[int, int], mode: str = "RGB", seed: int = 0) -> Path:
    """Write a random image of `size` (W, H) in `mode`; the suffix picks PNG or JPEG."""
    rng = np.random.default_rng(seed)
    channels = {"L": 1, "RGB": 3, "RGBA": 4}[mode]
    pixels = rng.integers(0, 256, (size[1], size[0], channels), dtype=np.uint8)
    Image.fromarray(pixels.squeeze(-1) if channels == 1 else pixels, mode).save(path)
    return path


def write_png_bomb(path: Path, width: int = 20000, height: int = 20000) -> Path:
    """A 60-byte PNG whose header claims `width` x `height` grey pixels (a decompression bomb)."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(b"\0"))
        + chunk(b"IEND", b"")
    )
    return path


def write_deep_image(path: Path, pixels: np.ndarray, mode: str) -> Path:
    """Save 8-bit grey `pixels` as a 16-bit ("I;16") PNG or a float ("F", 0-1) TIFF of the same picture."""
    if mode == "I;16":
        Image.fromarray(pixels.astype(np.uint16) * 257).save(path)
    else:
        Image.fromarray(pixels.astype(np.float32) / 255.0).save(path)
    return path


# --- tiny_module, its node-by-node ONNX file, runners and targets ---------------------------------

TINY_INPUT_SHAPE = (3, 8, 8)
TINY_NUM_CLASSES = 5


class ModuleRunner(Runner):
    """The torch reference: a small nn.Module run on the CPU in fp32."""

    backend = "torch"
    precision = "fp32"
    device = "cpu"

    def __init__(self, module: nn.Module, input_shape: tuple[int, int, int] = TINY_INPUT_SHAPE) -> None:
        self.module = module.eval()
        self.input_shape = input_shape
        self.closed = False

    def _infer(self, images: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            return self.module(torch.from_numpy(images)).numpy().astype(np.float32)

    def close(self) -> None:
        self.closed = True


class NumpyRunner(Runner):
    """A runner around a numpy function, with settable backend, precision and batch range."""

    def __init__(
        self,
        fn: Callable[[np.ndarray], np.ndarray],
        backend: str = "fake",
        precision: str = "fp32",
        input_shape: tuple[int, int, int] = TINY_INPUT_SHAPE,
        device: str = "cpu",
        min_batch: int = 1,
        max_batch: int | None = None,
    ) -> None:
        self.fn = fn
        self.backend = backend
        self.precision = precision
        self.input_shape = input_shape
        self.device = device
        self.min_batch = min_batch
        self.max_batch = max_batch
        self.calls: list[int] = []
        self.closed = False

    def _infer(self, images: np.ndarray) -> np.ndarray:
        self.calls.append(images.shape[0])
        return self.fn(images)

    def close(self) -> None:
        self.closed = True


def tiny_module(seed: int = 0) -> nn.Module:
    """Conv 3->4 (3x3, pad 1), ReLU, global average pool, linear 4->5."""
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(4, TINY_NUM_CLASSES),
    ).eval()


def export_tiny_onnx(module: nn.Module, path: Path) -> Path:
    """Write `module` (from tiny_module) as an ONNX graph built node by node, dynamic batch."""
    conv, linear = module[0], module[4]
    inits = [
        numpy_helper.from_array(conv.weight.detach().numpy(), "conv.weight"),
        numpy_helper.from_array(conv.bias.detach().numpy(), "conv.bias"),
        numpy_helper.from_array(linear.weight.detach().numpy(), "fc.weight"),
        numpy_helper.from_array(linear.bias.detach().numpy(), "fc.bias"),
    ]
    nodes = [
        helper.make_node("Conv", ["images", "conv.weight", "conv.bias"], ["c"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c"], ["r"]),
        helper.make_node("GlobalAveragePool", ["r"], ["p"]),
        helper.make_node("Flatten", ["p"], ["f"]),
        helper.make_node("Gemm", ["f", "fc.weight", "fc.bias"], ["logits"], transB=1),
    ]
    graph = helper.make_graph(
        nodes,
        "tiny",
        [helper.make_tensor_value_info("images", TensorProto.FLOAT, ["N", *TINY_INPUT_SHAPE])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", TINY_NUM_CLASSES])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 9
    onnx.checker.check_model(model, full_check=True)
    onnx.save(model, path)
    return path


def damage_onnx(src: Path, dst: Path, scale: float = 0.5) -> Path:
    """Copy an ONNX file with its first conv weight perturbed by seeded noise of `scale` x its std."""
    model = onnx.load(src)
    rng = np.random.default_rng(1)
    init = next(i for i in model.graph.initializer if len(i.dims) == 4)
    weight = numpy_helper.to_array(init)
    noisy = weight + scale * weight.std() * rng.standard_normal(weight.shape)
    init.CopyFrom(numpy_helper.from_array(noisy.astype(np.float32), init.name))
    onnx.save(model, dst)
    return dst


def image_batches(
    count: int = 48, batch: int = 16, seed: int = 0, labeller: nn.Module | None = None
) -> list[tuple[np.ndarray, np.ndarray]]:
    """Seeded random images; labels are the labeller's predictions with every 4th one shifted."""
    rng = np.random.default_rng(seed)
    images = rng.standard_normal((count, *TINY_INPUT_SHAPE)).astype(np.float32)
    if labeller is None:
        labels = rng.integers(0, TINY_NUM_CLASSES, count)
    else:
        with torch.inference_mode():
            labels = labeller(torch.from_numpy(images)).argmax(1).numpy()
        labels[::4] = (labels[::4] + 1) % TINY_NUM_CLASSES
    labels = labels.astype(np.int64)
    return [(images[i : i + batch], labels[i : i + batch]) for i in range(0, count, batch)]


def torch_target(module: nn.Module, key: str = "torch/fp32") -> Target:
    return Target(key, "fp32", lambda: ModuleRunner(module), file="student.safetensors", size_bytes=1234)


def onnx_target(path: Path, key: str = "onnxruntime/fp32", precision: str = "fp32") -> Target:
    return Target(
        key,
        precision,
        lambda: OnnxRuntimeRunner(path, providers=["CPUExecutionProvider"], threads=1, precision=precision),
        file=f"export/{path.name}",
        size_bytes=path.stat().st_size,
    )


def missing_tensorrt() -> Runner:
    raise MissingDependencyError("TensorRT is not installed; pip install 'reviewkd[cuda13]' on a GPU machine")


# --- the command line as a user runs it ------------------------------------------------------------


def run_reviewkd(*args: str | Path, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """Run `reviewkd ARGS...` as a real process of this interpreter; return its exit code and output."""
    return subprocess.run(
        [sys.executable, "-m", "reviewkd.app.cli", *map(str, args)],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now (for a process group's rendezvous)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def launch_ranks(
    *args: str | Path, world_size: int = 2, timeout: float = 300
) -> list[subprocess.CompletedProcess[str]]:
    """Run `reviewkd ARGS...` as torchrun would: world_size processes with RANK, LOCAL_RANK,
    WORLD_SIZE and a rendezvous address set (gloo on the CPU); each one's exit code and output."""
    port = free_port()
    procs = []
    for rank in range(world_size):
        env = {
            **os.environ,
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port),
            "WORLD_SIZE": str(world_size),
            "RANK": str(rank),
            "LOCAL_RANK": str(rank),
        }
        command = [sys.executable, "-m", "reviewkd.app.cli", *map(str, args)]
        procs.append(
            subprocess.Popen(
                command, cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
            )
        )
    done = []
    for proc in procs:
        stdout, stderr = proc.communicate(timeout=timeout)
        done.append(subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr))
    return done


def write_class_folders(folder: Path, classes: list[str], per_class: int = 3) -> Path:
    """An image folder for validation: `per_class` small random images under folder/<class>/."""
    for index, name in enumerate(classes):
        (folder / name).mkdir(parents=True, exist_ok=True)
        for seed in range(per_class):
            write_image(folder / name / f"{seed}.png", (12, 10), seed=100 * index + seed)
    return folder


def add_fp16_file(run: Path) -> Path:
    """Convert the run's export/student.onnx to export/student.fp16.onnx and record it."""
    from export.precision import convert_fp16

    convert_fp16(run / "export/student.onnx", run / "export/student.fp16.onnx")
    manifest = read_manifest(run)
    record_artifact(run, manifest, "export/student.fp16.onnx", "onnx", precision="fp16")
    write_manifest(run, manifest)
    return run / "export/student.fp16.onnx"


def add_int8_files(run: Path) -> dict[str, str]:
    """Quantize the run's export/student.onnx into both int8 flavours (min-max, on random images) and
    record them as export writes them; return {report key: run-relative path} of the two files."""
    from export.precision import quantize_int8

    calibration = [random_batch(16, seed=3)]
    manifest = read_manifest(run)
    written = {}
    for flavour, name, key in (
        ("cpu", "student.int8.onnx", "onnxruntime/int8"),
        ("trt", "student.int8.trt.onnx", "onnxruntime/int8-trt"),
    ):
        source, target = run / "export/student.onnx", run / "export" / name
        description = quantize_int8(source, target, calibration, flavour=flavour)
        record_artifact(run, manifest, f"export/{name}", "onnx", precision="int8", **description)
        written[key] = f"export/{name}"
    write_manifest(run, manifest)
    return written


def tensorrt_gpu_missing() -> str | None:
    """Why TensorRT engines cannot be built and run here, or None where TensorRT and a GPU are present."""
    ok, reason = tensorrt_status()
    return None if ok else reason


DETECTOR_CLASSES = ["zero", "one", "two"]
DETECTOR_INPUT_SHAPE = (3, 64, 96)


def tiny_detector(seed: int = 0) -> Any:
    """The small FCOS student, untrained, for 3 classes on 64x96 images. Its class bias starts at 0
    (not FCOS's prior of 0.01), so that every image gets a full K of detections, each level more
    candidates above the score threshold than torchvision's per-level cap: the post-processing
    works at its limits."""
    from reviewkd.detection.models import build_detector

    torch.manual_seed(seed)
    detector = build_detector(
        "fcos_small_student", len(DETECTOR_CLASSES), image_size=DETECTOR_INPUT_SHAPE[1:], anchor_scale=0.5
    )
    nn.init.zeros_(detector.model.get_submodule("head.classification_head.cls_logits").bias)
    return detector.eval()


# --- a tiny detection file: the four outputs of the detection contract, built node by node ---------

DETECTION_CLASSES = ["zero", "one", "two"]
DETECTION_INPUT_SHAPE = (3, 16, 24)
# The file's boxes (input pixels), classes and score offsets; every image gets the first
# DETECTION_COUNT of the DETECTION_TOP_K rows, the rest are zero padding.
DETECTION_BOXES = [[2.0, 3.0, 10.0, 12.0], [12.0, 1.0, 22.0, 15.0], [0.0, 0.0, 0.0, 0.0]]
DETECTION_CLASS_INDICES = [2, 0, 0]
DETECTION_SCORE_OFFSETS = [2.0, 0.5, 0.0]
DETECTION_COUNT = 2
DETECTION_TOP_K = 3


def write_detection_onnx(
    path: Path, metadata: dict[str, Any] | None = None, count: int = DETECTION_COUNT
) -> Path:
    """A detection ONNX file with dynamic batch: input "images" float32 [N, *DETECTION_INPUT_SHAPE];
    outputs num_detections int32 [N, 1] (`count`), detection_boxes float32 [N, K, 4] (DETECTION_BOXES),
    detection_scores float32 [N, K] (sigmoid of the image's mean pixel plus DETECTION_SCORE_OFFSETS, so
    scores follow the image and stay best first), detection_classes int32 [N, K]. The manifest
    `metadata` goes into its metadata as export writes it."""
    k = DETECTION_TOP_K
    inits = [
        numpy_helper.from_array(np.array([[count]], dtype=np.int32), "count"),
        numpy_helper.from_array(np.array([DETECTION_BOXES], dtype=np.float32), "boxes"),
        numpy_helper.from_array(np.array([DETECTION_SCORE_OFFSETS], dtype=np.float32), "offsets"),
        numpy_helper.from_array(np.array([DETECTION_CLASS_INDICES], dtype=np.int32), "classes"),
        numpy_helper.from_array(np.array([0], dtype=np.int64), "zero"),
        numpy_helper.from_array(np.array([1], dtype=np.int64), "one"),
        numpy_helper.from_array(np.array([1], dtype=np.int64), "tail_one"),
        numpy_helper.from_array(np.array([k], dtype=np.int64), "tail_k"),
        numpy_helper.from_array(np.array([k, 4], dtype=np.int64), "tail_k4"),
        numpy_helper.from_array(np.array([1, 2, 3], dtype=np.int64), "pixel_axes"),
    ]
    nodes = [
        helper.make_node("Shape", ["images"], ["shape"]),
        helper.make_node("Slice", ["shape", "zero", "one"], ["batch"]),
        helper.make_node("Concat", ["batch", "tail_one"], ["shape_n1"], axis=0),
        helper.make_node("Concat", ["batch", "tail_k"], ["shape_nk"], axis=0),
        helper.make_node("Concat", ["batch", "tail_k4"], ["shape_nk4"], axis=0),
        helper.make_node("Expand", ["count", "shape_n1"], ["num_detections"]),
        helper.make_node("Expand", ["boxes", "shape_nk4"], ["detection_boxes"]),
        helper.make_node("Expand", ["classes", "shape_nk"], ["detection_classes"]),
        helper.make_node("ReduceMean", ["images", "pixel_axes"], ["mean"], keepdims=0),
        helper.make_node("Unsqueeze", ["mean", "one"], ["mean_n1"]),
        helper.make_node("Add", ["mean_n1", "offsets"], ["raw_scores"]),
        helper.make_node("Sigmoid", ["raw_scores"], ["detection_scores"]),
    ]
    outputs = [
        helper.make_tensor_value_info("num_detections", TensorProto.INT32, ["N", 1]),
        helper.make_tensor_value_info("detection_boxes", TensorProto.FLOAT, ["N", k, 4]),
        helper.make_tensor_value_info("detection_scores", TensorProto.FLOAT, ["N", k]),
        helper.make_tensor_value_info("detection_classes", TensorProto.INT32, ["N", k]),
    ]
    graph = helper.make_graph(
        nodes,
        "tiny_detector",
        [helper.make_tensor_value_info("images", TensorProto.FLOAT, ["N", *DETECTION_INPUT_SHAPE])],
        outputs,
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 9
    onnx.checker.check_model(model, full_check=True)
    if metadata is not None:
        model.metadata_props.add(key=METADATA_KEY, value=json.dumps(metadata))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(sealed_bytes(model))
    return path


def make_detection_run(tmp_path: Path, resize: int | None = None, count: int = DETECTION_COUNT) -> Path:
    """A detection run directory holding export/student.onnx from `write_detection_onnx`, recorded
    as export records it; RGB 0-1 input as detection training writes it."""
    run = tmp_path / "detection_run"
    manifest = new_manifest()
    manifest["task"] = "detection"
    manifest["classes"] = list(DETECTION_CLASSES)
    manifest["input"] = {
        "shape": list(DETECTION_INPUT_SHAPE),
        "layout": "NCHW",
        "dtype": "float32",
        "mean": [0.0, 0.0, 0.0],
        "std": [1.0, 1.0, 1.0],
        "resize": resize,
    }
    manifest["student"] = {"arch": "fcos_small_student", "num_classes": len(DETECTION_CLASSES)}
    manifest["detection"] = {"max_detections": DETECTION_TOP_K, "score_threshold": 0.05, "iou_threshold": 0.5}
    write_detection_onnx(run / "export/student.onnx", {**manifest, "precision": "fp32"}, count)
    record_artifact(run, manifest, "export/student.onnx", "onnx", precision="fp32")
    write_manifest(run, manifest)
    return run


class _SessionAsIfOn:
    """A real CPU session that reports the providers it was asked for."""

    def __init__(self, session: Any, providers: list[str]) -> None:
        self._session, self._providers = session, providers

    def get_providers(self) -> list[str]:
        return self._providers

    def __getattr__(self, name: str) -> Any:
        return getattr(self._session, name)


def sessions_as_if_on_gpu(monkeypatch: Any) -> list[tuple[str | None, list[str]]]:
    """Make ONNX Runtime look as if its CUDA provider were installed, and record every session
    deploy.runners.onnxruntime_runner.open_session opens: (the file's embedded int8 flavour, None for
    a float file; the providers asked for). Each session really opens on the CPU (no GPU here) and
    reports the providers it was asked for, as a CUDA session would. Returns the live record."""
    from deploy.runners import onnxruntime_runner
    from deploy.runners.onnxruntime_runner import CPU_PROVIDER, CUDA_PROVIDER

    opened: list[tuple[str | None, list[str]]] = []
    real_open = onnxruntime_runner.open_session

    def open_as_if(path: Any, providers: list[str], **options: Any) -> Any:
        session, embedded = real_open(path, [CPU_PROVIDER], **options)
        opened.append(((embedded or {}).get("int8", {}).get("flavour"), providers))
        return _SessionAsIfOn(session, providers), embedded

    monkeypatch.setattr(onnxruntime_runner, "open_session", open_as_if)
    monkeypatch.setattr(onnxruntime_runner, "available_providers", lambda: [CUDA_PROVIDER, CPU_PROVIDER])
    return opened
