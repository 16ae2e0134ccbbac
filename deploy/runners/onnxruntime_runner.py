"""ONNX Runtime backend: one InferenceSession behind the runner contract.

onnxruntime is imported when a runner is built, not when this module is, so `deploy` imports on
a device that only has TensorRT. A GPU session is checked after it is created: a provider asked for
that did not load is an error (exit 3), never a silent CPU runner.

Every session this project opens on an ONNX file is opened by `open_session`, which takes its options
from `session_options` and the file's embedded manifest, read by ONNX Runtime itself from the
session's model metadata (never by importing onnx, which a serving device's cold start cannot afford):
an int8 file whose description sets UNFUSED_QDQ_KEY (export's
TensorRT flavour, with full 8-bit weights) runs its QuantizeLinear/DequantizeLinear pairs as the
float operations the file spells out, which is what TensorRT computes. ONNX Runtime would otherwise
fuse them into its integer kernels, which on x86 CPUs without VNNI (AVX2) add pairs of uint8 x int8
products into saturating int16s and lose accuracy with 8-bit weights (export/precision.py).
Measured with onnxruntime 1.32: `session.disable_quant_qdq` at ORT_ENABLE_ALL gives the same
logits, bit for bit, as ORT_DISABLE_ALL and keeps the float fusions (NCHWc convolutions);
ORT_ENABLE_BASIC does not: its level-1 rewrites already quantize float biases to int32 and give a
Relu's Q/DQ its producer's scale.
"""

from __future__ import annotations

import ctypes
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from deploy.errors import MissingDependencyError, UsageError
from deploy.fileio import parse_json
from deploy.formats import precision_from_filename
from deploy.install_targets import GPU_INSTALL_HINT
from deploy.manifest import check_embedded_manifest
from deploy.optional import optional_import
from deploy.runners.base import Runner

CPU_PROVIDER = "CPUExecutionProvider"
CUDA_PROVIDER = "CUDAExecutionProvider"
TENSORRT_PROVIDER = "TensorrtExecutionProvider"
# The order in which installed execution providers are listed.
PREFERRED_PROVIDERS: tuple[str, ...] = (TENSORRT_PROVIDER, CUDA_PROVIDER, CPU_PROVIDER)
GPU_PROVIDERS: frozenset[str] = frozenset({TENSORRT_PROVIDER, CUDA_PROVIDER})
# Options every session passes with each provider, always explicitly. TF32 convolutions and matrix
# products on Ampere and newer drift ~1e-3 from fp32, past the fp32 parity gate (1e-4).
PROVIDER_OPTIONS: dict[str, dict[str, str]] = {CUDA_PROVIDER: {"use_tf32": "0"}}
# The TensorRT libraries ONNX Runtime's TensorRT provider opens (10.x and 11.x, Linux and Windows).
_LIBNVINFER_NAMES = ("libnvinfer.so.10", "libnvinfer.so.11", "nvinfer_10.dll", "nvinfer_11.dll")
_CUDA_HINT = (
    "onnxruntime-gpu needs an NVIDIA driver, the CUDA and cuDNN versions its release names, and a GPU; "
    "fix that or pass --device cpu"
)

# The metadata_props key under which export stores the run's manifest as JSON.
METADATA_KEY = "reviewkd_manifest"
# In the embedded manifest's "int8" description: true when ONNX Runtime must run the file's Q/DQ
# pairs unfused (as float operations), never through its integer kernels. Export's flavours set it.
UNFUSED_QDQ_KEY = "onnxruntime_unfused_qdq"
# ONNX Runtime's session option that turns off its Q/DQ fusions (and only those).
_DISABLE_QDQ_FUSION = "session.disable_quant_qdq"
# ONNX Runtime's session option that lets idle intra-op threads spin (busy-wait) for the next task.
_ALLOW_SPINNING = "session.intra_op.allow_spinning"

_ORT_INPUT_TYPES: dict[str, type[np.floating[Any]]] = {
    "tensor(float)": np.float32,
    "tensor(float16)": np.float16,
}


def available_providers() -> list[str]:
    """Return the installed execution providers we use, most preferred first.

    Installed is not loadable: onnxruntime-gpu lists its CUDA and TensorRT providers whether or not
    the CUDA, cuDNN and TensorRT libraries they open are present.
    """
    with optional_import("ONNX Runtime"):
        import onnxruntime as ort

    installed = set(ort.get_available_providers())
    return [p for p in PREFERRED_PROVIDERS if p in installed]


def libnvinfer_loadable() -> bool:
    """Whether TensorRT's core library, which ONNX Runtime's TensorRT provider opens, loads here."""
    for name in _LIBNVINFER_NAMES:
        try:
            ctypes.CDLL(name)
        except OSError:
            continue
        return True
    return False


def providers_for_device(device: str, installed: list[str] | None = None) -> list[str]:
    """The execution providers for `device`: the CPU alone, or CUDA then the CPU for "cuda".

    ONNX Runtime's TensorRT provider is never chosen for a device: it builds its own engines,
    without the sidecar checks and TF32 rule of this project's TensorRT backend, and onnxruntime-gpu
    lists it even where TensorRT is missing. Ask for it by name to use it.
    MissingDependencyError when "cuda" is asked and the CUDA provider is not installed.
    """
    if device == "cpu":
        return [CPU_PROVIDER]
    if device != "cuda":
        raise UsageError(f"device: expected 'cpu' or 'cuda', got {device!r}")
    listed = available_providers() if installed is None else installed
    if CUDA_PROVIDER not in listed:
        raise MissingDependencyError(
            "onnxruntime has no CUDA execution provider; install onnxruntime-gpu on a machine with an NVIDIA"
            f" GPU: {GPU_INSTALL_HINT}"
        )
    return [CUDA_PROVIDER, CPU_PROVIDER]


def provider_options(provider: str, device_index: int = 0) -> dict[str, str]:
    """The options a session passes with `provider`: PROVIDER_OPTIONS, and the device for GPU providers."""
    options = dict(PROVIDER_OPTIONS.get(provider, {}))
    if provider in GPU_PROVIDERS:
        options["device_id"] = str(device_index)
    return options


def check_session_providers(
    path: Path, requested: list[str], loaded: list[str], options: dict[str, dict[str, str]]
) -> None:
    """Raise unless the session loaded every GPU provider asked for, with TF32 off on CUDA.

    ONNX Runtime does not fail when a provider cannot load: it logs a warning and runs on what is
    left (often the CPU alone), and when a provider fails while the session is created it re-creates
    the session on CUDA and the CPU without the options passed. Either would silently turn a GPU
    runner into a CPU one, or run CUDA with TF32 on.

    Raises:
        MissingDependencyError: a GPU provider asked for did not load.
        RuntimeError: the CUDA provider runs with TF32 on despite the options passed.
    """
    missing = [p for p in requested if p in GPU_PROVIDERS and p not in loaded]
    if missing:
        tensorrt_hint = (
            "TensorRT's libnvinfer must be on the library path; " if TENSORRT_PROVIDER in missing else ""
        )
        raise MissingDependencyError(
            f"{path}: onnxruntime could not load {', '.join(missing)} (the session has "
            f"{', '.join(loaded)}); {tensorrt_hint}{_CUDA_HINT}"
        )
    if CUDA_PROVIDER in loaded and options.get(CUDA_PROVIDER, {}).get("use_tf32") != "0":
        raise RuntimeError(f"{path}: onnxruntime's CUDA provider runs with TF32 on; the fp32 gate would fail")


def parse_embedded_manifest(
    metadata: Mapping[str, str], path: str | os.PathLike[str]
) -> dict[str, Any] | None:
    """The manifest export stored under METADATA_KEY in a model's metadata_props, or None if absent.

    UsageError naming `path` when the value is not a JSON object, or not a manifest that passes
    deploy.manifest.check_embedded_manifest (bounded sizes, printable unique class names, ...).
    """
    text = metadata.get(METADATA_KEY)
    if text is None:
        return None
    try:
        manifest = parse_json(text)
    except ValueError as exc:
        raise UsageError(f"{path}: metadata {METADATA_KEY!r} is not valid JSON ({exc})") from exc
    if not isinstance(manifest, dict):
        raise UsageError(f"{path}: metadata {METADATA_KEY!r} is not a JSON object")
    return check_embedded_manifest(manifest, str(path))


def runs_unfused(manifest: Mapping[str, Any] | None) -> bool:
    """Whether a file with this embedded manifest must run its Q/DQ pairs unfused (UNFUSED_QDQ_KEY)."""
    int8 = manifest.get("int8") if manifest else None
    return isinstance(int8, Mapping) and int8.get(UNFUSED_QDQ_KEY) is True


def runs_integer_kernels(manifest: Mapping[str, Any] | None) -> bool:
    """Whether ONNX Runtime computes this file through its fused integer kernels: an int8 file (its
    embedded manifest has an "int8" description) that does not ask to run unfused. Those kernels are
    the CPU provider's; the CUDA provider runs the same Q/DQ pairs as float operations, which is
    another computation (it does not saturate as AVX2's integer products do: export/precision.py)."""
    int8 = manifest.get("int8") if manifest else None
    return isinstance(int8, Mapping) and not runs_unfused(manifest)


def session_options(
    manifest: Mapping[str, Any] | None,
    threads: int | None = None,
    *,
    unfused: bool | None = None,
    spinning: bool = True,
) -> Any:
    """ONNX Runtime SessionOptions for a file with this embedded manifest: Q/DQ fusion off where
    `runs_unfused` says so, every other optimisation at its default; `threads` intra-op threads.
    `unfused` overrides the manifest (True: run any file with its Q/DQ semantics, as a measurement
    of what the quantization alone costs). `spinning` False stops idle intra-op threads from
    busy-waiting: the same results, without the CPU time spinning burns (export's checks)."""
    with optional_import("ONNX Runtime"):
        import onnxruntime as ort

    options = ort.SessionOptions()
    if threads is not None:
        options.intra_op_num_threads = threads
    if runs_unfused(manifest) if unfused is None else unfused:
        options.add_session_config_entry(_DISABLE_QDQ_FUSION, "1")
    if not spinning:
        options.add_session_config_entry(_ALLOW_SPINNING, "0")
    return options


def qdq_fusion_disabled(session: Any) -> bool:
    """Whether the ONNX Runtime `session` runs with its Q/DQ fusions turned off."""
    try:
        value = session.get_session_options().get_session_config_entry(_DISABLE_QDQ_FUSION)
    except Exception:  # onnxruntime raises its own Fail type when the entry was never set
        return False
    return bool(value == "1")


def open_session(
    path: str | os.PathLike[str],
    providers: list[str],
    *,
    threads: int | None = None,
    unfused: bool | None = None,
    device_index: int = 0,
    spinning: bool = True,
) -> tuple[Any, dict[str, Any] | None]:
    """Open an ONNX Runtime session on the file at `path`; return it and the file's embedded manifest.

    The manifest is read from the session's own model metadata, so opening a file never imports
    onnx. The Q/DQ fusion is a session option, fixed when the session is created: a file whose
    manifest says to run unfused (`runs_unfused`, or `unfused` overriding it as in
    `session_options`) is opened again with the fusion off when the first session had it on; every
    other file is opened once. Each session must have loaded the GPU providers asked for
    (`check_session_providers`); `device_index` is the CUDA device they run on; `threads` and
    `spinning` are `session_options`'.

    Raises:
        UsageError: ONNX Runtime cannot load the file, or its embedded manifest is not a JSON object.
        MissingDependencyError: a GPU provider asked for did not load.
    """
    with optional_import("ONNX Runtime"):
        import onnxruntime as ort

    file = Path(path)

    def create(options: Any) -> Any:
        try:
            session = ort.InferenceSession(
                str(file),
                sess_options=options,
                providers=providers,
                provider_options=[provider_options(p, device_index) for p in providers],
            )
        except Exception as exc:  # onnxruntime raises its own exception types, none shared
            first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise UsageError(f"{file}: cannot load as an ONNX model ({first_line})") from exc
        check_session_providers(file, providers, session.get_providers(), session.get_provider_options())
        return session

    session = create(session_options(None, threads, unfused=unfused, spinning=spinning))
    manifest = parse_embedded_manifest(session.get_modelmeta().custom_metadata_map, file)
    if unfused is None and runs_unfused(manifest):
        session = create(session_options(manifest, threads, spinning=spinning))
    return session, manifest


def session_device(session: Any) -> str:
    """"cuda" when the session's first provider is a GPU one (it runs there, bar the nodes that
    provider has no kernel for), else "cpu"."""
    providers = session.get_providers()
    return "cuda" if providers and providers[0] in GPU_PROVIDERS else "cpu"


def open_session_on(
    path: str | os.PathLike[str],
    device: str,
    *,
    threads: int | None = None,
    spinning: bool = True,
) -> tuple[Any, dict[str, Any] | None]:
    """`open_session` on `device`'s providers (`providers_for_device`: "cpu", or "cuda" then the CPU),
    computing what the file computes where it is deployed: a file ONNX Runtime runs through its
    integer kernels (`runs_integer_kernels`, the ONNX Runtime CPU int8 flavour) is opened on the CPU
    alone whatever `device` says, since on CUDA its Q/DQ pairs would run as float operations instead.
    Returns the session and the embedded manifest; `session.get_providers()` says where it runs.

    Raises as `open_session` does; MissingDependencyError for "cuda" without the CUDA provider.
    """
    session, manifest = open_session(path, providers_for_device(device), threads=threads, spinning=spinning)
    if device != "cpu" and runs_integer_kernels(manifest):
        session, manifest = open_session(path, [CPU_PROVIDER], threads=threads, spinning=spinning)
    return session, manifest


def _static_dim(dim: Any) -> int | None:
    """Return a fixed ONNX dimension as an int, or None for a symbolic or unknown one."""
    return dim if isinstance(dim, int) and dim > 0 else None


class OnnxRuntimeRunner(Runner):
    """Runs an ONNX classifier (input float32 (N, C, H, W), output logits) with ONNX Runtime.

    The input and output names, (C, H, W) and the batch range are read from the model: a
    symbolic batch dimension accepts any batch, a fixed one only that batch. `input_shape`
    supplies (C, H, W) for models whose spatial dimensions are symbolic. `providers` None means
    CUDA then the CPU where onnxruntime lists CUDA, else the CPU (see `providers_for_device`);
    a GPU provider asked for that does not load is a MissingDependencyError. `device_index` is the
    CUDA device the GPU providers run on, counted among the visible devices.
    """

    backend = "onnxruntime"

    def __init__(
        self,
        path: str | os.PathLike[str],
        providers: list[str] | None = None,
        threads: int | None = None,
        precision: str | None = None,
        input_shape: tuple[int, int, int] | None = None,
        device_index: int = 0,
    ) -> None:
        with optional_import("ONNX Runtime"):
            import onnxruntime as ort

        self.path = Path(path)
        if not self.path.is_file():
            raise UsageError(f"{self.path}: no such ONNX file")
        if threads is not None and threads < 1:
            raise UsageError(f"threads: expected a positive number, got {threads}")
        installed = ort.get_available_providers()
        if providers is None:
            providers = providers_for_device("cuda" if CUDA_PROVIDER in installed else "cpu", installed)
        missing = [p for p in providers if p not in installed]
        if missing:
            raise MissingDependencyError(
                f"onnxruntime {ort.__version__} lacks {', '.join(missing)}"
                f" (installed: {', '.join(installed)}); for CUDA and TensorRT"
                f" install onnxruntime-gpu: {GPU_INSTALL_HINT}"
            )
        if TENSORRT_PROVIDER in providers and not libnvinfer_loadable():
            raise MissingDependencyError(
                f"{TENSORRT_PROVIDER} was asked for, but TensorRT's libnvinfer does not load here"
                f" (tried {', '.join(_LIBNVINFER_NAMES)}); install TensorRT or ask for {CUDA_PROVIDER}"
            )
        session, _ = open_session(self.path, providers, threads=threads, device_index=device_index)
        self._session: Any = session
        self.threads = threads
        # True for a file that must run its Q/DQ pairs as float operations (UNFUSED_QDQ_KEY).
        self.unfused_qdq = qdq_fusion_disabled(session)
        self.providers: list[str] = list(session.get_providers())
        self.device = session_device(session)
        self.precision = precision or self._embedded_precision() or precision_from_filename(self.path)
        self._read_io(input_shape)

    def _read_io(self, input_shape: tuple[int, int, int] | None) -> None:
        """Take the input/output names, dtype, (C, H, W) and batch range from the session."""
        inputs = self._session.get_inputs()
        if len(inputs) != 1:
            names = ", ".join(i.name for i in inputs)
            raise UsageError(f"{self.path}: expected one image input, the model has {len(inputs)} ({names})")
        image_input = inputs[0]
        if image_input.type not in _ORT_INPUT_TYPES or len(image_input.shape) != 4:
            raise UsageError(
                f"{self.path}: input {image_input.name!r} is {image_input.type} {image_input.shape};"
                " expected a float (N, C, H, W) image batch"
            )
        self.input_name: str = image_input.name
        self._input_dtype = _ORT_INPUT_TYPES[image_input.type]
        batch, channels, height, width = (_static_dim(d) for d in image_input.shape)
        if channels is not None and height is not None and width is not None:
            model_shape = (channels, height, width)
            if input_shape is not None and tuple(input_shape) != model_shape:
                raise UsageError(
                    f"{self.path}: the model takes (C, H, W) = {model_shape},"
                    f" the manifest says {tuple(input_shape)}"
                )
            self.input_shape = model_shape
        elif input_shape is not None:
            self.input_shape = (int(input_shape[0]), int(input_shape[1]), int(input_shape[2]))
        else:
            raise UsageError(
                f"{self.path}: input {self.input_name!r} has symbolic dimensions {image_input.shape};"
                " pass input_shape=(C, H, W)"
            )
        if batch is not None:
            self.min_batch = self.max_batch = batch
        outputs = self._session.get_outputs()
        by_name = {o.name: o for o in outputs}
        self.output_names: tuple[str, ...] = tuple(by_name)
        if "logits" in by_name:
            self.output_name: str | None = "logits"
        elif len(outputs) == 1:
            self.output_name = outputs[0].name
        else:
            # Several outputs, none of them logits (a detector's four): read together by
            # infer_outputs, whose caller checks them against its task's contract.
            self.output_name = None
            return
        shape = by_name[self.output_name].shape
        self.output_width = _static_dim(shape[1]) if len(shape) == 2 else None

    @property
    def custom_metadata(self) -> dict[str, str]:
        """The model's metadata_props (export writes the manifest under METADATA_KEY)."""
        return dict(self._live_session().get_modelmeta().custom_metadata_map)

    def embedded_manifest(self) -> dict[str, Any] | None:
        """Return the manifest export stored in the model's metadata, or None if there is none."""
        return parse_embedded_manifest(self.custom_metadata, self.path)

    def _embedded_precision(self) -> str | None:
        manifest = self.embedded_manifest()
        precision = manifest.get("precision") if manifest else None
        return precision if isinstance(precision, str) else None

    def thread_settings(self) -> dict[str, int]:
        """The session's intra-op and inter-op thread counts as set (0: ONNX Runtime's default, one
        intra-op thread per physical core)."""
        options = self._live_session().get_session_options()
        return {"intra_op": int(options.intra_op_num_threads), "inter_op": int(options.inter_op_num_threads)}

    def _live_session(self) -> Any:
        if self._session is None:
            raise UsageError(f"{self.name} ({self.path}): used after close()")
        return self._session

    def _infer(self, images: np.ndarray) -> np.ndarray:
        session = self._live_session()
        feed = images if self._input_dtype is np.float32 else images.astype(self._input_dtype)
        if self.output_name is None:
            names = ", ".join(self.output_names)
            raise UsageError(f"{self.path}: several outputs ({names}) and none is named 'logits'")
        (logits,) = session.run([self.output_name], {self.input_name: feed})
        return np.asarray(logits, dtype=np.float32)

    def _infer_outputs(self, images: np.ndarray) -> dict[str, np.ndarray]:
        session = self._live_session()
        feed = images if self._input_dtype is np.float32 else images.astype(self._input_dtype)
        arrays = session.run(list(self.output_names), {self.input_name: feed})
        return {name: np.asarray(array) for name, array in zip(self.output_names, arrays, strict=True)}

    def close(self) -> None:
        """Drop the session; ONNX Runtime frees its memory with it."""
        self._session = None
