"""The edge side works without torch: `deploy` and every edge command, in a subprocess where torch
cannot load (an import hook refuses it, as on a device that lacks it)."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from deploy.manifest import read_manifest, record_artifact, write_manifest
from tests.helpers import (
    CLASSES,
    REPO_ROOT,
    add_fp16_file,
    add_int8_files,
    make_detection_run,
    make_run,
    random_batch,
    write_class_folders,
    write_image,
)

BLOCK_TORCH = textwrap.dedent(
    """
    import importlib.abc
    import sys

    class BlockTorch(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in ("torch", "torchvision"):
                raise ModuleNotFoundError(f"No module named {name!r} (blocked)", name=name)
            return None

    sys.meta_path.insert(0, BlockTorch())
    """
)

DEPLOY_SCRIPT = BLOCK_TORCH + textwrap.dedent(
    """
    import importlib
    import json
    import pkgutil

    import deploy, deploy.manifest, deploy.predict, deploy.preprocess, deploy.runners, deploy.triton

    # Every module of deploy, present and future, except the one whose job is to wrap torch.
    modules = [m.name for m in pkgutil.walk_packages(deploy.__path__, "deploy.")]
    for name in modules:
        if name != "deploy.runners.torch_runner":
            importlib.import_module(name)

    import numpy as np
    from deploy.manifest import read_manifest
    from deploy.runners import open_runner

    run, image, repo, batch_file = sys.argv[1:5]
    manifest = read_manifest(run)
    with open_runner("export/student.onnx", manifest=manifest, run_dir=run) as runner:
        logits = runner.infer(np.load(batch_file))
        top = deploy.predict.predict(runner, manifest, [image], top_k=2)
    models = deploy.triton.write_triton_repository(run, repo)

    try:
        import torch  # noqa: F401
    except ImportError:
        blocked = True
    else:
        blocked = False
    forbidden = ("torch", "torchvision", "tensorrt", "reviewkd", "export", "benchmarks")
    heavy = sorted(n for n in sys.modules if n.split(".")[0] in forbidden)
    print(json.dumps({
        "modules": modules, "blocked": blocked, "heavy": heavy, "logits": logits.tolist(),
        "top": top, "models": [m.name for m in models],
    }))
    """
)

# The edge commands through the real command line, each in this process, torch refused throughout.
CLI_SCRIPT = BLOCK_TORCH + textwrap.dedent(
    """
    import contextlib
    import importlib
    import io
    import json
    import pkgutil

    import benchmarks
    from reviewkd.app.cli import main

    # Every library module of benchmarks and every edge command module imports without torch.
    edge_modules = ["reviewkd", "reviewkd.config", "reviewkd.student"]
    import reviewkd.app
    edge_modules += [m.name for m in pkgutil.walk_packages(reviewkd.app.__path__, "reviewkd.app.")]
    edge_modules += [m.name for m in pkgutil.walk_packages(benchmarks.__path__, "benchmarks.")
                     if not m.name.startswith("benchmarks.scripts")]
    edge_modules += ["export.pipeline", "export.check", "export.tensorrt_engine"]
    for name in edge_modules:
        importlib.import_module(name)

    run, image, data, repo = sys.argv[1:5]
    commands = {
        "predict": ["predict", run, image, "--json", "--top-k", "2"],
        "predict_fp16": ["predict", run, image, "--backend", "onnxruntime/fp16"],
        "validate": ["validate", run, "--data", data, "--device", "cpu"],
        "bench": ["bench", run, "--device", "cpu", "--batch-sizes", "1,4", "--iters", "3", "--warmup", "1"],
        "report": ["report", run],
        "triton": ["triton", run, "--out", repo],
        "export_tensorrt": ["export", run, "--formats", "tensorrt"],
        "export_onnx": ["export", run, "--formats", "onnx"],
        "predict_torch": ["predict", run, image, "--backend", "torch/fp32"],
        "predict_plan": ["predict", run, image, "--backend", "tensorrt/fp16"],
        "predict_int8": ["predict", run, image, "--backend", "onnxruntime/int8"],
        "distill": ["distill", "--out", run + "-distill"],
    }
    results = {}
    for key, argv in commands.items():
        out, err = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = main(argv)
        results[key] = {"code": code, "out": out.getvalue(), "err": err.getvalue()}
    results["torch_loaded"] = sorted(n for n in sys.modules if n.split(".")[0] in ("torch", "torchvision"))
    print(json.dumps(results))
    """
)


def _run_blocked(script: str, *args: Path | str) -> str:
    completed = subprocess.run(
        [sys.executable, "-c", script, *map(str, args)],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert completed.returncode == 0, completed.stderr
    return completed.stdout


def test_deploy_runs_without_torch(tmp_path: Path) -> None:
    run, _ = make_run(tmp_path)
    image = write_image(tmp_path / "picture.png", (20, 16))
    batch = random_batch(3)
    np.save(tmp_path / "batch.npy", batch)
    result = json.loads(_run_blocked(DEPLOY_SCRIPT, run, image, tmp_path / "repo", tmp_path / "batch.npy"))
    assert result["blocked"] is True
    assert result["heavy"] == []
    assert {"deploy.runners.onnxruntime_runner", "deploy.predict", "deploy.triton"} <= set(result["modules"])
    # The same file in this process (with torch around) gives the same numbers.
    from deploy.runners import OnnxRuntimeRunner

    with OnnxRuntimeRunner(run / "export" / "student.onnx") as runner:
        np.testing.assert_allclose(
            np.asarray(result["logits"], dtype=np.float32), runner.infer(batch), rtol=1e-6
        )
    assert len(result["top"]) == 1 and len(result["top"][0]) == 2
    assert result["models"] == ["tiny_net_onnx"]
    assert (tmp_path / "repo" / "tiny_net_onnx" / "1" / "model.onnx").is_file()


def test_edge_commands_run_without_torch(tmp_path: Path) -> None:
    run, _ = make_run(tmp_path)
    add_fp16_file(run)
    # The student's weights are part of a run; on the edge they cannot run and are reported skipped.
    (run / "student.safetensors").write_bytes(b"weights that need torch to load")
    manifest = read_manifest(run)
    record_artifact(run, manifest, "student.safetensors", "weights")
    write_manifest(run, manifest)
    image = write_image(tmp_path / "picture.png", (20, 16))
    data = write_class_folders(tmp_path / "val", CLASSES)

    results = json.loads(_run_blocked(CLI_SCRIPT, run, image, data, tmp_path / "repo"))

    assert results["torch_loaded"] == []
    for key in ("predict", "predict_fp16", "validate", "bench", "report", "triton"):
        assert results[key]["code"] == 0, (key, results[key]["err"])
    top = json.loads(results["predict"]["out"])["predictions"][0]["top_k"]
    assert len(top) == 2 and top[0]["class"] in CLASSES
    assert "runner: onnxruntime/fp16" in results["predict_fp16"]["out"]
    # Without torch, parity is against the fp32 ONNX file, and both the output and the file say so.
    assert "reference: onnxruntime/fp32 (torch is not installed here" in results["validate"]["out"]
    validate = json.loads((run / "report" / "validate.json").read_text(encoding="utf-8"))
    assert validate["reference"] == "onnxruntime/fp32"
    assert "torch is not installed" in validate["reference_note"]
    assert validate["images"] == 3 * len(CLASSES)
    assert validate["results"]["torch/fp32"]["status"] == "skipped"
    assert "pip install 'reviewkd[train]'" in validate["results"]["torch/fp32"]["reason"]
    fp16 = validate["results"]["onnxruntime/fp16"]
    assert fp16["status"] == "ok" and fp16["parity"]["n"] == validate["images"]
    assert [g["gate"] for g in fp16["gates"]] == ["min_agreement"]
    report = json.loads((run / "report" / "report.json").read_text(encoding="utf-8"))
    assert report["validation"]["reference"] == "onnxruntime/fp32"
    assert report["onnxruntime/fp32"]["reference"] is True
    assert (tmp_path / "repo" / "tiny_net_onnx" / "1" / "model.onnx").is_file()
    # TensorRT engines need no torch: without TensorRT that is exit 3 naming TensorRT, not torch.
    assert results["export_tensorrt"]["code"] == 3
    trt_error = results["export_tensorrt"]["err"]
    assert "TensorRT" in trt_error and "reviewkd[train]" not in trt_error
    # Advice names a command that works on this install: a missing plan is built here without
    # PyTorch; a missing ONNX file needs the training extra, and the advice says so.
    assert results["predict_plan"]["code"] == 2
    assert f"make it with `reviewkd export {run} --formats tensorrt`" in results["predict_plan"]["err"]
    assert results["predict_int8"]["code"] == 2
    assert (
        f"make it with `reviewkd export {run} --formats int8` where PyTorch is installed"
        " (this install has none: pip install 'reviewkd[train]')"
    ) in results["predict_int8"]["err"]
    # What needs torch exits 3 and names the install.
    for key in ("export_onnx", "predict_torch", "distill"):
        assert results[key]["code"] == 3, (key, results[key]["err"])
        assert "pip install 'reviewkd[train]'" in results[key]["err"]


# `reviewkd predict RUN` as the command line runs it, torch installed and importable: what it imports.
PREDICT_IMPORTS_SCRIPT = textwrap.dedent(
    """
    import contextlib
    import io
    import json
    import sys

    from reviewkd.app.cli import main

    run, image, *backend = sys.argv[1:]
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = main(["predict", run, image, *backend])
    top_level = sorted({name.split(".")[0] for name in sys.modules})
    print(json.dumps({"code": code, "out": out.getvalue(), "top_level": top_level}))
    """
)
# What a serving device's cold start cannot afford: the training stack, and onnx, whose import (with
# the ml_dtypes it pulls in) cost over a second in a fresh install (benchmarks/RESULTS.md).
NOT_FOR_PREDICT = ("torch", "torchvision", "onnx", "ml_dtypes", "onnxscript")


@pytest.fixture(scope="module")
def run_with_every_onnx_file(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A run with its fp32, fp16 and two int8 ONNX files (the TensorRT flavour runs its Q/DQ
    unfused, an option fixed before the session exists), and an image."""
    folder = tmp_path_factory.mktemp("predict_imports")
    run, _ = make_run(folder)
    add_fp16_file(run)
    add_int8_files(run)
    return run, write_image(folder / "picture.png", (20, 16))


@pytest.mark.parametrize(
    "backend",
    [
        [],
        ["--backend", "onnxruntime/fp16"],
        ["--backend", "onnxruntime/int8"],
        ["--backend", "onnxruntime/int8-trt"],
    ],
)
def test_predict_on_a_run_imports_neither_onnx_nor_torch(
    run_with_every_onnx_file: tuple[Path, Path], backend: list[str]
) -> None:
    run, image = run_with_every_onnx_file
    completed = subprocess.run(
        [sys.executable, "-c", PREDICT_IMPORTS_SCRIPT, str(run), str(image), *backend],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert completed.returncode == 0, completed.stderr
    result = json.loads(completed.stdout)
    assert result["code"] == 0, completed.stderr
    assert "runner: onnxruntime/" in result["out"]
    assert "onnxruntime" in result["top_level"]
    assert sorted(set(NOT_FOR_PREDICT) & set(result["top_level"])) == []


def test_a_detection_run_is_served_without_torch(tmp_path: Path) -> None:
    """predict (JSON and drawn boxes) and triton on a detection run, torch refused throughout; predict
    imports neither onnx nor torch where torch is installed either."""
    run = make_detection_run(tmp_path)
    image = write_image(tmp_path / "picture.png", (48, 32))
    results = json.loads(
        _run_blocked(DETECTION_CLI_SCRIPT, run, image, tmp_path / "drawn", tmp_path / "repo")
    )
    assert results["torch_loaded"] == []
    for key in ("predict", "triton"):
        assert results[key]["code"] == 0, (key, results[key]["err"])
    (prediction,) = json.loads(results["predict"]["out"])["predictions"]
    assert [d["class"] for d in prediction["detections"]] == ["two", "zero"]
    assert prediction["detections"][0]["box"] == [4.0, 6.0, 20.0, 24.0]
    with Image.open(tmp_path / "drawn" / "picture.png") as drawn:
        assert drawn.size == (48 * 8, 32 * 8)  # drawn enlarged: 32 px is under MIN_DRAWN_SIDE
    assert (tmp_path / "repo" / "fcos_small_student_onnx" / "1" / "model.onnx").is_file()

    completed = subprocess.run(
        [sys.executable, "-c", PREDICT_IMPORTS_SCRIPT, str(run), str(image), "--save-dir", tmp_path / "d"],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert completed.returncode == 0, completed.stderr
    facts = json.loads(completed.stdout)
    assert facts["code"] == 0 and "runner: onnxruntime/fp32" in facts["out"]
    assert sorted(set(NOT_FOR_PREDICT) & set(facts["top_level"])) == []


DETECTION_CLI_SCRIPT = BLOCK_TORCH + textwrap.dedent(
    """
    import contextlib
    import io
    import json

    from reviewkd.app.cli import main

    run, image, drawn, repo = sys.argv[1:5]
    commands = {
        "predict": ["predict", run, image, "--json", "--save-dir", drawn],
        "triton": ["triton", run, "--out", repo],
    }
    results = {}
    for key, argv in commands.items():
        out, err = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = main(argv)
        results[key] = {"code": code, "out": out.getvalue(), "err": err.getvalue()}
    results["torch_loaded"] = sorted(n for n in sys.modules if n.split(".")[0] in ("torch", "torchvision"))
    print(json.dumps(results))
    """
)
