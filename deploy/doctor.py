"""`reviewkd doctor`: is this install one that can run, and if not, the one-line fix.

What it checks, from the installed packages' metadata (nothing heavy is imported: not torch, not
TensorRT, not ONNX Runtime) and the NVIDIA driver:
- how many ONNX Runtime distributions are installed (they share one `onnxruntime/` folder, so two
  means whichever pip installed last silently replaced the other's files);
- the CUDA major each of torch, TensorRT, ONNX Runtime and the CUDA bindings was built for, against
  each other and against the driver's (a CUDA 13 build does not start on a CUDA 12 driver);
- a cuda-python 12 installed over cuda-bindings 13 (two packages writing `cuda/bindings`);
- whether the GPU paths (ONNX Runtime's CUDA provider, TensorRT, torch on CUDA) can run here.

`collect()` reads the machine into a `Snapshot`; `diagnose(snapshot)` is pure, so every verdict is
tested on made-up snapshots (tests/deploy/test_doctor.py).
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import platform
import re
import shutil
import subprocess
import sys
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from deploy.gpu import import_cudart, probe_gpu
from deploy.install_targets import MIN_LINUX_DRIVER, ONNXRUNTIME_DISTRIBUTIONS, target_for_driver
from deploy.optional import optional_module

# The distributions whose CUDA major matters, besides the ONNX Runtimes.
_TENSORRT_DISTRIBUTIONS = (
    "tensorrt",
    "tensorrt-cu12",
    "tensorrt-cu13",
    "tensorrt-cu12-libs",
    "tensorrt-cu13-libs",
)
_OTHER_DISTRIBUTIONS = ("torch", "cuda-bindings", "cuda-python", *_TENSORRT_DISTRIBUTIONS)

OK, WARN, ERROR = "ok", "warning", "error"


@dataclass(frozen=True)
class Distribution:
    """An installed distribution as its metadata describes it."""

    name: str
    version: str
    requires: tuple[str, ...] = ()


@dataclass(frozen=True)
class Snapshot:
    """What `diagnose` needs to know about a machine."""

    machine: str
    distributions: dict[str, Distribution]  # by normalised name (lower case, '-' for '_' and '.')
    driver_cuda: tuple[int, int] | None  # the newest CUDA version the driver runs, e.g. (12, 4)
    driver_reason: str = ""  # why driver_cuda is unknown
    gpu: str | None = None  # the GPU found, "name (cc X.Y)"
    gpu_reasons: tuple[str, ...] = ()
    onnxruntime_has_cuda_files: bool | None = None  # the installed onnxruntime/ holds the CUDA provider
    tensorrt_importable: bool = False  # a `tensorrt` module is on the path (pip's, or JetPack's)


@dataclass(frozen=True)
class Finding:
    """One verdict: which component, how bad, what was seen, and the one-line fix."""

    component: str
    status: str  # OK, WARN or ERROR
    detail: str
    fix: str = ""


@dataclass(frozen=True)
class Diagnosis:
    """Every finding, each component's CUDA major, and which GPU paths can run."""

    findings: tuple[Finding, ...]
    cuda_majors: dict[str, int | None]
    gpu_paths: dict[str, str] = field(default_factory=dict)  # path -> "yes" or "no: why"

    @property
    def ok(self) -> bool:
        return all(f.status != ERROR for f in self.findings)

    def as_dict(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "findings": [asdict(f) for f in self.findings],
            "cuda_majors": self.cuda_majors,
            "gpu_paths": self.gpu_paths,
        }


def normalise(name: str) -> str:
    """A distribution name in PEP 503's normal form."""
    return re.sub(r"[-_.]+", "-", name).lower()


def _requirement_name(requirement: str) -> str:
    match = re.match(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)", requirement)
    return normalise(match.group(1)) if match else ""


def _requirement_major(requirement: str) -> int | None:
    """The major version a requirement pins or starts from (==13.0.3, ~=13.0, >=13.0.3,<14), if any."""
    match = re.search(r"(?:==|~=|>=)\s*(\d+)", requirement.split(";")[0])
    return int(match.group(1)) if match else None


def _major_from_requires(requires: Iterable[str]) -> int | None:
    """The CUDA major that a package's CUDA library requirements name (cuda-toolkit, cuda-bindings,
    nvidia-cuda-runtime[-cuXX]), or None when it names none."""
    for requirement in requires:
        name = _requirement_name(requirement)
        suffixed = re.fullmatch(r"nvidia-cuda-runtime-cu(\d+)", name)
        if suffixed:
            return int(suffixed.group(1))
        if name in ("cuda-toolkit", "cuda-bindings", "nvidia-cuda-runtime"):
            major = _requirement_major(requirement)
            if major is not None:
                return major
    return None


def _version_tuple(version: str) -> tuple[int, ...]:
    return tuple(int(part) for part in re.findall(r"\d+", version.split("+")[0])[:3])


def torch_cuda_major(dist: Distribution) -> int | None:
    """torch's CUDA major: from a local version label (+cu126, +cpu) or its CUDA requirements."""
    local = dist.version.partition("+")[2]
    if local == "cpu":
        return None
    label = re.fullmatch(r"cu(\d+)", local)
    if label:
        return int(label.group(1)[:-1])  # cu126 -> 12, cu130 -> 13
    return _major_from_requires(dist.requires)


def onnxruntime_gpu_cuda_major(dist: Distribution) -> int:
    """onnxruntime-gpu's CUDA major: its `cuda` extra's requirements, else its release (PyPI's 1.19 to
    1.26 are CUDA 12 builds, 1.27 on CUDA 13, older ones CUDA 11; NVIDIA's Jetson wheels for JetPack 6,
    1.18 to 1.23, are CUDA 12)."""
    declared = _major_from_requires(dist.requires)
    if declared is not None:
        return declared
    version = _version_tuple(dist.version)
    if version >= (1, 27):
        return 13
    return 12 if version >= (1, 18) else 11


def tensorrt_cuda_major(dists: dict[str, Distribution]) -> tuple[int | None, str]:
    """TensorRT's CUDA major from its PyPI package names (tensorrt-cu12, tensorrt-cu13; the bare
    `tensorrt` metapackage requires one of them), and a description; None for JetPack's system TensorRT,
    whose metadata names no CUDA package."""
    for major in (12, 13):
        for name in (f"tensorrt-cu{major}", f"tensorrt-cu{major}-libs"):
            if name in dists:
                return major, f"{name} {dists[name].version}"
    meta = dists.get("tensorrt")
    if meta is None:
        return None, ""
    for requirement in meta.requires:
        suffixed = re.fullmatch(r"tensorrt-cu(\d+)", _requirement_name(requirement))
        if suffixed:
            return int(suffixed.group(1)), f"tensorrt {meta.version}"
    return None, f"tensorrt {meta.version} (CUDA major not in its metadata: JetPack's, or a local build)"


def _distribution(name: str) -> Distribution | None:
    try:
        meta = importlib.metadata.distribution(name)
    except importlib.metadata.PackageNotFoundError:
        return None
    return Distribution(normalise(meta.metadata["Name"] or name), meta.version, tuple(meta.requires or ()))


def _driver_from_bindings() -> tuple[int, int]:
    cudart = import_cudart()
    if cudart is None:
        raise LookupError("cuda-bindings is not installed")
    err, version = cudart.cudaDriverGetVersion()
    if err != cudart.cudaError_t.cudaSuccess:
        raise LookupError(f"cudaDriverGetVersion returned {getattr(err, 'name', err)}")
    if not version:
        raise LookupError("cudaDriverGetVersion: no driver is loaded")
    return int(version) // 1000, (int(version) % 1000) // 10


def _driver_from_nvml() -> tuple[int, int]:
    pynvml = optional_module("pynvml")
    if pynvml is None:
        raise LookupError("NVML (nvidia-ml-py) is not installed")
    pynvml.nvmlInit()
    try:
        version = int(pynvml.nvmlSystemGetCudaDriverVersion_v2())
    finally:
        pynvml.nvmlShutdown()
    return version // 1000, (version % 1000) // 10


def parse_nvidia_smi_cuda(text: str) -> tuple[int, int] | None:
    """The "CUDA Version: 12.4" of nvidia-smi's banner."""
    match = re.search(r"CUDA Version\s*:\s*(\d+)\.(\d+)", text)
    return (int(match.group(1)), int(match.group(2))) if match else None


def _driver_from_nvidia_smi() -> tuple[int, int]:
    exe = shutil.which("nvidia-smi")
    if exe is None:
        raise LookupError("nvidia-smi is not on PATH")
    out = subprocess.run([exe], capture_output=True, text=True, timeout=10, check=False).stdout
    version = parse_nvidia_smi_cuda(out)
    if version is None:
        raise LookupError("nvidia-smi printed no CUDA version")
    return version


def driver_cuda_version() -> tuple[tuple[int, int] | None, str]:
    """The newest CUDA version the driver runs, asked of the CUDA bindings, NVML, then nvidia-smi; or
    None and every source's reason."""
    reasons = []
    for source in (_driver_from_bindings, _driver_from_nvml, _driver_from_nvidia_smi):
        try:
            return source(), ""
        # A broken driver install surfaces as many exception types: each means this source cannot tell.
        except Exception as exc:
            reasons.append(str(exc) or type(exc).__name__)
    return None, "; ".join(reasons)


def _module_found(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


def _onnxruntime_has_cuda_files() -> bool | None:
    """Whether the installed onnxruntime/ folder holds the CUDA provider library (found without
    importing onnxruntime): it tells which of two clashing distributions' files won."""
    try:
        spec = importlib.util.find_spec("onnxruntime")
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    capi = Path(next(iter(spec.submodule_search_locations))) / "capi"
    return any(capi.glob("*onnxruntime_providers_cuda*"))


def collect() -> Snapshot:
    """Read this machine: the distributions that matter, the driver's CUDA version, the GPU."""
    dists = {}
    for name in (*ONNXRUNTIME_DISTRIBUTIONS, *_OTHER_DISTRIBUTIONS):
        found = _distribution(name)
        if found is not None:
            dists[normalise(name)] = found
    driver, driver_reason = driver_cuda_version()
    probe = probe_gpu()
    gpu = f"{probe.gpu.name} (cc {probe.gpu.cc})" if probe.gpu is not None else None
    return Snapshot(
        machine=platform.machine(),
        distributions=dists,
        driver_cuda=driver,
        driver_reason=driver_reason,
        gpu=gpu,
        gpu_reasons=probe.reasons if gpu is None else (),
        onnxruntime_has_cuda_files=_onnxruntime_has_cuda_files(),
        tensorrt_importable=_module_found("tensorrt"),
    )


def _install_fix(snapshot: Snapshot) -> str:
    """The install command for this machine: a Jetson's, or the one for the driver's CUDA major."""
    if snapshot.machine == "aarch64" and snapshot.driver_cuda is not None:
        return (
            "install JetPack's TensorRT and NVIDIA's onnxruntime-gpu wheel for your JetPack, then"
            " pip install 'reviewkd[jetson]'"
        )
    return target_for_driver(snapshot.driver_cuda[0] if snapshot.driver_cuda else None).command


def _onnxruntime_findings(snapshot: Snapshot) -> list[Finding]:
    installed = [snapshot.distributions[n] for n in ONNXRUNTIME_DISTRIBUTIONS if n in snapshot.distributions]
    if not installed:
        return [Finding("onnxruntime", ERROR, "no ONNX Runtime is installed", _install_fix(snapshot))]
    if len(installed) == 1:
        dist = installed[0]
        return [Finding("onnxruntime", OK, f"{dist.name} {dist.version}")]
    names = " ".join(d.name for d in installed)
    winner = ""
    if snapshot.onnxruntime_has_cuda_files is not None:
        build = "a GPU build's" if snapshot.onnxruntime_has_cuda_files else "a CPU build's (no CUDA provider)"
        winner = f"; the onnxruntime/ folder now holds {build} files"
    return [
        Finding(
            "onnxruntime",
            ERROR,
            f"{len(installed)} ONNX Runtime distributions share the onnxruntime/ folder ({names}): the one"
            f" pip installed last overwrote the other's files{winner}",
            f"pip uninstall -y {names} && {_install_fix(snapshot)}",
        )
    ]


def _cuda_majors(snapshot: Snapshot) -> tuple[dict[str, int | None], dict[str, str]]:
    """Each CUDA-built component's major (None where unknown) and what was installed."""
    dists = snapshot.distributions
    majors: dict[str, int | None] = {}
    labels: dict[str, str] = {}
    if "torch" in dists:
        majors["torch"] = torch_cuda_major(dists["torch"])
        labels["torch"] = f"torch {dists['torch'].version}"
    if "onnxruntime-gpu" in dists:
        majors["onnxruntime"] = onnxruntime_gpu_cuda_major(dists["onnxruntime-gpu"])
        labels["onnxruntime"] = f"onnxruntime-gpu {dists['onnxruntime-gpu'].version}"
    trt_major, trt_label = tensorrt_cuda_major(dists)
    if trt_label:
        majors["tensorrt"] = trt_major
        labels["tensorrt"] = trt_label
    if "cuda-bindings" in dists:
        majors["cuda-bindings"] = _version_tuple(dists["cuda-bindings"].version)[0]
        labels["cuda-bindings"] = f"cuda-bindings {dists['cuda-bindings'].version}"
    elif "cuda-python" in dists:
        majors["cuda-bindings"] = _version_tuple(dists["cuda-python"].version)[0]
        labels["cuda-bindings"] = f"cuda-python {dists['cuda-python'].version}"
    return majors, labels


def diagnose(snapshot: Snapshot) -> Diagnosis:
    """Every finding about `snapshot`, with a one-line fix for each problem."""
    findings = _onnxruntime_findings(snapshot)
    majors, labels = _cuda_majors(snapshot)
    known = {component: major for component, major in majors.items() if major is not None}
    fix = _install_fix(snapshot)

    dists = snapshot.distributions
    if "cuda-python" in dists and "cuda-bindings" in dists:
        python_major = _version_tuple(dists["cuda-python"].version)[0]
        bindings_major = _version_tuple(dists["cuda-bindings"].version)[0]
        if python_major < 13 and python_major != bindings_major:
            findings.append(
                Finding(
                    "cuda-bindings",
                    ERROR,
                    f"cuda-python {dists['cuda-python'].version} ships its own cuda/bindings files over"
                    f" cuda-bindings {dists['cuda-bindings'].version}: the package is a mix of CUDA"
                    f" {python_major} and {bindings_major}",
                    f"pip uninstall -y cuda-python cuda-bindings && {fix}",
                )
            )

    if len(set(known.values())) > 1:
        listed = ", ".join(f"{labels[c]} (CUDA {m})" for c, m in known.items())
        findings.append(
            Finding("cuda", ERROR, f"the packages are built for different CUDA majors: {listed}", fix)
        )

    if snapshot.driver_cuda is None:
        findings.append(
            Finding("driver", WARN if known else OK, f"no NVIDIA driver found ({snapshot.driver_reason})")
        )
    else:
        driver_text = f"{snapshot.driver_cuda[0]}.{snapshot.driver_cuda[1]}"
        too_new = {c: m for c, m in known.items() if m > snapshot.driver_cuda[0]}
        if too_new:
            listed = ", ".join(f"{labels[c]} (CUDA {m})" for c, m in too_new.items())
            newest = max(too_new.values())
            findings.append(
                Finding(
                    "driver",
                    ERROR,
                    f"the driver runs CUDA up to {driver_text}, older than what {listed} needs",
                    f"update the NVIDIA driver to >= {MIN_LINUX_DRIVER.get(newest, f'a CUDA {newest} one')},"
                    f" or {fix}",
                )
            )
        else:
            findings.append(Finding("driver", OK, f"runs CUDA up to {driver_text}"))

    gpu_paths = _gpu_paths(snapshot, known, findings)
    return Diagnosis(tuple(findings), majors, gpu_paths)


def _gpu_paths(snapshot: Snapshot, known: dict[str, int], findings: list[Finding]) -> dict[str, str]:
    """Which GPU paths the findings leave runnable ("yes"), or the first reason each cannot."""
    blocking = [
        f for f in findings if f.status == ERROR and f.component in ("cuda", "driver", "cuda-bindings")
    ]
    common = f"no: {blocking[0].component} problem above" if blocking else ""
    if not common and snapshot.gpu is None:
        common = "no: no GPU found"
    dists = snapshot.distributions
    ort_clash = any(f.component == "onnxruntime" and f.status == ERROR for f in findings)

    def path(needs: str | None) -> str:
        return common or (f"no: {needs}" if needs else "yes")

    return {
        "onnxruntime/cuda": path(
            "the ONNX Runtimes clash"
            if ort_clash
            else (None if "onnxruntime-gpu" in dists else "onnxruntime-gpu is not installed")
        ),
        "tensorrt": path(None if snapshot.tensorrt_importable else "TensorRT is not installed"),
        "torch/cuda": path(
            "torch is not installed"
            if "torch" not in dists
            else (None if known.get("torch") is not None else "torch is a CPU build")
        ),
    }


def format_diagnosis(snapshot: Snapshot, diagnosis: Diagnosis) -> str:
    """The report a person reads: findings, CUDA majors, GPU paths, and a fix under each problem."""
    lines = [f"machine: {snapshot.machine}, Python {sys.version.split()[0]}"]
    lines.append(f"gpu: {snapshot.gpu or 'none found (' + '; '.join(snapshot.gpu_reasons) + ')'}")
    majors = ", ".join(f"{c} {m if m is not None else 'unknown'}" for c, m in diagnosis.cuda_majors.items())
    lines.append(f"CUDA majors: {majors or 'no CUDA-built package installed'}")
    for finding in diagnosis.findings:
        lines.append(f"{finding.status:8} {finding.component}: {finding.detail}")
        if finding.fix:
            lines.append(f"{'':8}   fix: {finding.fix}")
    lines.append("GPU paths: " + "; ".join(f"{p} {v}" for p, v in diagnosis.gpu_paths.items()))
    return "\n".join(lines)
