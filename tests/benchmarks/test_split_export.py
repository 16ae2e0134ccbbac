"""`reviewkd export-data RUN --out FOLDER`: the run's validation split as an image folder that
`reviewkd validate --data` reads back as the same images, made without torch where the split is files."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from benchmarks.images import folder_batches
from deploy.fileio import sha256_file
from deploy.manifest import read_manifest, write_manifest
from reviewkd.app.cli import main
from reviewkd.config import load_config, save_config
from tests.helpers import CLASSES, REPO_ROOT, make_run, write_class_folders
from tests.test_import_isolation import BLOCK_TORCH


def _with_config(run: Path, *overrides: str) -> Path:
    """Give a run the config.yaml a training run writes, with `overrides` (key=value)."""
    save_config(load_config(None, list(overrides)), run / "config.yaml")
    return run


def test_a_digits_split_is_written_as_the_pixels_the_network_was_evaluated_on(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from reviewkd.data import build_data, iter_run_batches

    run, manifest = make_run(tmp_path)
    _with_config(run, "data.image_size=12")
    bundle = build_data(load_config(None, ["data.image_size=12"]))
    manifest["classes"], manifest["input"] = bundle.classes, bundle.manifest_input()  # a digits run's
    manifest["student"]["num_classes"] = len(bundle.classes)  # every reader checks the two agree
    write_manifest(run, manifest)
    out = tmp_path / "val"
    assert main(["export-data", str(run), "--out", str(out)]) == 0
    expected = len(bundle.held_out)  # what validate scores: the test split, not the carved val split
    printed = capsys.readouterr().out
    assert f"{out}: {expected} images of 10 classes (digits split rebuilt by reviewkd.data)" in printed
    assert sorted(p.name for p in out.iterdir()) == manifest["classes"]
    # Read back as `validate --data` reads a folder: the same normalised images, label for label.
    read_back = folder_batches(out, read_manifest(run), 64, None)
    folder_images, folder_labels = map(np.concatenate, zip(*read_back, strict=True))
    run_images, run_labels = map(np.concatenate, zip(*iter_run_batches(run, "test", 64), strict=True))
    order = np.argsort(run_labels, kind="stable")  # the folder lists class by class, in split order
    np.testing.assert_array_equal(folder_labels, run_labels[order])
    np.testing.assert_allclose(folder_images, run_images[order], atol=1e-5)


def test_a_limit_spreads_over_the_split(tmp_path: Path) -> None:
    run, _ = make_run(tmp_path)
    data = tmp_path / "data"
    write_class_folders(data / "train", CLASSES, per_class=1)
    write_class_folders(data / "val", CLASSES, per_class=3)
    _with_config(run, "data.dataset=imagefolder", f"data.root={data}")
    assert main(["export-data", str(run), "--out", str(tmp_path / "some"), "--limit", "4"]) == 0
    assert sorted(p.parent.name for p in (tmp_path / "some").rglob("*.png")) == sorted(CLASSES)


def test_an_imagefolder_split_is_copied_without_torch(tmp_path: Path) -> None:
    run, _ = make_run(tmp_path)
    data = tmp_path / "data"
    write_class_folders(data / "train", CLASSES, per_class=1)
    write_class_folders(data / "val", CLASSES, per_class=2)
    _with_config(run, "data.dataset=imagefolder", f"data.root={data}")
    out = tmp_path / "copy"
    script = BLOCK_TORCH + (
        "import json\nfrom reviewkd.app.cli import main\n"
        "code = main(['export-data', sys.argv[1], '--out', sys.argv[2]])\n"
        "loaded = sorted(n for n in sys.modules if n.startswith('torch'))\n"
        "print(json.dumps({'code': code, 'torch': loaded}))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script, str(run), str(out)],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout.splitlines()[-1]) == {"code": 0, "torch": []}
    copied = {p.relative_to(out).as_posix(): sha256_file(p) for p in out.rglob("*") if p.is_file()}
    original = {p.relative_to(data / "val").as_posix(): sha256_file(p) for p in (data / "val").rglob("*.png")}
    assert copied == original
