"""Each documented install resolves to exactly one ONNX Runtime and one CUDA major (issue 20).

pip's own resolver decides (a dry run with a JSON report, against the package index), so a change of
bounds in pyproject.toml, or a new release on the index, that breaks a target fails here. Two parts
cannot be resolved on this machine and are checked from declared requirements instead, as each test
says: TensorRT's PyPI packages build their metadata from an sdist that downloads from NVIDIA's host,
and a full resolve of torch backtracks through its releases (over 3 minutes here).
Without the index (no network) the tests skip, saying so.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from deploy.doctor import Distribution, normalise, onnxruntime_gpu_cuda_major
from deploy.install_targets import ONNXRUNTIME_DISTRIBUTIONS, TARGETS

tomllib = pytest.importorskip("tomllib", reason="reads pyproject.toml with Python 3.11's tomllib")

REPO_ROOT = Path(__file__).resolve().parents[1]
PROJECT = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]
NETWORK_ERRORS = ("NewConnectionError", "Max retries exceeded", "Temporary failure in name resolution")

pytestmark = pytest.mark.slow


def _name(requirement: str) -> str:
    match = re.match(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)", requirement)
    assert match, requirement
    return normalise(match.group(1))


def extra(name: str) -> list[str]:
    return list(PROJECT["optional-dependencies"][name])


def pip_report(tmp_path: Path, requirements: list[str], *, no_deps: bool = False) -> dict[str, Distribution]:
    """What pip would install for `requirements` on this Python and platform, read from its report.
    --isolated: the machine's pip configuration (a local torch cap, local wheel folders) stays out."""
    report = tmp_path / "report.json"
    command = [sys.executable, "-m", "pip", "--isolated", "install", "--dry-run", "--ignore-installed"]
    command += ["--quiet", "--report", str(report), *(["--no-deps"] if no_deps else []), *requirements]
    done = subprocess.run(command, capture_output=True, text=True, timeout=600, check=False)
    if done.returncode != 0:
        if any(marker in done.stderr for marker in NETWORK_ERRORS):
            pytest.skip(f"the package index is unreachable: {done.stderr.strip().splitlines()[-1]}")
        pytest.fail(f"pip could not resolve {requirements}:\n{done.stderr[-3000:]}")
    installs = json.loads(report.read_text())["install"]
    return {
        normalise(item["metadata"]["name"]): Distribution(
            normalise(item["metadata"]["name"]),
            item["metadata"]["version"],
            tuple(item["metadata"].get("requires_dist") or ()),
        )
        for item in installs
    }


@pytest.mark.parametrize("target", ["cpu", "cuda12", "cuda13"])
def test_each_target_resolves_to_one_onnx_runtime_and_one_cuda_major(target: str, tmp_path: Path) -> None:
    spec = TARGETS[target]
    wanted = [*PROJECT["dependencies"], *extra(spec.extra)]
    # TensorRT is checked from its declared name below: its metadata cannot be built here.
    resolvable = [r for r in wanted if not _name(r).startswith("tensorrt")]
    resolved = pip_report(tmp_path, resolvable)

    runtimes = [name for name in ONNXRUNTIME_DISTRIBUTIONS if name in resolved]
    assert runtimes == [spec.onnxruntime], resolved.keys()

    majors = {}
    if "onnxruntime-gpu" in resolved:
        majors["onnxruntime-gpu"] = onnxruntime_gpu_cuda_major(resolved["onnxruntime-gpu"])
    if "cuda-bindings" in resolved:
        majors["cuda-bindings"] = int(resolved["cuda-bindings"].version.split(".")[0])
    assert "cuda-python" not in resolved  # it would ship its own cuda/bindings files over cuda-bindings
    tensorrt = [_name(r) for r in wanted if _name(r).startswith("tensorrt")]
    for name in tensorrt:
        suffix = re.fullmatch(r"tensorrt-cu(\d+)", name)
        assert suffix, f"{name}: the bare tensorrt package installs whichever CUDA major NVIDIA makes default"
        majors[name] = int(suffix.group(1))
    if spec.cuda_major is None:
        assert not majors, majors
    else:
        assert set(majors.values()) == {spec.cuda_major}, majors
        assert set(majors) == {"onnxruntime-gpu", "cuda-bindings", f"tensorrt-cu{spec.cuda_major}"}


def test_jetson_target_installs_no_runtime_from_the_index() -> None:
    """JetPack brings TensorRT and NVIDIA's onnxruntime-gpu wheel: nothing here may replace them, and
    the core requires no ONNX Runtime either (declared requirements; the extra resolves as cuda12's)."""
    names = [_name(r) for r in [*PROJECT["dependencies"], *extra("jetson")]]
    assert not [n for n in names if n in ONNXRUNTIME_DISTRIBUTIONS or n.startswith("tensorrt")], names
    bindings = next(r for r in extra("jetson") if _name(r) == "cuda-bindings")
    assert "<13" in bindings.replace(" ", ""), bindings  # JetPack 6 is CUDA 12


@pytest.mark.parametrize(("torch_version", "target"), [("2.14.1", "cuda13"), ("2.10.0", "cuda12")])
def test_torch_declares_the_cuda_bindings_that_keep_train_on_one_major(
    torch_version: str, target: str, tmp_path: Path
) -> None:
    """With `train`, the resolver picks torch by the target's cuda-bindings bound: PyPI's torch declares
    the cuda-bindings of its CUDA major, so a release of the other major conflicts with the extra. Read
    from torch's declared requirements (a full resolve backtracks through torch's releases)."""
    from packaging.requirements import Requirement

    torch = pip_report(tmp_path, [f"torch=={torch_version}"], no_deps=True)["torch"]
    declared = [Requirement(r.split(";")[0]) for r in torch.requires if _name(r) == "cuda-bindings"]
    assert declared, torch.requires
    # The lowest version the declaration allows (==12.9.4 -> 12.9.4, >=13.0.3,<14 -> 13.0.3).
    lowest = next(s.version for s in declared[0].specifier if s.operator in ("==", ">="))
    assert int(lowest.split(".")[0]) == TARGETS[target].cuda_major
    other = next(t for t in ("cuda12", "cuda13") if t != target)
    bounds = {
        t: Requirement(next(r for r in extra(t) if _name(r) == "cuda-bindings")).specifier
        for t in (target, other)
    }
    # This torch fits its own target and conflicts with the other's: there pip backtracks to another torch.
    assert bounds[target].contains(lowest) and not bounds[other].contains(lowest), bounds
