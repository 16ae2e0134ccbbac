"""The edge install, for real: `pip install '.[cpu]'` into a fresh virtual environment without torch.

A run directory is made by the full environment (`reviewkd export --model` of a CIFAR ResNet on an
ImageFolder of digits), then the edge environment's own `reviewkd` serves, validates, benchmarks,
reports and packages it for Triton, as real processes; what needs torch exits 3 naming the install.
The environment installs the package's core dependencies from the package index (pip's cache makes
a rerun fast) and nothing else: no torch, no torchvision, no matplotlib.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from reviewkd.models import create_model
from tests.helpers import REPO_ROOT, make_detection_run
from tests.test_import_isolation import NOT_FOR_PREDICT, PREDICT_IMPORTS_SCRIPT

pytestmark = pytest.mark.slow

# What `pip install .` needs of the checkout: the packages and the files pyproject.toml names.
PACKAGE_SOURCES = ("reviewkd", "export", "deploy", "benchmarks", "pyproject.toml", "README.md")
ARCH = "cifar_resnet20"
SIZE = 16


def _clean_env() -> dict[str, str]:
    """The environment of a user's shell: nothing that points Python at this checkout."""
    return {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}


def _run(argv: list[str | Path], cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(a) for a in argv], cwd=cwd, env=_clean_env(), capture_output=True, text=True, timeout=timeout
    )


@pytest.fixture(scope="module")
def edge_venv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A virtual environment holding `pip install '.[cpu]'` of this checkout and nothing else."""
    root = tmp_path_factory.mktemp("edge")
    source = root / "source"
    for name in PACKAGE_SOURCES:
        origin = REPO_ROOT / name
        if origin.is_dir():
            shutil.copytree(origin, source / name, ignore=shutil.ignore_patterns("__pycache__", "scripts"))
        else:
            source.mkdir(exist_ok=True)
            shutil.copyfile(origin, source / name)
    venv = root / "venv"
    created = _run([sys.executable, "-m", "venv", venv], cwd=root)
    assert created.returncode == 0, created.stderr
    installed = _run(
        [venv / "bin" / "python", "-m", "pip", "install", "--quiet", f"{source}[cpu]"], cwd=root, timeout=900
    )
    assert installed.returncode == 0, installed.stderr[-3000:]
    return venv


@pytest.fixture(scope="module")
def full_env_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A run made by the full environment's `reviewkd export --model`, and one of its images."""
    from sklearn.datasets import load_digits

    root = tmp_path_factory.mktemp("full")
    digits = load_digits()
    for split, picks in (("train", range(0, 300)), ("val", range(300, 360))):
        for index in picks:
            folder = root / "digits" / split / str(digits.target[index])
            folder.mkdir(parents=True, exist_ok=True)
            grey = (digits.images[index] * (255.0 / 16.0)).astype(np.uint8)
            Image.fromarray(grey).convert("RGB").resize((SIZE, SIZE)).save(folder / f"{index}.png")
    torch.manual_seed(0)
    weights = root / "weights.safetensors"
    save_file(create_model(ARCH, 10).state_dict(), str(weights))
    run = root / "run"
    exported = _run(
        [
            sys.executable, "-m", "reviewkd.app.cli", "export", "--model", ARCH, "--weights", weights,
            "--input-shape", f"3,{SIZE},{SIZE}", "--out", run, "--data", root / "digits",
            "--formats", "onnx,fp16", "--check-samples", "60",
        ],
        cwd=REPO_ROOT,
    )  # fmt: skip
    assert exported.returncode == 0, exported.stderr
    image = next((root / "digits" / "val").rglob("*.png"))
    return run, image


def test_the_edge_install_serves_validates_and_reports_a_run_without_torch(
    edge_venv: Path, full_env_run: tuple[Path, Path], tmp_path: Path
) -> None:
    run, image = full_env_run
    python, reviewkd = edge_venv / "bin" / "python", edge_venv / "bin" / "reviewkd"
    missing = _run(
        [python, "-c", "import importlib.util as u; print(u.find_spec('torch'), u.find_spec('matplotlib'))"],
        cwd=tmp_path,
    )
    assert missing.stdout.split() == ["None", "None"], missing

    # predict: the same answer as the full environment gives on the same file.
    edge = _run([reviewkd, "predict", run, image, "--json", "--top-k", "3"], cwd=tmp_path)
    assert edge.returncode == 0, edge.stderr
    full = _run(
        [sys.executable, "-m", "reviewkd.app.cli", "predict", run, image, "--json", "--top-k", "3"],
        cwd=REPO_ROOT,
    )
    assert full.returncode == 0, full.stderr
    edge_top = json.loads(edge.stdout)["predictions"][0]["top_k"]
    full_top = json.loads(full.stdout)["predictions"][0]["top_k"]
    assert [e["class"] for e in edge_top] == [f["class"] for f in full_top]
    np.testing.assert_allclose(
        [e["probability"] for e in edge_top], [f["probability"] for f in full_top], atol=1e-6
    )

    # In the install a new user gets, predict imports neither onnx nor torch (the cold start's facts).
    facts = _run([python, "-c", PREDICT_IMPORTS_SCRIPT, run, image], cwd=tmp_path)
    assert facts.returncode == 0, facts.stderr
    assert set(NOT_FOR_PREDICT).isdisjoint(json.loads(facts.stdout)["top_level"])

    # The run's validation split, copied as an image folder without torch, validates the same images.
    exported = _run([reviewkd, "export-data", run, "--out", tmp_path / "val"], cwd=tmp_path)
    assert exported.returncode == 0, exported.stderr
    assert len(list((tmp_path / "val").rglob("*.png"))) == 60

    # validate reads the run's ImageFolder validation split without torch, against the fp32 ONNX file.
    validate = _run([reviewkd, "validate", run, "--device", "cpu"], cwd=tmp_path)
    assert validate.returncode == 0, validate.stdout + validate.stderr
    assert "reference: onnxruntime/fp32 (torch is not installed here" in validate.stdout
    result = json.loads((run / "report" / "validate.json").read_text(encoding="utf-8"))
    assert result["images"] == 60 and "torch is not installed" in result["reference_note"]
    assert result["results"]["torch/fp32"]["status"] == "skipped"
    assert result["results"]["onnxruntime/fp16"]["parity"]["n"] == 60

    bench = _run(
        [reviewkd, "bench", run, "--device", "cpu", "--batch-sizes", "1,4", "--iters", "3"], cwd=tmp_path
    )
    assert bench.returncode == 0, bench.stderr
    report = _run([reviewkd, "report", run], cwd=tmp_path)
    assert report.returncode == 0, report.stderr
    document = json.loads((run / "report" / "report.json").read_text(encoding="utf-8"))
    assert document["onnxruntime/fp32"]["reference"] is True
    assert document["plots"] == [] and "pip install 'reviewkd[plots]'" in document["plots_note"]
    assert (run / "report" / "report.html").is_file()
    triton = _run([reviewkd, "triton", run, "--out", tmp_path / "repo"], cwd=tmp_path)
    assert triton.returncode == 0, triton.stderr
    assert (tmp_path / "repo" / f"{ARCH}_onnx" / "1" / "model.onnx").is_file()

    # TensorRT engines from the run's ONNX files need no torch: here TensorRT itself is missing.
    engines = _run([reviewkd, "export", run, "--formats", "tensorrt"], cwd=tmp_path)
    assert (
        engines.returncode == 3 and "TensorRT" in engines.stderr and "reviewkd[train]" not in engines.stderr
    )
    # What needs torch exits 3 and names the install.
    for argv in (
        ["export", run, "--formats", "onnx"],
        ["distill", "--out", tmp_path / "d"],
        ["predict", run, image, "--backend", "torch/fp32"],
    ):
        needs_torch = _run([reviewkd, *argv], cwd=tmp_path)
        assert needs_torch.returncode == 3, (argv, needs_torch.stderr)
        assert "pip install 'reviewkd[train]'" in needs_torch.stderr
        assert "Traceback" not in needs_torch.stderr


def test_the_edge_install_draws_a_detectors_boxes(edge_venv: Path, tmp_path: Path) -> None:
    run = make_detection_run(tmp_path)
    image = tmp_path / "picture.png"
    Image.fromarray(np.zeros((32, 48, 3), dtype=np.uint8)).save(image)
    reviewkd = edge_venv / "bin" / "reviewkd"
    edge = _run([reviewkd, "predict", run, image, "--json", "--save-dir", tmp_path / "drawn"], cwd=tmp_path)
    assert edge.returncode == 0, edge.stderr
    full = _run(
        [sys.executable, "-m", "reviewkd.app.cli", "predict", run, image, "--json"], cwd=REPO_ROOT
    )
    assert full.returncode == 0, full.stderr
    edge_found = json.loads(edge.stdout)["predictions"][0]["detections"]
    assert edge_found == json.loads(full.stdout)["predictions"][0]["detections"]
    assert [d["class"] for d in edge_found] == ["two", "zero"]
    with Image.open(tmp_path / "drawn" / "picture.png") as drawn:
        assert drawn.size == (48 * 8, 32 * 8)  # drawn enlarged: 32 px is under MIN_DRAWN_SIDE
    triton = _run([reviewkd, "triton", run, "--out", tmp_path / "repo"], cwd=tmp_path)
    assert triton.returncode == 0, triton.stderr
    assert "fcos_small_student_onnx: onnxruntime_onnx" in triton.stdout
