"""TensorRT-free logic shared by the engine builder (export/) and the TensorRT runner (deploy/).

A TensorRT plan is tied to the TensorRT version, the GPU and the CPU architecture that built it
(docs/METHOD.md section 6), so every `<name>.plan` travels with a `<name>.plan.json` sidecar that
records them, plus the precision, the DLA core it runs on (if any), the batch profile and where the
plan came from. This module owns that sidecar (schema, reading, writing, validation), the
batch-profile arithmetic, the rules that decide whether a plan may run here, and the probes for
TensorRT and a GPU. It never imports tensorrt or torch at module
level, so it is importable and testable anywhere.
"""

from __future__ import annotations

import importlib
import os
import platform
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from deploy.doctor import ERROR, collect, diagnose
from deploy.errors import MissingDependencyError, UsageError
from deploy.fileio import parse_json, write_json_atomic
from deploy.gpu import GpuInfo, probe_gpu
from deploy.install_targets import GPU_INSTALL_HINT

SIDECAR_SCHEMA = "reviewkd.tensorrt-sidecar"
# 2: the CPU architecture ("machine") and the DLA settings ("dla") joined the record.
# 3: the operating system ("os"); plans built by a different TensorRT build number are refused.
SIDECAR_SCHEMA_VERSION = 3
PRECISIONS = ("fp32", "fp16", "int8")
COMPATIBILITY_MODES = ("version", "hardware")
# Hardware-compatible (AMPERE_PLUS) engines run on Ampere and newer GPUs only.
AMPERE_COMPUTE_CAPABILITY = (8, 0)
# TensorRT 10.12 deprecated weak typing (BuilderFlag.FP16/INT8); from there on we build strongly typed.
STRONG_TYPING_SINCE = (10, 12)
INSTALL_HINT = f"install it with {GPU_INSTALL_HINT}; TensorRT needs an NVIDIA GPU and driver"
REBUILD_HINT = "rebuild the engine on this device from its ONNX file (reviewkd export RUN --formats tensorrt)"


@dataclass(frozen=True)
class DlaSettings:
    """A plan built for a DLA core of a Jetson (or DRIVE) SoC."""

    core: int  # the DLA core the engine was built for and runs on
    gpu_fallback: bool  # layers the DLA cannot run execute on the GPU instead of failing the build


# platform.machine() spells one architecture differently per OS (Windows "AMD64", macOS "arm64").
_MACHINE_ALIASES = {"amd64": "x86_64", "x64": "x86_64", "arm64": "aarch64"}


def host_machine(machine: str | None = None) -> str:
    """The CPU architecture as the sidecar records it: platform.machine(), with OS spellings unified."""
    name = (machine if machine is not None else platform.machine()).strip().lower()
    return _MACHINE_ALIASES.get(name, name)


def host_os(system: str | None = None) -> str:
    """The operating system as the sidecar records it: platform.system() in lower case ("linux")."""
    return (system if system is not None else platform.system()).strip().lower()


@dataclass(frozen=True)
class Profile:
    """One optimisation profile on the NCHW input: full min/opt/max shapes."""

    min: tuple[int, ...]
    opt: tuple[int, ...]
    max: tuple[int, ...]

    @property
    def min_batch(self) -> int:
        """The smallest batch the engine accepts."""
        return self.min[0]

    @property
    def max_batch(self) -> int:
        """The largest batch the engine accepts."""
        return self.max[0]

    @property
    def chw(self) -> tuple[int, ...]:
        """The non-batch dimensions, equal across min/opt/max."""
        return self.min[1:]


def _positive_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def profile_shapes(
    chw: tuple[int, ...] | list[int], min_batch: int, opt_batch: int, max_batch: int
) -> Profile:
    """Return the min/opt/max NCHW shapes for a batch range; UsageError unless 1 <= min <= opt <= max."""
    dims = tuple(chw)
    if len(dims) != 3 or not all(_positive_int(d) for d in dims):
        raise UsageError(f"input shape must be three positive integers (C, H, W), got {list(dims)}")
    batches = (min_batch, opt_batch, max_batch)
    if not all(isinstance(b, int) and not isinstance(b, bool) for b in batches):
        raise UsageError(f"batch sizes must be integers, got min={min_batch} opt={opt_batch} max={max_batch}")
    if not 1 <= min_batch <= opt_batch <= max_batch:
        raise UsageError(
            f"batch profile needs 1 <= min <= opt <= max, got min={min_batch} opt={opt_batch} max={max_batch}"
        )
    return Profile(min=(min_batch, *dims), opt=(opt_batch, *dims), max=(max_batch, *dims))


def parse_version(text: str) -> tuple[int, int, int]:
    """Parse a TensorRT version ("10.13.0.35", "11.0") into (major, minor, patch); ValueError if not one."""
    match = re.fullmatch(r"(\d+)\.(\d+)(?:\.(\d+))?(?:\.\d+)*(?:[.+-].*)?", text.strip())
    if match is None:
        raise ValueError(f"not a TensorRT version: {text!r}")
    major, minor, patch = match.groups()
    return int(major), int(minor), int(patch or 0)


def uses_strong_typing(tensorrt_version: str) -> bool:
    """Whether engines are built strongly typed on this TensorRT (10.12 and later, 11 always)."""
    return parse_version(tensorrt_version)[:2] >= STRONG_TYPING_SINCE


def _full_version(text: str) -> tuple[int, ...]:
    """Every numeric part of a TensorRT version, build number included ("10.13.3.9" -> (10, 13, 3, 9))."""
    parse_version(text)  # ValueError for what is not a version at all
    leading = re.match(r"\d+(?:\.\d+)*", text.strip())
    return tuple(int(part) for part in leading.group(0).split(".")) if leading else ()


def version_mismatch(built: str, installed: str, version_compatible: bool) -> str | None:
    """Why a plan built with TensorRT `built` cannot run on `installed`, or None if it can.

    A plain plan needs the same version down to the build number (TensorRT refuses a plan from
    another build, with an opaque deserialisation error). A version-compatible plan runs on the same
    major version at or after the one that built it.
    """
    b, i = parse_version(built), parse_version(installed)
    if version_compatible:
        if i[0] != b[0]:
            return (
                f"it was built version-compatible with TensorRT {built}, which covers "
                f"TensorRT {b[0]}.x only, but TensorRT {installed} is installed"
            )
        if i < b:
            return f"it was built with TensorRT {built}, newer than the installed TensorRT {installed}"
        return None
    if _full_version(built) != _full_version(installed):
        return (
            f"it was built with TensorRT {built} but TensorRT {installed} is installed "
            "(a plan runs only on the TensorRT version and build that made it, unless version-compatible)"
        )
    return None


def gpu_mismatch(built: GpuInfo, present: GpuInfo, hardware_compatible: bool) -> str | None:
    """Why a plan built on `built` cannot run on `present`, or None if it can.

    A plain plan needs the same compute capability; a hardware-compatible (Ampere+) plan runs on
    any GPU of compute capability 8.0 or later.
    """
    if hardware_compatible:
        if present.compute_capability < AMPERE_COMPUTE_CAPABILITY:
            return (
                f"it was built hardware-compatible for Ampere and newer GPUs (compute capability >= 8.0), "
                f"but this GPU is {present.name} (compute capability {present.cc})"
            )
        return None
    if present.compute_capability != built.compute_capability:
        return (
            f"it was built on {built.name} (compute capability {built.cc}) "
            f"but this GPU is {present.name} (compute capability {present.cc})"
        )
    return None


def machine_mismatch(built: str, present: str) -> str | None:
    """Why a plan built on a `built` CPU architecture cannot run on `present`, or None if it can.

    A plan holds host code for the CPU it was built on: even a hardware-compatible plan from an
    x86_64 server fails to deserialise on an aarch64 Jetson, with an opaque error.
    """
    if host_machine(built) != host_machine(present):
        return f"it was built on a {built} host, but this host is {present}"
    return None


def os_mismatch(built: str, present: str) -> str | None:
    """Why a plan built on one operating system cannot run on `present`'s, or None if it can: a plan
    holds host code for the OS that built it (a Windows plan does not load on Linux, x86_64 on both)."""
    if host_os(built) != host_os(present):
        return f"it was built on {built}, but this host runs {present}"
    return None


@dataclass(frozen=True)
class Sidecar:
    """The JSON record beside a plan (`<plan>.json`)."""

    plan_file: str
    plan_sha256: str
    tensorrt_version: str
    gpu: GpuInfo
    precision: str
    compatibility: str | None
    strongly_typed: bool
    input_names: tuple[str, ...]
    output_names: tuple[str, ...]
    profile: Profile
    source_onnx: str
    source_onnx_sha256: str
    machine: str  # the CPU architecture of the host that built the plan, as host_machine() says
    os: str  # the operating system of the host that built the plan, as host_os() says
    dla: DlaSettings | None = None  # None: the plan runs on the GPU
    build: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        """The JSON-ready dict written to disk."""
        return {
            "schema": SIDECAR_SCHEMA,
            "schema_version": SIDECAR_SCHEMA_VERSION,
            "plan": {"file": self.plan_file, "sha256": self.plan_sha256},
            "tensorrt_version": self.tensorrt_version,
            "gpu": {"name": self.gpu.name, "compute_capability": self.gpu.cc},
            "machine": self.machine,
            "os": self.os,
            "dla": None
            if self.dla is None
            else {"core": self.dla.core, "gpu_fallback": self.dla.gpu_fallback},
            "precision": self.precision,
            "compatibility": self.compatibility,
            "strongly_typed": self.strongly_typed,
            "inputs": list(self.input_names),
            "outputs": list(self.output_names),
            "profile": {
                "min": list(self.profile.min),
                "opt": list(self.profile.opt),
                "max": list(self.profile.max),
            },
            "source_onnx": {"file": self.source_onnx, "sha256": self.source_onnx_sha256},
            "build": dict(self.build),
        }

    @classmethod
    def from_json(cls, data: Any, source: str) -> Sidecar:
        """Validate a parsed sidecar; UsageError naming `source` and the first problem found."""

        def bad(what: str) -> UsageError:
            return UsageError(f"{source}: malformed TensorRT sidecar: {what}; {REBUILD_HINT}")

        def get(obj: Any, key: str, kind: type | tuple[type, ...], where: str = "") -> Any:
            if not isinstance(obj, dict) or key not in obj:
                raise bad(f"missing {where}{key!r}")
            value = obj[key]
            # bool is an int subclass: a flag must not pass for a number, nor a number for a flag.
            if not isinstance(value, kind) or (isinstance(value, bool) and kind is not bool):
                raise bad(f"{where}{key!r} has the wrong type ({type(value).__name__})")
            return value

        if not isinstance(data, dict):
            raise bad("expected a JSON object")
        if data.get("schema") != SIDECAR_SCHEMA:
            raise bad(f"'schema' is {data.get('schema')!r}, expected {SIDECAR_SCHEMA!r}")
        if data.get("schema_version") != SIDECAR_SCHEMA_VERSION:
            raise bad(f"unsupported schema_version {data.get('schema_version')!r}")
        plan = get(data, "plan", dict)
        gpu = get(data, "gpu", dict)
        cc_text = get(gpu, "compute_capability", str, "gpu.")
        cc_match = re.fullmatch(r"(\d+)\.(\d+)", cc_text)
        if cc_match is None:
            raise bad(f"gpu.compute_capability {cc_text!r} is not 'major.minor'")
        version = get(data, "tensorrt_version", str)
        try:
            parse_version(version)
        except ValueError as exc:
            raise bad(str(exc)) from None
        precision = get(data, "precision", str)
        if precision not in PRECISIONS:
            raise bad(f"precision {precision!r} is not one of {', '.join(PRECISIONS)}")
        compatibility = data.get("compatibility")
        if compatibility is not None and compatibility not in COMPATIBILITY_MODES:
            raise bad(f"compatibility {compatibility!r} is not null, 'version' or 'hardware'")
        names = {}
        for key in ("inputs", "outputs"):
            value = get(data, key, list)
            if not value or not all(isinstance(n, str) and n for n in value):
                raise bad(f"{key!r} must be a non-empty list of tensor names")
            names[key] = tuple(value)
        raw_profile = get(data, "profile", dict)
        shapes = []
        for key in ("min", "opt", "max"):
            shape = get(raw_profile, key, list, "profile.")
            if len(shape) != 4 or not all(_positive_int(d) for d in shape):
                raise bad(f"profile.{key} must be four positive integers (N, C, H, W), got {shape}")
            shapes.append(tuple(shape))
        if not shapes[0][1:] == shapes[1][1:] == shapes[2][1:]:
            raise bad("profile shapes differ outside the batch dimension")
        try:
            profile = profile_shapes(shapes[0][1:], shapes[0][0], shapes[1][0], shapes[2][0])
        except UsageError as exc:
            raise bad(str(exc)) from None
        machine = get(data, "machine", str)
        if not machine:
            raise bad("'machine' is empty")
        system = get(data, "os", str)
        if not system:
            raise bad("'os' is empty")
        raw_dla = data.get("dla")
        dla = None
        if raw_dla is not None:
            core = get(raw_dla, "core", int, "dla.")
            if core < 0:
                raise bad(f"dla.core must be 0 or more, got {core}")
            dla = DlaSettings(core=core, gpu_fallback=get(raw_dla, "gpu_fallback", bool, "dla."))
        onnx = get(data, "source_onnx", dict)
        return cls(
            plan_file=get(plan, "file", str, "plan."),
            plan_sha256=get(plan, "sha256", str, "plan."),
            tensorrt_version=version,
            gpu=GpuInfo(get(gpu, "name", str, "gpu."), (int(cc_match.group(1)), int(cc_match.group(2)))),
            precision=precision,
            compatibility=compatibility,
            strongly_typed=get(data, "strongly_typed", bool),
            input_names=names["inputs"],
            output_names=names["outputs"],
            profile=profile,
            source_onnx=get(onnx, "file", str, "source_onnx."),
            source_onnx_sha256=get(onnx, "sha256", str, "source_onnx."),
            machine=machine,
            os=system,
            dla=dla,
            build=get(data, "build", dict),
        )


def sidecar_path(plan_path: str | os.PathLike[str]) -> Path:
    """The sidecar beside a plan: `student.fp16.plan` -> `student.fp16.plan.json`."""
    plan = Path(plan_path)
    return plan.with_name(plan.name + ".json")


def write_sidecar(path: str | os.PathLike[str], sidecar: Sidecar) -> Path:
    """Write `sidecar` atomically to `path` and return the path."""
    write_json_atomic(path, sidecar.to_json())
    return Path(path)


def read_sidecar(path: str | os.PathLike[str]) -> Sidecar:
    """Read and validate a sidecar; a missing or malformed file is a UsageError naming it."""
    target = Path(path)
    try:
        text = target.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UsageError(f"{target}: TensorRT sidecar not found; {REBUILD_HINT}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise UsageError(f"{target}: cannot read the TensorRT sidecar ({exc})") from None
    try:
        data = parse_json(text)
    except ValueError as exc:
        raise UsageError(f"{target}: malformed TensorRT sidecar: not JSON ({exc}); {REBUILD_HINT}") from None
    return Sidecar.from_json(data, str(target))


def check_engine_compatible(
    sidecar: Sidecar,
    *,
    tensorrt_version: str,
    gpu: GpuInfo,
    plan_path: str | os.PathLike[str],
    machine: str | None = None,
    system: str | None = None,
) -> None:
    """Raise UsageError, saying why and how to rebuild, if the plan cannot run on this TensorRT, GPU,
    CPU architecture and operating system (`machine` and `system`, this host's when None)."""
    try:
        reasons = [
            os_mismatch(sidecar.os, host_os(system)),
            machine_mismatch(sidecar.machine, host_machine(machine)),
            version_mismatch(sidecar.tensorrt_version, tensorrt_version, sidecar.compatibility == "version"),
            gpu_mismatch(sidecar.gpu, gpu, sidecar.compatibility == "hardware"),
        ]
    except ValueError as exc:
        raise UsageError(f"{plan_path}: {exc}") from None
    found = [r for r in reasons if r is not None]
    if found:
        raise UsageError(
            f"{plan_path}: this TensorRT engine cannot run here: {'; and '.join(found)}. "
            f"Engines are tied to the GPU, OS, CPU architecture and TensorRT build that made them: rebuild it"
            " "
            f"on this device "
            f"from {sidecar.source_onnx} (reviewkd export RUN --formats tensorrt)"
        )


_T = TypeVar("_T")


def start_tensorrt(factory: Callable[[Any], _T], logger: Any, what: str, tensorrt_version: str) -> _T:
    """`factory(logger)` (trt.Builder or trt.Runtime), or MissingDependencyError naming why TensorRT could
    not start.

    When TensorRT cannot initialise CUDA (typically a CUDA 13 TensorRT on a CUDA 12 driver) these
    constructors fail inside pybind11 with "TypeError: ... factory function returned nullptr", after
    every pre-flight probe passed. `reviewkd doctor`'s findings say which package and driver disagree.
    """
    try:
        made = factory(logger)
    except TypeError as exc:
        if "nullptr" not in str(exc):
            raise
        made = None
    if made is not None:
        return made
    problems = [f for f in diagnose(collect()).findings if f.status == ERROR]
    cause = (
        "; ".join(f"{f.detail} (fix: {f.fix})" for f in problems)
        if problems
        else "the NVIDIA driver is missing or older than the CUDA major this TensorRT was built for"
        " (tensorrt-cu13 needs a CUDA 13 driver, >= 580); `reviewkd doctor` checks the install"
    )
    raise MissingDependencyError(f"TensorRT {tensorrt_version} could not initialise CUDA ({what}): {cause}")


# TensorRT's plugin library names its layers "<name>_TRT" (EfficientNMS_TRT: a detector's NMS).
PLUGIN_SUFFIX = "_TRT"


def register_tensorrt_plugins(
    init_plugins: Callable[[Any, str], bool], logger: Any, plugins: Sequence[str], what: str
) -> None:
    """Register TensorRT's plugin library (libnvinfer_plugin) through `init_plugins`
    (trt.init_libnvinfer_plugins) with `logger`, where `plugins` (the plugin layers of the ONNX file
    being parsed or of the plan being deserialised) is not empty: TensorRT finds a plugin layer's
    creator only once the library registered it. MissingDependencyError naming `what` when the
    library does not load."""
    if not plugins:
        return
    if not init_plugins(logger, ""):
        raise MissingDependencyError(
            f"{what}: uses TensorRT plugin layer(s) {', '.join(plugins)}, and TensorRT's plugin library"
            f" (libnvinfer_plugin) did not load; it comes with TensorRT: {GPU_INSTALL_HINT}"
        )


def tensorrt_available() -> tuple[bool, str]:
    """Whether the real TensorRT Python package imports here; the reason (and how to get it) when not.

    `tensorrt-stubs` installs a `tensorrt/` folder of .pyi files only, which imports as an empty
    namespace package, so a successful import proves nothing: the Builder class must be there.
    """
    try:
        trt = importlib.import_module("tensorrt")
    except ModuleNotFoundError as exc:
        if exc.name != "tensorrt":
            return False, f"TensorRT is installed but a module it needs is missing ({exc}): {INSTALL_HINT}"
        return False, f"TensorRT is not installed: {INSTALL_HINT}"
    except (ImportError, OSError, RuntimeError) as exc:
        return False, f"TensorRT is installed but does not import ({exc}): {INSTALL_HINT}"
    if not hasattr(trt, "Builder"):
        return False, f"only TensorRT's type stubs are installed, not TensorRT itself: {INSTALL_HINT}"
    return True, f"TensorRT {getattr(trt, '__version__', 'unknown version')}"


def require_tensorrt_and_gpu(action: str, device_index: int = 0) -> GpuInfo:
    """Return CUDA device `device_index`, or raise MissingDependencyError saying what is missing and how
    to get it."""
    ok, reason = tensorrt_available()
    if not ok:
        raise MissingDependencyError(f"{action} needs TensorRT: {reason}")
    probe = probe_gpu(device_index)
    if probe.gpu is None:
        raise MissingDependencyError(
            f"{action} needs an NVIDIA GPU with a working driver: {probe.describe_failure()}"
        )
    return probe.gpu
