"""`deploy` works on a serving device without torch: checked in a subprocess where torch cannot load."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np

from tests.helpers import REPO_ROOT, make_run, random_batch, write_image

# Runs with an import hook that refuses torch (and torchvision), as on a device that lacks it.
SCRIPT = textwrap.dedent(
    """
    import importlib
    import importlib.abc
    import json
    import pkgutil
    import sys

    class BlockTorch(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in ("torch", "torchvision"):
                raise ImportError(f"{name} is blocked: this device has no torch")
            return None

    sys.meta_path.insert(0, BlockTorch())

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


def test_deploy_runs_without_torch(tmp_path: Path) -> None:
    run, _ = make_run(tmp_path)
    image = write_image(tmp_path / "picture.png", (20, 16))
    batch = random_batch(3)
    np.save(tmp_path / "batch.npy", batch)
    completed = subprocess.run(
        [
            sys.executable,
            "-c",
            SCRIPT,
            str(run),
            str(image),
            str(tmp_path / "repo"),
            str(tmp_path / "batch.npy"),
        ],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert completed.returncode == 0, completed.stderr
    result = json.loads(completed.stdout)
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
