"""Build a TensorRT engine (`.plan` + `.plan.json` sidecar) from one of the exported ONNX files.

The precision lives in the ONNX file (docs/METHOD.md section 6): fp32, fp16 compute with fp32 I/O, or
symmetric int8 Q/DQ. On TensorRT 10.12+ and 11 the network is strongly typed, so TensorRT builds
exactly what the file says; older 10.x builds weakly typed with only the builder flag the file's
precision needs (Q/DQ carries its own scales, so int8 needs no calibrator). The plan is written
plain, as trtexec and Triton expect, and everything about it goes into the sidecar.
"""

from __future__ import annotations

import datetime as dt
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import onnx
from google.protobuf.message import DecodeError
from onnx import numpy_helper

from deploy.errors import UsageError
from deploy.fileio import atomic_output, sha256_file
from deploy.optional import optional_import
from deploy.trt_sidecar import (
    AMPERE_COMPUTE_CAPABILITY,
    COMPATIBILITY_MODES,
    PLUGIN_SUFFIX,
    PRECISIONS,
    DlaSettings,
    Sidecar,
    host_machine,
    host_os,
    parse_version,
    profile_shapes,
    register_tensorrt_plugins,
    require_tensorrt_and_gpu,
    sidecar_path,
    start_tensorrt,
    uses_strong_typing,
    write_sidecar,
)

if TYPE_CHECKING:
    import onnx
    import tensorrt as trt

INPUT_NAME = "images"
# ONNX ops of the "QOperator" quantisation format, which TensorRT does not parse: it needs Q/DQ.
_QOPERATOR_OPS = {"QLinearConv", "QLinearMatMul", "ConvInteger", "MatMulInteger", "QLinearAdd", "QLinearMul"}


@dataclass(frozen=True)
class OnnxSummary:
    """What the builder needs to know about an ONNX file before TensorRT sees it."""

    input_name: str
    input_chw: tuple[int, int, int]
    fixed_batch: int | None  # the batch dimension when the file fixes it; None when dynamic
    output_names: tuple[str, ...]
    precision: str
    fp16_layers: bool = False  # an int8 file whose layers kept out of int8 compute in fp16
    plugins: tuple[str, ...] = ()  # TensorRT plugin layers the file uses (a detector's EfficientNMS_TRT)


def onnx_precision(model: onnx.ModelProto, source: str = "model") -> str:
    """The precision an ONNX graph computes in: "int8" (Q/DQ), "fp16" or "fp32".

    Raises UsageError for int8 forms TensorRT cannot build: the QOperator format, and Q/DQ with
    uint8 or non-zero zero points (TensorRT accepts symmetric int8 only).
    """
    graph = model.graph
    initializers = {init.name: init for init in graph.initializer}
    op_types = {node.op_type for node in graph.node}
    qoperator = sorted(op_types & _QOPERATOR_OPS)
    if qoperator:
        raise UsageError(
            f"{source}: uses the QOperator int8 format ({', '.join(qoperator)}), which TensorRT "
            "cannot build; use the symmetric int8 Q/DQ file"
        )
    quantizers = [node for node in graph.node if node.op_type == "QuantizeLinear"]
    if quantizers or "DequantizeLinear" in op_types:
        for node in quantizers:
            zero_point = initializers.get(node.input[2]) if len(node.input) > 2 and node.input[2] else None
            output_dtype = next((a.i for a in node.attribute if a.name == "output_dtype"), 0)
            # Without a zero point, QuantizeLinear yields uint8 unless output_dtype says otherwise.
            default_type = output_dtype or onnx.TensorProto.UINT8
            elem_type = zero_point.data_type if zero_point is not None else default_type
            if elem_type != onnx.TensorProto.INT8:
                raise UsageError(
                    f"{source}: QuantizeLinear {node.name or node.output[0]!r} quantises to "
                    f"{onnx.TensorProto.DataType.Name(elem_type)}; TensorRT needs symmetric int8 Q/DQ "
                    "(int8, zero point 0): use the TensorRT int8 file"
                )
            if zero_point is not None and numpy_helper.to_array(zero_point).any():
                raise UsageError(
                    f"{source}: QuantizeLinear {node.name or node.output[0]!r} has a non-zero zero point; "
                    "TensorRT needs symmetric int8 Q/DQ"
                )
        return "int8"
    return "fp16" if computes_in_fp16(model) else "fp32"


def tensorrt_plugins(model: onnx.ModelProto) -> tuple[str, ...]:
    """The TensorRT plugin layers a graph uses (nodes named like TensorRT's plugin library's,
    "<name>_TRT"), sorted: TensorRT's ONNX parser builds each as that plugin."""
    return tuple(sorted({node.op_type for node in model.graph.node if node.op_type.endswith(PLUGIN_SUFFIX)}))


def computes_in_fp16(model: onnx.ModelProto) -> bool:
    """Whether some of the graph computes in fp16: a Cast to float16 or a float16 initializer."""
    fp16 = onnx.TensorProto.FLOAT16
    casts_to_fp16 = any(
        node.op_type == "Cast" and any(a.name == "to" and a.i == fp16 for a in node.attribute)
        for node in model.graph.node
    )
    return casts_to_fp16 or any(init.data_type == fp16 for init in model.graph.initializer)


def inspect_onnx(onnx_path: str | os.PathLike[str]) -> OnnxSummary:
    """Read an ONNX file's input "images" (N, C, H, W), its outputs and its precision; UsageError if unfit."""
    path = Path(onnx_path)
    if not path.is_file():
        raise UsageError(f"{path}: ONNX file not found")
    try:
        # Weights stay out: only the graph's structure and small initializers (zero points) matter here.
        model = onnx.load(str(path), load_external_data=False)
    except (DecodeError, OSError, ValueError) as exc:
        raise UsageError(f"{path}: not a readable ONNX file ({exc})") from None
    graph = model.graph
    initializer_names = {init.name for init in graph.initializer}
    inputs = [value for value in graph.input if value.name not in initializer_names]
    by_name = {value.name: value for value in inputs}
    if INPUT_NAME not in by_name or len(inputs) != 1:
        raise UsageError(
            f"{path}: expected one input named {INPUT_NAME!r}, found {[value.name for value in inputs]}"
        )
    tensor_type = by_name[INPUT_NAME].type.tensor_type
    if tensor_type.elem_type != onnx.TensorProto.FLOAT:
        raise UsageError(
            f"{path}: input {INPUT_NAME!r} must be float32, got "
            f"{onnx.TensorProto.DataType.Name(tensor_type.elem_type)}"
        )
    dims = list(tensor_type.shape.dim)
    if len(dims) != 4:
        raise UsageError(f"{path}: input {INPUT_NAME!r} must be 4-D (N, C, H, W), got {len(dims)} dimensions")
    chw = tuple(d.dim_value if d.HasField("dim_value") else 0 for d in dims[1:])
    if not all(d > 0 for d in chw):
        shape = [d.dim_value if d.HasField("dim_value") else d.dim_param or "?" for d in dims]
        raise UsageError(f"{path}: input {INPUT_NAME!r} needs fixed C, H, W, got {shape}")
    batch_dim = dims[0]
    fixed_batch = batch_dim.dim_value if batch_dim.HasField("dim_value") and batch_dim.dim_value > 0 else None
    outputs = tuple(value.name for value in graph.output)
    if not outputs:
        raise UsageError(f"{path}: the graph has no outputs")
    return OnnxSummary(
        input_name=INPUT_NAME,
        input_chw=(int(chw[0]), int(chw[1]), int(chw[2])),
        fixed_batch=fixed_batch,
        output_names=outputs,
        precision=(precision := onnx_precision(model, str(path))),
        fp16_layers=precision == "int8" and computes_in_fp16(model),
        plugins=tensorrt_plugins(model),
    )


def weak_typing_flags(precision: str, fp16_layers: bool = False) -> tuple[str, ...]:
    """BuilderFlag names a weakly typed build (TensorRT < 10.12) needs for an ONNX file's precision;
    an int8 file whose float layers are fp16 (mixed precision's TensorRT file) also needs FP16."""
    flags = {"fp32": (), "fp16": ("FP16",), "int8": ("INT8",)}[precision]
    return (*flags, "FP16") if precision == "int8" and fp16_layers else flags


def apply_builder_flags(
    config: trt.IBuilderConfig,
    precision: str,
    *,
    strongly_typed: bool,
    compatibility: str | None,
    dla: DlaSettings | None = None,
    fp16_layers: bool = False,
) -> tuple[list[str], list[str]]:
    """Set the builder flags for the file's precision (and `fp16_layers`, see weak_typing_flags), the
    compatibility mode and the DLA; return the names of the flags set and of those cleared.

    TF32 is on by default in every TensorRT builder and is cleared here for every engine: with it,
    fp32 convolutions and matrix products round their inputs to 10-bit mantissas and drift about
    1e-3 from fp32, past the fp32 gate (max |diff| <= 1e-4). The fp32 tensors of an fp16 or int8
    file stay fp32 for the same reason: the file, not the builder, says what computes in what.
    A DLA build makes the DLA core the default device for every layer; with GPU fallback, layers the
    DLA cannot run go to the GPU instead of failing the build.
    """
    with optional_import("building a TensorRT engine"):
        import tensorrt as trt

    set_flags: list[str] = []
    cleared: list[str] = []
    config.clear_flag(trt.BuilderFlag.TF32)
    cleared.append("TF32")
    if not strongly_typed:
        for name in weak_typing_flags(precision, fp16_layers):
            config.set_flag(trt.BuilderFlag.FP16 if name == "FP16" else trt.BuilderFlag.INT8)
            set_flags.append(name)
    if compatibility == "version":
        config.set_flag(trt.BuilderFlag.VERSION_COMPATIBLE)
        set_flags.append("VERSION_COMPATIBLE")
    elif compatibility == "hardware":
        config.hardware_compatibility_level = trt.HardwareCompatibilityLevel.AMPERE_PLUS
    if dla is not None:
        config.default_device_type = trt.DeviceType.DLA
        config.DLA_core = dla.core
        if dla.gpu_fallback:
            config.set_flag(trt.BuilderFlag.GPU_FALLBACK)
            set_flags.append("GPU_FALLBACK")
    return set_flags, cleared


def check_dla_request(
    dla_core: int | None, precision: str, compatibility: str | None, batches: tuple[int, int, int] = (1, 1, 1)
) -> None:
    """UsageError for a DLA request that cannot build, before TensorRT is loaded.

    The DLA computes in fp16 and int8 only (an fp32 file would run wholly on the GPU), a
    hardware-compatible plan is a GPU-only form, and the DLA runs static shapes only: the batch
    profile (`batches`: min, opt, max) must be one size, which the sidecar then records. A dynamic
    profile would put every layer on the GPU (with fallback) while the sidecar said DLA, or fail.
    """
    if dla_core is None:
        return
    if isinstance(dla_core, bool) or not isinstance(dla_core, int) or dla_core < 0:
        raise UsageError(f"--dla-core: expected a DLA core number (0, 1, ...), got {dla_core!r}")
    if precision == "fp32":
        raise UsageError(
            "--dla-core: the DLA computes in fp16 and int8 only; build it from the fp16 or int8 ONNX file"
        )
    if compatibility == "hardware":
        raise UsageError(
            "--dla-core: a hardware-compatible plan runs on GPUs only; drop --trt-compat hardware"
        )
    if len(set(batches)) != 1:
        size = batches[1]
        raise UsageError(
            f"--dla-core: the DLA runs one static batch size, not the profile {','.join(map(str, batches))};"
            f" give one, e.g. --trt-batch {size},{size},{size}"
        )


def describe_parser_error(error: Any) -> str:
    """One line for a `tensorrt.ParserError`: the failing node (index, name, op) and the description."""
    node = error.node()
    if node < 0:
        return str(error.desc())
    name = error.node_name() or "?"
    return f"node {node} ({name}, {error.node_operator()}): {error.desc()}"


def _collecting_logger(verbose: bool) -> tuple[trt.ILogger, list[str]]:
    """A TensorRT logger that prints warnings (everything when verbose) and keeps the errors."""
    with optional_import("building a TensorRT engine"):
        import tensorrt as trt

    errors: list[str] = []
    threshold = trt.ILogger.Severity.VERBOSE if verbose else trt.ILogger.Severity.WARNING

    class Logger(trt.ILogger):
        def __init__(self) -> None:
            trt.ILogger.__init__(self)

        def log(self, severity: trt.ILogger.Severity, msg: str) -> None:
            if severity <= trt.ILogger.Severity.ERROR:
                errors.append(msg)
            if severity <= threshold:
                print(f"[TensorRT] {severity.name}: {msg}", file=sys.stderr)

    return Logger(), errors


def _network_flags(tensorrt_version: str) -> int:
    with optional_import("building a TensorRT engine"):
        import tensorrt as trt

    if parse_version(tensorrt_version)[0] >= 11:
        # TensorRT 11 builds every network strongly typed; its STRONGLY_TYPED flag is deprecated and ignored.
        return 0
    if uses_strong_typing(tensorrt_version):
        return 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    return 0


def _load_timing_cache(config: trt.IBuilderConfig, cache_path: Path | None) -> None:
    """Attach a timing cache to `config`, seeded from `cache_path` when it holds a usable one."""
    seed = cache_path.read_bytes() if cache_path is not None and cache_path.is_file() else b""
    if seed:
        cache = config.create_timing_cache(seed)
        # TensorRT refuses a cache from another GPU or version, and cannot read a corrupt one.
        if cache is not None and config.set_timing_cache(cache, False):
            return
        print(f"[TensorRT] timing cache {cache_path} is unusable here; starting a new one", file=sys.stderr)
    config.set_timing_cache(config.create_timing_cache(b""), False)


def build_engine(
    onnx_path: str | os.PathLike[str],
    plan_path: str | os.PathLike[str],
    *,
    min_batch: int = 1,
    opt_batch: int = 8,
    max_batch: int = 32,
    workspace_mib: int = 1024,
    timing_cache: str | os.PathLike[str] | None = None,
    optimization_level: int = 3,
    compatibility: str | None = None,
    precision: str | None = None,
    dla_core: int | None = None,
    gpu_fallback: bool = True,
    verbose: bool = False,
) -> dict[str, Any]:
    """Build a TensorRT engine from `onnx_path`, write `plan_path` and its sidecar, return the sidecar.

    Args:
        onnx_path: an exported ONNX file with input "images" (N, C, H, W) float32.
        plan_path: where the plain serialized engine goes; the sidecar is `<plan_path>.json`.
        min_batch, opt_batch, max_batch: the one optimisation profile on "images".
        workspace_mib: the builder's workspace memory pool limit.
        timing_cache: a timing cache file, read if present and written back after the build.
        optimization_level: builder optimisation level, 0 (fast build) to 5 (slowest, best).
        compatibility: None, "version" (runs on later TensorRT of the same major version) or
            "hardware" (runs on any Ampere or newer GPU).
        precision: the precision the caller expects; None takes it from the file. A mismatch is a
            UsageError, since the file decides what gets built.
        dla_core: build for this DLA core of a Jetson (fp16 and int8 files only); None: the GPU.
        gpu_fallback: with `dla_core`, let layers the DLA cannot run fall back to the GPU.
        verbose: print TensorRT's verbose log.

    Raises:
        UsageError: a bad argument, an unreadable or unfit ONNX file, a parser or build failure.
        MissingDependencyError: TensorRT or a GPU is missing (nothing is written then).
    """
    onnx_file, plan_file = Path(onnx_path), Path(plan_path)
    if compatibility is not None and compatibility not in COMPATIBILITY_MODES:
        raise UsageError(f"compatibility must be None, 'version' or 'hardware', got {compatibility!r}")
    if precision is not None and precision not in PRECISIONS:
        raise UsageError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    if not 0 <= optimization_level <= 5:
        raise UsageError(f"optimization level must be 0..5, got {optimization_level}")
    if workspace_mib < 1:
        raise UsageError(f"workspace must be at least 1 MiB, got {workspace_mib}")
    summary = inspect_onnx(onnx_file)
    if precision is not None and precision != summary.precision:
        raise UsageError(f"{onnx_file}: holds a {summary.precision} graph, not {precision}")
    check_dla_request(dla_core, summary.precision, compatibility, (min_batch, opt_batch, max_batch))
    profile = profile_shapes(summary.input_chw, min_batch, opt_batch, max_batch)
    if summary.fixed_batch is not None and not min_batch == max_batch == summary.fixed_batch:
        raise UsageError(
            f"{onnx_file}: the batch dimension is fixed at {summary.fixed_batch}, so the profile must be "
            f"{summary.fixed_batch}..{summary.fixed_batch}; export the ONNX file with a dynamic batch"
        )
    gpu = require_tensorrt_and_gpu("building a TensorRT engine")
    if compatibility == "hardware" and gpu.compute_capability < AMPERE_COMPUTE_CAPABILITY:
        raise UsageError(
            f"hardware-compatible engines must be built on an Ampere or newer GPU; {gpu.name} has "
            f"compute capability {gpu.cc}"
        )

    with optional_import("building a TensorRT engine"):
        import tensorrt as trt

    version = trt.__version__
    strongly_typed = uses_strong_typing(version)
    logger, errors = _collecting_logger(verbose)
    builder = start_tensorrt(trt.Builder, logger, "trt.Builder", version)
    register_tensorrt_plugins(trt.init_libnvinfer_plugins, logger, summary.plugins, str(onnx_file))
    network = builder.create_network(_network_flags(version))
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_file)):
        details = "; ".join(describe_parser_error(parser.get_error(i)) for i in range(parser.num_errors))
        raise UsageError(f"{onnx_file}: TensorRT's ONNX parser failed: {details or '; '.join(errors)}")

    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace_mib << 20)
    config.builder_optimization_level = optimization_level
    dla = None if dla_core is None else DlaSettings(core=dla_core, gpu_fallback=gpu_fallback)
    if dla is not None and dla.core >= builder.num_DLA_cores:
        raise UsageError(
            f"--dla-core {dla.core}: this device has {builder.num_DLA_cores} DLA core(s) "
            "(DLA cores exist on Jetson and DRIVE SoCs, with TensorRT 10)"
        )
    flags, cleared = apply_builder_flags(
        config,
        summary.precision,
        strongly_typed=strongly_typed,
        compatibility=compatibility,
        dla=dla,
        fp16_layers=summary.fp16_layers,
    )
    cache_file = Path(timing_cache) if timing_cache is not None else None
    _load_timing_cache(config, cache_file)

    trt_profile = builder.create_optimization_profile()
    low, opt, high = (trt.Dims(list(shape)) for shape in (profile.min, profile.opt, profile.max))
    trt_profile.set_shape(summary.input_name, low, opt, high)
    config.add_optimization_profile(trt_profile)

    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise UsageError(
            f"{onnx_file}: TensorRT could not build an engine: {'; '.join(errors) or 'see the log above'}"
        )
    if cache_file is not None:
        with atomic_output(cache_file) as tmp:
            tmp.write_bytes(config.get_timing_cache().serialize())

    with atomic_output(plan_file) as tmp_plan:
        tmp_plan.write_bytes(serialized)
        sidecar = Sidecar(
            plan_file=plan_file.name,
            plan_sha256=sha256_file(tmp_plan),
            tensorrt_version=version,
            gpu=gpu,
            precision=summary.precision,
            compatibility=compatibility,
            strongly_typed=strongly_typed,
            input_names=(summary.input_name,),
            output_names=summary.output_names,
            profile=profile,
            source_onnx=onnx_file.name,
            source_onnx_sha256=sha256_file(onnx_file),
            machine=host_machine(),
            os=host_os(),
            dla=dla,
            build={
                "workspace_mib": workspace_mib,
                "optimization_level": optimization_level,
                "builder_flags": flags,
                "cleared_flags": cleared,
                "timing_cache": str(cache_file) if cache_file is not None else None,
                # the runner registers these before it deserialises the plan
                "plugins": list(summary.plugins),
                "built_utc": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
            },
        )
        # Written before the plan is renamed into place, so a plan never appears without its sidecar.
        write_sidecar(sidecar_path(plan_file), sidecar)
    return sidecar.to_json()
