"""Hostile and careless input, table-driven: every row is a real run directory or file made bad in
one way, a real `reviewkd` command, the exit code it must give, a fragment its one-line error must
hold, and the check that nothing was half-written (every file under the test folder is byte-for-byte
what it was, apart from the run's lock file).

The rows run through `reviewkd.app.cli.main`, the function the `reviewkd` script calls, so the exit code
is the one the process would return; `test_exit_codes_are_the_same_in_a_real_process` runs one row of
each command as a real subprocess to hold that to account. Alongside the table: the faults a table
cannot express (a full disk, a retrained run, a formats subset merged into earlier results).
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import stat
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from deploy import run_layout
from deploy.manifest import read_manifest, write_manifest
from deploy.run_lock import LOCK_NAME
from reviewkd.app.cli import main
from tests.helpers import REPO_ROOT, make_detection_run, write_png_bomb

# A ReviewKD-free run that trains in seconds: cross-entropy student, 160 digits of 8x8, one epoch.
TINY_TRAINING = [
    "data.image_size=8",
    "data.subset=160",
    "data.val_split=null",  # best epoch on all 360 held-out images: retraining moves it (see below)
    "train.batch_size=32",
    "train.threads=1",
    "train.device=cpu",
    "method.name=ce",
]
MARKER = "pickle-ran-code"


class RunsCode:
    """Unpickling this runs a shell command that leaves MARKER in the working directory."""

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (os.system, (f"touch {MARKER}",))


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One real run for the module: `reviewkd distill` (1 epoch) and `reviewkd export --formats onnx`."""
    run = tmp_path_factory.mktemp("trained") / "run"
    assert main(["distill", "--out", str(run), *TINY_TRAINING, "train.epochs=1"]) == 0
    assert main(["export", str(run), "--formats", "onnx", "--check-samples", "64"]) == 0
    return run


@pytest.fixture(scope="module")
def int8_run(trained_run: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The trained run with its ONNX Runtime int8 file too (min-max calibration, every layer int8: fast)."""
    run = Path(shutil.copytree(trained_run, tmp_path_factory.mktemp("int8") / "run"))
    fast_int8 = ["--calib-method", "minmax", "--max-top1-drop-int8", "-1", "--calib-samples", "64"]
    assert main(["export", str(run), "--formats", "int8", *fast_int8, "--check-samples", "64"]) == 0
    return run


@pytest.fixture(scope="module")
def distilled_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A run distilled from a teacher (KD, its teacher trained first for one epoch): what QAD needs.
    Never exported."""
    run = tmp_path_factory.mktemp("distilled") / "run"
    teacher = ["method.name=kd", "teacher.arch=cifar_resnet20", "teacher.epochs=1"]
    assert main(["distill", "--out", str(run), *TINY_TRAINING[:-1], *teacher, "train.epochs=1"]) == 0
    return run


@pytest.fixture(scope="module")
def qad_run(distilled_run: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The distilled run after one epoch of QAD (RUN/qad/; not exported: the rows need no more)."""
    from reviewkd.qad import quantize_run

    run = Path(shutil.copytree(distilled_run, tmp_path_factory.mktemp("qad") / "run"))
    quantize_run(run, 1, calib_samples=32)
    return run


# Row.base -> the module fixture whose run the row copies and damages.
@pytest.fixture(scope="module")
def detection_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A plain detector trained one epoch on 8 embedded digits canvases: a run of a task whose
    deployment stages are not built."""
    folder = tmp_path_factory.mktemp("detection")
    tiny = ["detection.digits_train_images=8", "detection.digits_val_images=4", "train.batch_size=4"]
    tiny.append("data.val_split=null")  # the default carves 128 training canvases
    settings = [f"data.root={folder / 'data'}", *tiny, "train.epochs=1", "method.name=plain"]
    assert main(["distill", "--config", "digits_detection", "--out", str(folder / "run"), *settings]) == 0
    return folder / "run"


BASE_RUNS = {
    "trained": "trained_run",
    "int8": "int8_run",
    "distilled": "distilled_run",
    "qad": "qad_run",
    "detection": "detection_run",
}


def private_copy(request: pytest.FixtureRequest, base: str, tmp_path: Path) -> Path:
    """A private copy of one of the module's runs, free to be damaged."""
    return Path(shutil.copytree(request.getfixturevalue(BASE_RUNS[base]), tmp_path / "run"))


@pytest.fixture
def run(trained_run: Path, tmp_path: Path) -> Path:
    """A private copy of the trained run, free to be damaged."""
    return Path(shutil.copytree(trained_run, tmp_path / "run"))


def snapshot(root: Path) -> dict[str, str]:
    """sha256 of every file under `root` (the lock file aside: taking it is not writing the run)."""
    return {
        path.relative_to(root).as_posix(): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(root.rglob("*"))
        if path.is_file() and path.name != LOCK_NAME
    }


def run_cli(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    """`reviewkd ARGV` in this process: the exit code, stdout and stderr."""
    try:
        code = main(argv)
    except SystemExit as exc:  # argparse's own usage errors
        code = int(exc.code or 0)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


# --- ways to make an input bad; each returns the argv to run ------------------------------------------

Setup = Callable[[Path, Path], list[str]]
VALIDATE_RECORDS = ("run/report/validate.json", "run/manifest.json")


def _image(tmp: Path, name: str = "img.png") -> Path:
    path = tmp / name
    Image.fromarray(np.full((9, 9, 3), 90, dtype=np.uint8)).save(path)
    return path


def _images_of_one_name(tmp: Path) -> list[Path]:
    """Two images named img.png, in folders a/ and b/."""
    for side in ("a", "b"):
        (tmp / side).mkdir()
    return [_image(tmp / side) for side in ("a", "b")]


def _edit_manifest(run: Path, change: Callable[[dict[str, object]], None]) -> None:
    manifest = read_manifest(run)
    change(manifest)
    write_manifest(run, manifest)


def _write(path: Path, data: bytes | str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(data, str):
        path.write_text(data, encoding="utf-8")
    else:
        path.write_bytes(data)
    return path


def _pickle_running_code(path: Path) -> Path:
    torch.save({"conv.weight": torch.zeros(1), "payload": RunsCode()}, path)
    return path


def _predict(run: Path, *images: Path | str, extra: tuple[str, ...] = ()) -> list[str]:
    return ["predict", str(run), *(str(i) for i in images), *extra]


# A detection data set of two 32x24 grey images: distill reads it (train split, then val) before it
# writes anything. Each split's annotations start from one box of category 7 ("seven") per image.
DETECTION_DISTILL = [
    "--config",
    "digits_detection",
    "method.name=plain",
    "train.epochs=1",
    "detection.height=24",
    "detection.width=32",
]


def _detection_images(folder: Path) -> list[str]:
    for name in ("a.png", "b.png"):
        Image.fromarray(np.full((24, 32, 3), 90, dtype=np.uint8)).save(folder / name)
    return ["a.png", "b.png"]


def _coco(tmp: Path, train: Callable[[dict[str, Any]], object] | str) -> list[str]:
    """`reviewkd distill` on a COCO data set whose val JSON is whole and whose train JSON is changed by
    `train` (or replaced by the text `train`)."""
    root = tmp / "coco"
    root.mkdir()
    names = _detection_images(root)
    splits = {}
    for split in ("train", "val"):
        splits[split] = {
            "images": [{"id": i, "file_name": n, "width": 32, "height": 24} for i, n in enumerate(names, 1)],
            "categories": [{"id": 7, "name": "seven"}],
            "annotations": [
                {"id": i, "image_id": i, "category_id": 7, "bbox": [2, 3, 12, 10]} for i in (1, 2)
            ],
        }
    _write(root / "val.json", json.dumps(splits["val"]))
    if isinstance(train, str):
        _write(root / "train.json", train)
    else:
        train(splits["train"])
        _write(root / "train.json", json.dumps(splits["train"]))
    settings = [f"data.root={root}", "detection.format=coco", "detection.train=train.json"]
    settings.append("detection.val=val.json")
    return ["distill", "--out", str(tmp / "o"), *DETECTION_DISTILL, *settings]


def _yolo(tmp: Path, label_line: str) -> list[str]:
    """`reviewkd distill` on a YOLO data set (images/train, images/val, labels/..., classes.txt) whose
    train image a.png has the label line `label_line`."""
    root = tmp / "yolo"
    for split in ("train", "val"):
        folder = root / "images" / split
        folder.mkdir(parents=True)
        for name in _detection_images(folder):
            _write(root / "labels" / split / f"{Path(name).stem}.txt", "0 0.5 0.5 0.25 0.25\n")
    _write(root / "labels" / "train" / "a.txt", f"{label_line}\n")
    _write(root / "classes.txt", "seven\n")
    settings = [f"data.root={root}", "detection.format=yolo", "detection.train=train", "detection.val=val"]
    return ["distill", "--out", str(tmp / "o"), *DETECTION_DISTILL, *settings]



def _flip_a_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def _loose_unsealed_onnx(tmp: Path, run: Path) -> list[str]:
    import onnx

    model = onnx.load(str(run / "export" / "student.onnx"))
    kept = [p for p in model.metadata_props if p.key != "reviewkd_content_sha256"]
    del model.metadata_props[:]
    model.metadata_props.extend(kept)
    onnx.save(model, str(tmp / "loose.onnx"))
    return ["predict", str(tmp / "loose.onnx"), str(_image(tmp))]


def _loose_altered_onnx(tmp: Path, run: Path) -> list[str]:
    shutil.copyfile(run / "export" / "student.onnx", tmp / "loose.onnx")
    _flip_a_byte(tmp / "loose.onnx")
    return ["predict", str(tmp / "loose.onnx"), str(_image(tmp))]


def _weights_to_external_data(path: Path, run: Path | None = None) -> Path:
    """Move an ONNX file's weights into `<file>.data` beside it (ONNX external data), seal it again
    with its content hash and, for a file of `run`, give the manifest its new sha256, as a hostile
    editor would: every hash then holds, yet none covers the weights."""
    import onnx

    from export.onnx_export import sealed_bytes

    model = onnx.load(str(path))
    weights = {"location": f"{path.name}.data", "size_threshold": 0}
    onnx.save_model(model, str(path), save_as_external_data=True, **weights)
    data = sealed_bytes(onnx.load(str(path), load_external_data=False))
    if run is None:
        path.write_bytes(data)
    else:
        _rewrite_artifact(run, path.relative_to(run).as_posix(), data)
    return path


def _retrained_elsewhere(tmp: Path, run: Path) -> list[str]:
    _edit_manifest(run, lambda m: m["student"].update(sha256="f" * 64))  # type: ignore[attr-defined]
    return _predict(run, _image(tmp))


def _resume_from(tmp: Path, run: Path, checkpoint: Callable[[Path], object]) -> list[str]:
    checkpoint(run / "checkpoints" / "last.pt")
    return ["distill", "--out", str(run), "--resume", "train.epochs=2"]


def _layerwise(run: Path, *extra: str, fmt: str = "onnxruntime/int8") -> list[str]:
    return ["layerwise", str(run), "--format", fmt, *extra]


def _quantize(run: Path, *extra: str, epochs: str = "1") -> list[str]:
    return ["quantize", str(run), "--epochs", epochs, *extra]


def _own_teacher(run: Path) -> Path:
    """Point the run's manifest at its own RUN/teacher/ (a copy records the original's); return that file."""
    teacher = run / "teacher" / "teacher.safetensors"
    _edit_manifest(run, lambda m: m["teacher"].update(weights=str(teacher)))  # type: ignore[attr-defined]
    return teacher


def _rewrite_artifact(run: Path, rel: str, data: bytes) -> None:
    """Replace a listed file and give the manifest its new sha256 and size, as a hostile editor would."""
    _write(run / rel, data)
    raw = json.loads((run / "manifest.json").read_text())
    raw["artifacts"][rel].update(sha256=hashlib.sha256(data).hexdigest(), size_bytes=len(data))
    (run / "manifest.json").write_text(json.dumps(raw))


@dataclass(frozen=True)
class Row:
    """One bad input: how to make it, the exit code and a fragment of the one-line error."""

    name: str
    setup: Setup
    code: int
    fragment: str
    one_line: bool = True  # argparse's own usage errors print the usage line first
    # Files the command writes whole even so: validate records the failure it found in
    # report/validate.json (and lists that file in the manifest) before it exits.
    records: tuple[str, ...] = ()
    base: str = "trained"  # the run the row damages a copy of: a key of BASE_RUNS


ROWS: tuple[Row, ...] = (
    # ---- export-data: the run's validation split as an image folder
    Row(
        "export-data: --out inside the run",
        lambda t, r: ["export-data", str(r), "--out", str(r / "val")],
        2,
        "inside the run",
    ),
    Row(
        "export-data: --out not empty",
        lambda t, r: ["export-data", str(r), "--out", str(_write(t / "val" / "keep.txt", "mine").parent)],
        2,
        "not empty",
    ),
    Row(
        "export-data: a class name that climbs out of --out",
        lambda t, r: _then(
            _edit_manifest(r, lambda m: m["classes"].__setitem__(0, "../escaped")),  # type: ignore[attr-defined]
            ["export-data", str(r), "--out", str(t / "val")],
        ),
        2,
        "cannot name a folder",
    ),
    # ---- predict: images
    Row(
        "predict: missing image", lambda t, r: _predict(r, t / "none.png"), 2, "none.png: no such image file"
    ),
    Row("predict: a folder as image", lambda t, r: _predict(r, t), 2, "no such image file"),
    Row(
        "predict: empty image file",
        lambda t, r: _predict(r, _write(t / "e.png", b"")),
        2,
        "e.png: cannot read",
    ),
    Row("predict: text named .png", lambda t, r: _predict(r, _write(t / "t.png", "hello")), 2, "cannot read"),
    Row(
        "predict: truncated PNG",
        lambda t, r: _predict(r, _write(t / "cut.png", _image(t).read_bytes()[:40])),
        2,
        "cut.png: cannot read as an image",
    ),
    Row(
        "predict: decompression bomb",
        lambda t, r: _predict(r, write_png_bomb(t / "bomb.png")),
        2,
        "bomb.png: refused, too many pixels",
    ),
    Row(
        "predict: float pixels outside 0-1",
        lambda t, r: _predict(r, _save(t / "f.tiff", np.full((8, 8), 3.0, np.float32), "F")),
        2,
        "floating-point pixels span 3 to 3",
    ),
    Row(
        "predict: 32-bit pixels above 16 bits",
        lambda t, r: _predict(r, _save(t / "i.tiff", np.full((8, 8), 1 << 20, np.int32), "I")),
        2,
        "32-bit integer pixels span",
    ),
    # ---- predict: options and targets
    Row("predict: --top-k 0", lambda t, r: _predict(r, _image(t), extra=("--top-k", "0")), 2, "--top-k"),
    Row(
        "predict: --backend of a format the run lacks",
        lambda t, r: _predict(r, _image(t), extra=("--backend", "onnxruntime/int4")),
        2,
        "no onnxruntime/int4 file in the manifest",
    ),
    Row(
        "predict: --backend without precision",
        lambda t, r: _predict(r, _image(t), extra=("--backend", "onnxruntime")),
        2,
        "expected <backend>/<precision>",
    ),
    Row(
        "predict: no such target", lambda t, r: _predict(t / "nothing", _image(t)), 2, "no such run directory"
    ),
    Row("predict: folder without manifest", lambda t, r: _predict(t, _image(t)), 2, "no manifest.json"),
    Row(
        "predict: manifest not JSON",
        lambda t, r: _predict(_parent(_write(t / "m" / "manifest.json", "{oops")), _image(t)),
        2,
        "not a readable JSON manifest",
    ),
    Row(
        "predict: manifest a JSON list",
        lambda t, r: _predict(_parent(_write(t / "m" / "manifest.json", "[1, 2]")), _image(t)),
        2,
        "not a reviewkd manifest",
    ),
    Row(
        "predict: manifest from the future",
        lambda t, r: _predict(
            _parent(_write(t / "m" / "manifest.json", '{"schema_version": 99}')), _image(t)
        ),
        2,
        "manifest schema version 99",
    ),
    Row(
        "predict: ONNX file changed after export",
        lambda t, r: _then(_flip_a_byte(r / "export" / "student.onnx"), _predict(r, _image(t))),
        2,
        "does not match the manifest",
    ),
    Row(
        "predict: ONNX file removed",
        lambda t, r: _then((r / "export" / "student.onnx").unlink(), _predict(r, _image(t))),
        2,
        "listed in the manifest but missing",
    ),
    Row(
        "predict: export from an older student", _retrained_elsewhere, 2, "re-export it with `reviewkd export"
    ),
    Row("predict: loose ONNX without content hash", _loose_unsealed_onnx, 2, "carries no content hash"),
    Row("predict: loose ONNX altered", _loose_altered_onnx, 2, "loose.onnx: "),
    # ONNX external data: weights in another file, which no sha256 covers (issue 22 item 9)
    Row(
        "predict: ONNX weights moved to external data, the manifest re-hashed",
        lambda t, r: _then(
            _weights_to_external_data(r / "export" / "student.onnx", r), _predict(r, _image(t))
        ),
        2,
        "keep their data in another file (ONNX external data)",
    ),
    Row(
        "validate: ONNX weights moved to external data, the manifest re-hashed",
        lambda t, r: _then(_weights_to_external_data(r / "export" / "student.onnx", r), _validate(r)),
        2,
        "keep their data in another file (ONNX external data)",
        records=VALIDATE_RECORDS,
    ),
    Row(
        "predict: loose ONNX with external data, sealed again",
        lambda t, r: [
            "predict",
            str(_weights_to_external_data(Path(shutil.copyfile(r / "export/student.onnx", t / "x.onnx")))),
            str(_image(t)),
        ],
        2,
        "keep their data in another file (ONNX external data)",
    ),
    Row(
        "predict: loose random bytes",
        lambda t, r: ["predict", str(_write(t / "x.onnx", os.urandom(256))), str(_image(t))],
        2,
        "x.onnx: ",
    ),
    Row(
        "predict: loose file of unknown type",
        lambda t, r: ["predict", str(_write(t / "x.tflite", b"TFL3")), str(_image(t))],
        2,
        "unknown model file type '.tflite'",
    ),
    # ---- manifests made hostile (issue 11 items 1 and 11)
    Row(
        "predict: artifact key with ..",
        lambda t, r: _then(_add_artifact(t, r, "../outside.onnx"), _predict(r, _image(t))),
        2,
        "'../outside.onnx': expected a relative path inside the run directory",
    ),
    Row(
        "predict: absolute artifact key",
        lambda t, r: _then(_add_artifact(t, r, str(t / "outside.onnx")), _predict(r, _image(t))),
        2,
        "expected a relative path inside the run directory",
    ),
    Row(
        "triton: artifact key with ..",
        lambda t, r: _then(
            _add_artifact(t, r, "export/../../outside.plan"), ["triton", str(r), "--out", str(t / "repo")]
        ),
        2,
        "expected a relative path inside the run directory",
    ),
    Row(
        "predict: artifacts a list",
        lambda t, r: _then(_raw_manifest(r, artifacts=[]), _predict(r, _image(t))),
        2,
        "artifacts: expected an object",
    ),
    Row(
        "predict: artifact entry without sha256",
        lambda t, r: _then(_raw_manifest(r, drop_sha=True), _predict(r, _image(t))),
        2,
        "sha256: expected 64 lower-case hex digits, got None",
    ),
    Row(
        "predict: artifact entry a string",
        lambda t, r: _then(_raw_manifest(r, entry="export/student.onnx"), _predict(r, _image(t))),
        2,
        "expected an object with sha256, size_bytes and kind",
    ),
    Row(
        "predict: input shape of two numbers",
        lambda t, r: _then(_raw_manifest(r, shape=[8, 8]), _predict(r, _image(t))),
        2,
        "input.shape",
    ),
    Row(
        "triton: classes not a list",
        lambda t, r: _then(_raw_manifest(r, classes="cat,dog"), ["triton", str(r), "--out", str(t / "repo")]),
        2,
        "classes: expected a list of class names",
    ),
    Row(
        "report: artifacts a list",
        lambda t, r: _then(_raw_manifest(r, artifacts=[]), ["report", str(r)]),
        2,
        "artifacts: expected an object",
    ),
    # ---- gates (issue 11 items 3 and 16) and validate's exit code for bad files (item 15)
    Row(
        "validate: gate of a mistyped precision",
        lambda t, r: ["validate", str(r), "--gate", "in8:max_top1_drop=0"],
        2,
        "in8",
    ),
    Row(
        "validate: gate of an upper-case precision",
        lambda t, r: ["validate", str(r), "--gate", "INT8:max_top1_drop=0"],
        2,
        "INT8",
    ),
    Row(
        "validate: negative threshold",
        lambda t, r: ["validate", str(r), "--max-abs-diff-fp32", "-1"],
        2,
        "-1",
    ),
    Row(
        "validate: nan threshold",
        lambda t, r: ["validate", str(r), "--max-abs-diff-fp32", "nan"],
        2,
        "finite",
    ),
    Row(
        "validate: agreement above 100%",
        lambda t, r: ["validate", str(r), "--gate", "fp16:min_agreement=150"],
        2,
        "150",
    ),
    Row(
        "validate: top-1 above 100%",
        lambda t, r: ["validate", str(r), "--gate", "fp32:min_top1=200"],
        2,
        "200",
    ),
    Row(
        "validate: ONNX file changed after export",
        lambda t, r: _then(
            _flip_a_byte(r / "export" / "student.onnx"), ["validate", str(r), "--device", "cpu"]
        ),
        2,
        "does not match the manifest",
        records=VALIDATE_RECORDS,
    ),
    Row(
        "validate: ONNX file removed",
        lambda t, r: _then((r / "export" / "student.onnx").unlink(), ["validate", str(r), "--device", "cpu"]),
        2,
        "listed in the manifest but missing",
        records=VALIDATE_RECORDS,
    ),
    # ---- triton
    Row(
        "triton: class name with a line break",
        lambda t, r: _then(
            _edit_manifest(r, lambda m: m["classes"].__setitem__(0, "zero\nmax_batch_size: 0")),  # type: ignore[attr-defined]
            ["triton", str(r), "--out", str(t / "repo")],
        ),
        2,
        "classes[0]",
    ),
    Row(
        "triton: --out names a file",
        lambda t, r: ["triton", str(r), "--out", str(_write(t / "repo", "a file"))],
        2,
        "exists and is not a directory",
    ),
    Row(
        "triton: --name with a path",
        lambda t, r: ["triton", str(r), "--out", str(t / "repo"), "--name", "../up"],
        2,
        "--name",
    ),
    Row(
        "triton: export from an older student",
        lambda t, r: _then(_retrained_elsewhere(t, r), ["triton", str(r), "--out", str(t / "repo")]),
        2,
        "re-export it",
    ),
    # ---- validate, bench, report
    Row(
        "validate: --batch-size 0", lambda t, r: ["validate", str(r), "--batch-size", "0"], 2, "--batch-size"
    ),
    Row(
        "validate: --backends of a format the run lacks",
        lambda t, r: ["validate", str(r), "--backends", "tensorflow"],
        2,
        "--backends tensorflow: not in this run",
    ),
    Row("validate: --threads 0", lambda t, r: ["validate", str(r), "--threads", "0"], 2, "--threads"),
    Row("validate: no such run", lambda t, r: ["validate", str(t / "none")], 2, "no manifest.json"),
    Row("bench: --batch-sizes 0", lambda t, r: ["bench", str(r), "--batch-sizes", "0"], 2, "--batch-sizes"),
    Row(
        "bench: --batch-sizes 1,x", lambda t, r: ["bench", str(r), "--batch-sizes", "1,x"], 2, "--batch-sizes"
    ),
    Row(
        "bench: --compare of one format",
        lambda t, r: ["bench", str(r), "--compare", "onnxruntime/fp32"],
        2,
        "--compare 'onnxruntime/fp32': expected two format keys A,B",
    ),
    Row(
        "bench: --compare naming a format the run lacks",
        lambda t, r: ["bench", str(r), "--compare", "onnxruntime/fp32,onnxruntime/int8", "--iters", "1"],
        2,
        "--compare: onnxruntime/int8 is not a format of",
    ),
    Row(
        "report: earlier validate.json not JSON",
        lambda t, r: ["report", str(_parent(_parent(_write(r / "report" / "validate.json", "{"))))],
        2,
        "validate.json: not readable JSON",
    ),
    Row(
        "validate: report/ is a file",
        lambda t, r: [
            "validate",
            str(_parent(_write(r / "report", "a file"))),
            "--device",
            "cpu",
            "--limit",
            "32",
        ],
        2,
        "report/validate.json: cannot write it",
    ),
    Row(
        "bench: report/ is a file",
        lambda t, r: [
            "bench",
            str(_parent(_write(r / "report", "a file"))),
            "--device",
            "cpu",
            "--batch-sizes",
            "1",
            "--iters",
            "1",
        ],
        2,
        "report/bench.json: cannot write it",
    ),
    Row(
        "report: report/ is a file",
        lambda t, r: ["report", str(_parent(_write(r / "report", "a file")))],
        2,
        "report",
    ),
    Row(
        "triton: --out inside a file",
        lambda t, r: ["triton", str(r), "--out", str(_write(t / "file", "x") / "repo")],
        2,
        "file",
    ),
    Row("report: no such run", lambda t, r: ["report", str(t / "none")], 2, "no manifest.json"),
    # ---- distill and teacher: configs
    Row(
        "distill: --config missing",
        lambda t, r: ["distill", "--config", "nope", "--out", str(t / "o")],
        2,
        "--config nope",
    ),
    Row(
        "distill: YAML syntax error",
        lambda t, r: [
            "distill",
            "--config",
            str(_write(t / "c.yaml", "train:\n  epochs: 1\n x: [\n")),
            "--out",
            str(t / "o"),
        ],
        2,
        "c.yaml: not valid YAML: line 3, column 2",
    ),
    Row(
        "distill: YAML python tag",
        lambda t, r: [
            "distill",
            "--config",
            str(_write(t / "c.yaml", "a: !!python/object/apply:os.system [ls]\n")),
            "--out",
            str(t / "o"),
        ],
        2,
        "could not determine a constructor",
    ),
    Row(
        "distill: YAML not a mapping",
        lambda t, r: ["distill", "--config", str(_write(t / "c.yaml", "- 1\n- 2\n")), "--out", str(t / "o")],
        2,
        "a config must be a YAML mapping",
    ),
    Row(
        "distill: unknown key",
        lambda t, r: ["distill", "--out", str(t / "o"), "train.epoch=3"],
        2,
        "train.epoch",
    ),
    # ---- a detection run: the commands not built for detectors yet (issue 19)
    *(
        Row(
            f"{argv[0]}: a detection run",
            lambda t, r, argv=argv: [argv[0], str(r), *argv[1:]],
            2,
            f"a detection run; {argv[0]} is not available",
            base="detection",
        )
        for argv in (
            ("quantize", "--epochs", "1"),
            ("export-data", "--out", "val"),
        )
    ),
    *(
        Row(
            f"{argv[0]}: a detection run with {argv[1]}",
            lambda t, r, argv=argv: [argv[0], str(r), *argv[1:]],
            2,
            "--backends and --device cuda are not available for it yet",
            base="detection",
        )
        for argv in (("validate", "--device", "cuda"), ("bench", "--backends", "onnxruntime"))
    ),
    Row(
        "predict: --backend torch/fp32 on a detection run",
        lambda t, r: ["predict", str(r), str(_write(t / "x.png", "")), "--backend", "torch/fp32"],
        2,
        "a detection run, whose predictions come from its exported files only",
        base="detection",
    ),


    # predict and triton serve a detection run's files; a run not exported has none
    Row(
        "predict: a detection run not exported",
        lambda t, r: _predict(r, _image(t)),
        2,
        "no onnxruntime/fp32 file in the manifest (has: none)",
        base="detection",
    ),
    Row(
        "predict: --save-dir names a file",
        lambda t, r: _predict(
            make_detection_run(t), _image(t), extra=("--save-dir", str(_write(t / "o", "a file")))
        ),
        2,
        "o: exists and is not a directory",
    ),
    Row(
        "predict: --save-dir with two images of one name",
        lambda t, r: _predict(
            make_detection_run(t),
            *_images_of_one_name(t),
            extra=("--save-dir", str(t / "drawn")),
        ),
        2,
        "would both be drawn to img.png; give images of different names",
    ),
    Row(
        "triton: a detection run not exported",
        lambda t, r: ["triton", str(r), "--out", str(t / "repo")],
        2,
        "no onnxruntime/fp32 file in the manifest (has: none)",
        base="detection",
    ),
    Row(
        "distill: a task that does not exist",
        lambda t, r: ["distill", "--out", str(t / "o"), "task=segmentation"],
        2,
        "config key task: 'segmentation' is not one of classification, detection",
    ),
    Row(
        "distill: a classification method for a detection run",
        lambda t, r: ["distill", "--config", "digits_detection", "--out", str(t / "o"), "method.name=kd"],
        2,
        "config key method.name: 'kd' is not one of plain, reviewkd",
    ),
    Row(
        "distill: detection from COCO without data.root",
        lambda t, r: [
            "distill",
            "--config",
            "digits_detection",
            "--out",
            str(t / "o"),
            "detection.format=coco",
        ],
        2,
        "config key data.root: required for detection.format=coco",
    ),
    Row(
        "distill: a classifier's name as the detection student",
        lambda t, r: [
            "distill",
            "--config",
            "digits_detection",
            "--out",
            str(t / "o"),
            "student.arch=cifar_resnet20",
            "method.name=plain",
        ],
        2,
        "config key student.arch: detector 'cifar_resnet20' is unknown",
    ),
    # ---- detection data: distill reads each split's annotations before it writes anything
    Row(
        "distill: an empty COCO annotation file",
        lambda t, r: _coco(t, ""),
        2,
        "train.json is empty; expected COCO-format JSON",
    ),
    Row(
        "distill: a COCO box wholly outside its image",
        lambda t, r: _coco(t, lambda d: d["annotations"][1].update(bbox=[40, 3, 5, 5])),
        2,
        "train.json: annotations[1]: box [40, 3, 45, 8] lies wholly outside the 32x24 image",
    ),
    Row(
        "distill: COCO images without a single box",
        lambda t, r: _coco(t, lambda d: d.update(annotations=[])),
        2,
        "train.json: none of its 2 images holds a box; the train split needs annotated objects",
    ),
    Row(
        "distill: a COCO category id not in categories",
        lambda t, r: _coco(t, lambda d: d["annotations"][0].update(category_id=3)),
        2,
        "train.json: annotations[0]: category_id 3 is not in 'categories' (ids [7])",
    ),
    Row(
        "distill: a YOLO label line of four fields",
        lambda t, r: _yolo(t, "0 0.5 0.5 0.25"),
        2,
        "a.txt line 1: 4 fields; expected 5 (class cx cy w h, normalised to 0-1)",
    ),
    Row(
        "distill: a YOLO box wholly outside its image",
        lambda t, r: _yolo(t, "0 1.5 0.5 0.25 0.25"),
        2,
        "lies wholly outside the 32x24 image",
    ),
    Row(
        "distill: a YOLO class index past the class names",
        lambda t, r: _yolo(t, "3 0.5 0.5 0.25 0.25"),
        2,
        "a.txt line 1: class 3 is not a class index 0..0 (1 names in",
    ),
    Row(
        "distill: a detection val split as large as the training set",
        lambda t, r: [
            "distill",
            "--config",
            str(r / "config.yaml"),
            "--out",
            str(t / "o"),
            "data.val_split=8",
        ],
        2,
        "config key data.val_split: 8 is not fewer than the 8 training images",
        base="detection",
    ),
    Row(
        "distill: unparsable override",
        lambda t, r: ["distill", "--out", str(t / "o"), "train.epochs=[1"],
        2,
        "override train.epochs: cannot parse value '[1' (line 1, column 3",
    ),
    Row(
        "distill: --out names a file",
        lambda t, r: ["distill", "--out", str(_write(t / "o", "a file")), *TINY_TRAINING],
        2,
        "cannot write it",
    ),
    Row(
        "distill: again into a finished run without --resume",
        lambda t, r: ["distill", "--out", str(r), *TINY_TRAINING],
        2,
        "already holds a training run",
    ),
    Row(
        "distill: resume from a corrupt checkpoint",
        lambda t, r: _resume_from(t, r, lambda p: _write(p, b"PK\x03\x04 not a zip")),
        2,
        "last.pt: cannot read the checkpoint",
    ),
    Row(
        "distill: resume from a checkpoint that runs code",
        lambda t, r: _resume_from(t, r, _pickle_running_code),
        2,
        "unpickling them could run arbitrary code",
    ),
    Row(
        "distill: teacher weights that run code",
        lambda t, r: [
            "distill",
            "--out",
            str(t / "o"),
            *TINY_TRAINING[:-1],
            "method.name=kd",
            f"teacher.weights={_pickle_running_code(t / 'teacher.pt')}",
        ],
        2,
        "unpickling them could run arbitrary code",
    ),
    # ---- export
    Row(
        "export: weights that run code",
        lambda t, r: _export_model(t, _pickle_running_code(t / "w.pt")),
        2,
        "besides tensors (the global posix.system); unpickling them could run arbitrary code",
    ),
    Row(
        "export: truncated checkpoint",
        lambda t, r: _export_model(t, _write(t / "w.pt", b"PK\x03\x04\x14\x00")),
        2,
        "w.pt is neither a safetensors file nor a torch checkpoint",
    ),
    Row("export: missing weights", lambda t, r: _export_model(t, t / "none.pt"), 2, "none.pt not found"),
    Row(
        "export: --input-shape of two numbers",
        lambda t, r: [*_export_model(t, t / "w.pt")[:-2], "--input-shape", "3,32"],
        2,
        "expected C,H,W",
        one_line=False,
    ),
    Row(
        "export: --out names a file",
        lambda t, r: [
            *_export_model(t, r / "student.safetensors")[:4],
            str(_write(t / "plain", "a file")),
            *_export_model(t, r / "student.safetensors")[5:],
        ],
        2,
        "plain: cannot write it",
    ),
    Row(
        # distill and teacher refuse to train over a run; export --model would rewrite its manifest and
        # student (issue 22 item 6).
        "export: --model --out a distilled run",
        lambda t, r: [
            *_export_model(t, Path(shutil.copyfile(r / "student.safetensors", t / "w.safetensors")))[:4],
            str(r),
            *_export_model(t, t / "w.safetensors")[5:],
        ],
        2,
        "/run: already holds a run that export --model did not write (checkpoints/last.pt)",
    ),
    Row(
        "export: --model --out a distilled run without its checkpoint",
        lambda t, r: [
            *_export_model(t, Path(shutil.copyfile(r / "student.safetensors", t / "w.safetensors")))[:4],
            str(_without_training_records(r)),
            *_export_model(t, t / "w.safetensors")[5:],
        ],
        2,
        "/run: already holds a run that export --model did not write (manifest.json)",
    ),
    Row(
        "run: --out names a file",
        lambda t, r: ["run", "--out", str(_write(t / "pipeline", "a file")), *TINY_TRAINING],
        2,
        "pipeline: cannot write it",
    ),
    Row(
        "export: --opset 9",
        lambda t, r: ["export", str(r), "--opset", "9"],
        2,
        "--opset 9: export needs opset 18 or newer",
    ),
    Row("export: unknown format", lambda t, r: ["export", str(r), "--formats", "int4"], 2, "--formats"),
    Row(
        "export: a detector's format on a classifier",
        lambda t, r: ["export", str(r), "--formats", "onnx,efficientnms"],
        2,
        "--formats efficientnms: ",
    ),
    Row(
        "export: --bake-preprocessing on a detection run",
        lambda t, r: ["export", str(r), "--formats", "onnx", "--bake-preprocessing"],
        2,
        "--bake-preprocessing: ",
        base="detection",
    ),
    Row(
        "export: student changed after training",
        lambda t, r: _then(_flip_a_byte(r / "student.safetensors"), ["export", str(r), "--formats", "onnx"]),
        2,
        "student.safetensors",
    ),
    Row(
        "export: export/ is a file",
        lambda t, r: _then(
            shutil.rmtree(r / "export"),
            _write(r / "export", "a file"),
            ["export", str(r), "--formats", "onnx"],
        ),
        2,
        "cannot write",
    ),
    Row(
        "export: --max-top1-drop-int8 nan",
        lambda t, r: ["export", str(r), "--formats", "int8", "--max-top1-drop-int8", "nan"],
        2,
        "--max-top1-drop-int8 nan: expected a finite number of top-1 points",
    ),
    # ---- layerwise: formats, options, runs
    Row(
        "layerwise: a format the run lacks",
        lambda t, r: _layerwise(r, fmt="onnxruntime/int8-trt"),
        2,
        "student.int8.trt.onnx: not in the run's manifest",
        base="int8",
    ),
    Row(
        "layerwise: unknown format",
        lambda t, r: _layerwise(r, fmt="onnxruntime/int4"),
        2,
        "--format onnxruntime/int4: expected one of onnxruntime/fp16, onnxruntime/int8, "
        "onnxruntime/int8-trt, onnxruntime/int8-qad, onnxruntime/int8-qad-trt",
    ),
    Row(
        "layerwise: --format of another backend",
        lambda t, r: _layerwise(r, fmt="tensorrt/int8"),
        2,
        "--format tensorrt/int8: expected one of",
    ),
    Row(
        "layerwise: --format of the fp32 file itself",
        lambda t, r: _layerwise(r, fmt="onnxruntime/fp32"),
        2,
        "--format onnxruntime/fp32: expected one of",
    ),
    Row(
        "layerwise: --format a list",
        lambda t, r: _layerwise(r, fmt="int8,fp16"),
        2,
        "--format int8,fp16: expected one of",
    ),
    Row("layerwise: --images 0", lambda t, r: _layerwise(r, "--images", "0"), 2, "--images must be >= 1"),
    Row(
        "layerwise: --images 0 on a detection run",
        lambda t, r: _layerwise(r, "--images", "0"),
        2,
        "--images must be >= 1",
        base="detection",
    ),
    Row(
        "layerwise: a detection run without the format (never exported)",
        lambda t, r: _layerwise(r, fmt="onnxruntime/int8-trt"),
        2,
        "student.onnx: not in the run's manifest (never exported, or it failed its check); expected a"
        " run that went through `reviewkd export",
        base="detection",
    ),
    Row(
        "layerwise: a QAD file of a detection run (quantize does not fine-tune detectors)",
        lambda t, r: _layerwise(r, fmt="onnxruntime/int8-qad"),
        2,
        "--format onnxruntime/int8-qad: a detection run has no QAD files; quantize is not available",
        base="detection",
    ),
    Row(
        "layerwise: the EfficientNMS file of a detection run",
        lambda t, r: _layerwise(r, fmt="onnxruntime/efficientnms"),
        2,
        "--format onnxruntime/efficientnms: export/student.efficientnms.onnx ends in TensorRT's"
        " EfficientNMS_TRT plugin, which ONNX Runtime cannot run",
        base="detection",
    ),
    Row(
        "layerwise: --images not a number",
        lambda t, r: _layerwise(r, "--images", "all"),
        2,
        "argument --images: invalid int value: 'all'",
        one_line=False,
    ),
    Row(
        "layerwise: a run never exported",
        lambda t, r: _layerwise(r),
        2,
        "student.onnx: not in the run's manifest (never exported, or it failed its check); expected a"
        " run that went through `reviewkd export",
        base="distilled",
    ),
    Row(
        "layerwise: QAD files of a run never quantized",
        lambda t, r: _layerwise(r, fmt="onnxruntime/int8-qad-trt"),
        2,
        "student.int8.qad.trt.onnx: not in the run's manifest (never exported, or it failed its check);"
        " expected a run that went through `reviewkd quantize",
        base="int8",
    ),
    Row("layerwise: no such run", lambda t, r: _layerwise(t / "none"), 2, "no manifest.json"),
    Row("layerwise: a folder that is no run", lambda t, r: _layerwise(t), 2, "no manifest.json"),
    Row(
        "layerwise: int8 file changed after export",
        lambda t, r: _then(_flip_a_byte(r / "export" / "student.int8.onnx"), _layerwise(r)),
        2,
        "student.int8.onnx: sha256",
        base="int8",
    ),
    Row(
        "layerwise: int8 file removed",
        lambda t, r: _then((r / "export" / "student.int8.onnx").unlink(), _layerwise(r)),
        2,
        "student.int8.onnx: listed in the manifest but missing",
        base="int8",
    ),
    Row(
        "layerwise: fp32 file removed",
        lambda t, r: _then((r / "export" / "student.onnx").unlink(), _layerwise(r)),
        2,
        "student.onnx: listed in the manifest but missing",
        base="int8",
    ),
    Row(
        "layerwise: int8 file not ONNX, the manifest re-hashed",
        lambda t, r: _then(
            _rewrite_artifact(r, "export/student.int8.onnx", b"\x08\x07" + os.urandom(254)), _layerwise(r)
        ),
        2,
        "student.int8.onnx: not a readable ONNX file",
        base="int8",
    ),
    Row(
        "layerwise: export from an older student",
        lambda t, r: _then(_retrained_elsewhere(t, r), _layerwise(r)),
        2,
        "it was exported from student",
        base="int8",
    ),
    Row(
        "layerwise: report/ is a file",
        lambda t, r: _then(_write(r / "report", "a file"), _layerwise(r)),
        2,
        "report: cannot write it",
        base="int8",
    ),
    Row(
        "layerwise: run without config.yaml (its images)",
        lambda t, r: _then((r / "config.yaml").unlink(), _layerwise(r)),
        2,
        "config.yaml",
        base="int8",
    ),
    # ---- quantize: options (all checked before the run is read, so before any training)
    Row("quantize: --epochs 0", lambda t, r: _quantize(r, epochs="0"), 2, "--epochs must be >= 1, got 0"),
    Row("quantize: negative --epochs", lambda t, r: _quantize(r, epochs="-3"), 2, "--epochs must be >= 1"),
    Row(
        "quantize: --epochs not an integer",
        lambda t, r: _quantize(r, epochs="1.5"),
        2,
        "argument --epochs: invalid int value: '1.5'",
        one_line=False,
    ),
    Row(
        "quantize: --lr 0",
        lambda t, r: _quantize(r, "--lr", "0"),
        2,
        "--lr must be a finite number > 0, got 0.0",
    ),
    Row("quantize: negative --lr", lambda t, r: _quantize(r, "--lr", "-0.1"), 2, "--lr must be a finite"),
    Row("quantize: --lr nan", lambda t, r: _quantize(r, "--lr", "nan"), 2, "got nan"),
    Row("quantize: --lr inf", lambda t, r: _quantize(r, "--lr", "inf"), 2, "got inf", base="distilled"),
    Row(
        "quantize: negative --kd-weight",
        lambda t, r: _quantize(r, "--kd-weight", "-1"),
        2,
        "--kd-weight must be a finite number >= 0, got -1.0",
        base="distilled",
    ),
    Row(
        "quantize: --kd-weight nan",
        lambda t, r: _quantize(r, "--kd-weight", "nan"),
        2,
        "--kd-weight",
        base="distilled",
    ),
    Row(
        "quantize: --calib-samples 0",
        lambda t, r: _quantize(r, "--calib-samples", "0"),
        2,
        "--calib-samples must be >= 1, got 0",
        base="distilled",
    ),
    Row(
        "quantize: --check-samples 0",
        lambda t, r: _quantize(r, "--check-samples", "0"),
        2,
        "--check-samples must be >= 1, got 0",
        base="distilled",
    ),
    Row(
        "quantize: unknown --device",
        lambda t, r: _quantize(r, "--device", "tpu"),
        2,
        "argument --device: invalid choice: 'tpu'",
        one_line=False,
    ),
    # ---- quantize: runs
    Row("quantize: no such run", lambda t, r: _quantize(t / "none"), 2, "none/manifest.json: no manifest"),
    Row("quantize: a folder that is no run", lambda t, r: _quantize(t), 2, "no manifest.json"),
    Row(
        "quantize: a run without a teacher",
        lambda t, r: _quantize(r),
        2,
        "QAD needs the run's teacher, and the manifest records none",
    ),
    Row(
        "quantize: teacher weights gone",
        lambda t, r: _then(_own_teacher(r).unlink(), _quantize(r)),
        2,
        "teacher/teacher.safetensors does not exist",
        base="distilled",
    ),
    Row(
        # The copy's manifest still names the original run's teacher, which is there and right: QAD
        # would have trained against it (issue 22 item 3).
        "quantize: a copied run without its own teacher",
        lambda t, r: _then((r / "teacher" / "teacher.safetensors").unlink(), _quantize(r)),
        2,
        "pass its weights with --teacher FILE",
        base="distilled",
    ),
    Row(
        "quantize: --teacher another file",
        lambda t, r: _quantize(r, "--teacher", str(_write(t / "other.safetensors", b"other"))),
        2,
        "other.safetensors: sha256 does not match the teacher the run was distilled with",
        base="distilled",
    ),
    Row(
        "quantize: teacher.sha256 not a string",
        lambda t, r: _then(_raw_teacher_sha256(r, 123), _quantize(r)),
        2,
        "manifest.json: teacher.sha256: expected a sha256 digest or null, got 123",
        base="distilled",
    ),
    Row(
        "quantize: --teacher missing",
        lambda t, r: _quantize(r, "--teacher", str(t / "none.safetensors")),
        2,
        "--teacher ",
        base="distilled",
    ),
    Row(
        "quantize: teacher weights changed",
        lambda t, r: _then(_flip_a_byte(_own_teacher(r)), _quantize(r)),
        2,
        "teacher.safetensors: sha256 does not match the teacher the run was distilled with",
        base="distilled",
    ),
    Row(
        "quantize: student changed after training",
        lambda t, r: _then(_flip_a_byte(r / "student.safetensors"), _quantize(r)),
        2,
        "student.safetensors: sha256",
        base="distilled",
    ),
    Row(
        "quantize: student removed",
        lambda t, r: _then((r / "student.safetensors").unlink(), _quantize(r)),
        2,
        "student.safetensors: listed in the manifest but missing",
        base="distilled",
    ),
    Row(
        "quantize: run without config.yaml",
        lambda t, r: _then((r / "config.yaml").unlink(), _quantize(r)),
        2,
        "config.yaml",
        base="distilled",
    ),
    Row(
        "quantize: qad/ is a file",
        lambda t, r: _then(_write(r / "qad", "a file"), _quantize(r)),
        2,
        "qad: cannot write it (not a directory)",
        base="distilled",
    ),
    Row(
        "quantize: export/ is a file",
        lambda t, r: _then(_write(r / "export", "a file"), _quantize(r)),
        2,
        "export: cannot write it (not a directory)",
        base="distilled",
    ),
    # ---- quantize: an existing QAD run
    Row(
        "quantize: twice without --resume",
        lambda t, r: _quantize(r),
        2,
        "already holds a QAD run; pass --resume",
        base="qad",
    ),
    Row(
        "quantize: --resume with another --lr",
        lambda t, r: _quantize(r, "--resume", "--lr", "0.5", epochs="2"),
        2,
        "optim.lr changed)",
        base="qad",
    ),
    Row(
        "quantize: --resume without the calibrated start",
        lambda t, r: _then((r / "qad" / "calibrated.safetensors").unlink(), _quantize(r, "--resume")),
        2,
        "calibrated.safetensors: missing or changed",
        base="qad",
    ),
    Row(
        "quantize: --resume after the student was retrained",
        lambda t, r: _then(_retrained_elsewhere(t, r), _quantize(r, "--resume", epochs="2")),
        2,
        "but the run's student is now ffffffffffff",
        base="qad",
    ),
    # ---- links out of the run (issue 22 items 1 and 2): refused before the first write, the file or
    # the other run they lead to untouched (the snapshot covers the whole test folder)
    Row(
        "validate: .lock a symbolic link to a file outside",
        lambda t, r: _then(_link_out(r, LOCK_NAME, _write(t / "victim.txt", "mine\n")), _validate(r)),
        2,
        ".lock: a symbolic link; the lock file is written",
    ),
    Row(
        "validate: .lock a dangling symbolic link",
        lambda t, r: _then(_link_out(r, LOCK_NAME, t / "created-outside.txt"), _validate(r)),
        2,
        ".lock: a symbolic link; the lock file is written",
    ),
    Row(
        "bench: .lock a hard link to a file outside",
        lambda t, r: _then(
            _link_out(r, LOCK_NAME, _write(t / "victim.txt", "mine\n"), hard=True),
            ["bench", str(r), "--device", "cpu"],
        ),
        2,
        ".lock: 2 hard links; the lock file is written",
    ),
    Row(
        "export: export/ a link into another run",
        lambda t, r: _then(
            _link_into_another_run(t, r, "export"),
            ["export", str(r), "--formats", "onnx", "--check-samples", "16"],
        ),
        2,
        "/run/export: a symbolic link to ",
    ),
    Row(
        "report: report/ a link into another run",
        lambda t, r: _then(_link_into_another_run(t, r, "report"), ["report", str(r)]),
        2,
        "/run/report: a symbolic link to ",
    ),
    Row(
        "validate: report/validate.json a link to a file outside",
        lambda t, r: _then(
            _link_out(r, "report/validate.json", _write(t / "victim.json", "{}")), _validate(r)
        ),
        2,
        "outside the run directory",
    ),
    Row(
        "distill --resume: metrics.jsonl a link to a file outside",
        lambda t, r: _then(
            _link_out(r, "metrics.jsonl", _write(t / "victim.jsonl", "mine\n")),
            ["distill", "--out", str(r), "--resume", "train.epochs=2"],
        ),
        2,
        "/run/metrics.jsonl: a symbolic link to ",
    ),
    Row(
        "quantize: qad/ a link into another run",
        lambda t, r: _then(_link_into_another_run(t, r, "qad"), _quantize(r)),
        2,
        "/run/qad: a symbolic link to ",
        base="distilled",
    ),
    # ---- issue 22: unbounded sizes (item 4)
    Row(
        "predict: input.resize of 100000",
        lambda t, r: _then(_set_raw(r, ("input", "resize"), 100000), _predict(r, _image(t))),
        2,
        "input.resize: expected null or an integer from 8 to 4096, got 100000",
    ),
    Row(
        "predict: input.shape of 100000 pixels a side",
        lambda t, r: _then(_set_raw(r, ("input", "shape"), [3, 100000, 8]), _predict(r, _image(t))),
        2,
        "H and W at most 4096",
    ),
    Row(
        "predict: loose ONNX whose sealed manifest asks input.resize 100000",
        lambda t, r: _predict(_loose_onnx(t, r, lambda m: m["input"].update(resize=100000)), _image(t)),
        2,
        "loose.onnx: manifest input.resize: expected null or an integer from 8 to 4096",
    ),
    Row(
        "distill: YAML alias bomb in a known key",
        lambda t, r: ["distill", "--config", str(_write(t / "c.yaml", ALIAS_BOMB)), "--out", str(t / "o")],
        2,
        "c.yaml: not valid YAML: line 2, column 46: YAML aliases (*name) are not allowed in a config",
    ),
    Row(
        "distill: YAML alias in an override",
        lambda t, r: ["distill", "--out", str(t / "o"), "data.mean=&a [*a]"],
        2,
        "YAML aliases (*name) are not allowed",
    ),
    Row(
        "distill: a long wrong value is shown cut",
        lambda t, r: ["distill", "--out", str(t / "o"), f"train.epochs=[{', '.join(['12345'] * 5000)}]"],
        2,
        "config key train.epochs: expected int, got [12345, 12345, 12345, 12345, 12345, 12345, 12345,"
        " 12345, 12345, 12345, 12345, 1…\n",
    ),
    # ---- issue 22: terminal injection (item 5)
    Row(
        "predict: missing image whose name holds a line break and escape codes",
        lambda t, r: _predict(r, t / "none\n\x1b[2Jforged.png"),
        2,
        "none\\n\\x1b[2Jforged.png: no such image file",
    ),
    Row(
        "predict: class name with an escape code in manifest.json",
        lambda t, r: _then(_set_raw(r, ("classes", 0), "zero\x1b[2J"), _predict(r, _image(t))),
        2,
        "classes[0]: 'zero\\x1b[2J'; a class name must be a non-empty string without line breaks",
    ),
    Row(
        "predict: loose ONNX with a line break in a label",
        lambda t, r: _predict(
            _loose_onnx(t, r, lambda m: m["classes"].__setitem__(0, "0\n9  1.0000")), _image(t)
        ),
        2,
        "loose.onnx: classes[0]",
    ),
    # ---- issue 22: tracebacks (item 8)
    Row(
        "predict: manifest.json nested 100000 deep",
        lambda t, r: _then(_write(r / "manifest.json", _deep_json()), _predict(r, _image(t))),
        2,
        "manifest.json: not a readable JSON manifest (nested deeper than 64 levels)",
    ),
    Row(
        "predict: manifest.json nested 65 deep",
        lambda t, r: _then(_set_raw(r, ("data", "deep"), json.loads(_deep_json(65))), _predict(r, _image(t))),
        2,
        "nested deeper than 64 levels",
    ),
    Row(
        "predict: loose ONNX with a manifest nested 100000 deep",
        lambda t, r: _predict(_loose_onnx(t, r, raw=_deep_json()), _image(t)),
        2,
        "loose.onnx: metadata 'reviewkd_manifest' is not valid JSON (nested deeper than 64 levels)",
    ),
    Row(
        "report: validate.json nested 100000 deep",
        lambda t, r: _then(_write(r / "report" / "validate.json", _deep_json()), ["report", str(r)]),
        2,
        "validate.json: not readable JSON (nested deeper than 64 levels)",
    ),
    Row(
        "report: validate.json with an accuracy that is a string",
        lambda t, r: _then(_result_file(r, "validate.json", accuracy="x"), ["report", str(r)]),
        2,
        "validate.json: results['onnxruntime/fp32'].accuracy: expected dict or null, got str",
    ),
    Row(
        "report: validate.json with an entry that is a number",
        lambda t, r: _then(
            _write(r / "report" / "validate.json", '{"results": {"a/b": 5}}'), ["report", str(r)]
        ),
        2,
        "results['a/b']: expected an object, got int",
    ),
    Row(
        "report: bench.json with a latency of strings",
        lambda t, r: _then(_result_file(r, "bench.json", latency={"1": {"p50_ms": "x"}}), ["report", str(r)]),
        2,
        "bench.json: results['onnxruntime/fp32'].latency['1'].p50_ms: expected int or float, got str",
    ),
    Row(
        "report: bench.json with a latency interval of one number",
        lambda t, r: _then(
            _result_file(r, "bench.json", latency={"1": {"p50_ms": 1.0, "p50_ci_ms": [1.0]}}),
            ["report", str(r)],
        ),
        2,
        "bench.json: results['onnxruntime/fp32'].latency['1'].p50_ci_ms: expected two numbers",
    ),
    Row(
        "report: bench.json with a comparison whose ratio is a string",
        lambda t, r: _then(
            _write(
                r / "report" / "bench.json",
                json.dumps(
                    {
                        "results": {},
                        "comparisons": {
                            "a,b": {"a": "a", "b": "b", "status": "ok", "batches": {"1": {"time_ratio": "x"}}}
                        },
                    }
                ),
            ),
            ["report", str(r)],
        ),
        2,
        "bench.json: comparisons['a,b'].batches['1'].time_ratio: expected int or float, got str",
    ),
    Row(
        "export: --opset 999",
        lambda t, r: ["export", str(r), "--formats", "onnx", "--opset", "999"],
        2,
        "--opset 999: torch",
    ),
    Row(
        "export: --model with --opset 999 lays nothing out",
        lambda t, r: [*_export_model(t, r / "student.safetensors"), "--opset", "999"],
        2,
        "--opset 999: torch",
    ),
    Row(
        "bench: --batch-sizes 100000000",
        lambda t, r: ["bench", str(r), "--batch-sizes", "100000000"],
        2,
        "--batch-sizes '100000000': expected one or more integers from 1 to 4096",
    ),
    # ---- issue 22: the run manifest against itself and the ONNX file (item 7)
    Row(
        "predict: classes reversed in manifest.json",
        lambda t, r: _then(_edit_manifest(r, lambda m: m["classes"].reverse()), _predict(r, _image(t))),  # type: ignore[attr-defined]
        2,
        "student.onnx: its embedded manifest lists the run's classes in another order",
    ),
    Row(
        "validate: classes renamed in manifest.json",
        lambda t, r: _then(_set_raw(r, ("classes", 0), "cat"), ["validate", str(r), "--device", "cpu"]),
        2,
        "not the same names",
        records=VALIDATE_RECORDS,
    ),
    Row(
        "validate: mean changed in manifest.json",
        lambda t, r: _then(
            _set_raw(r, ("input", "mean"), [0.5, 0.5, 0.5]), ["validate", str(r), "--device", "cpu"]
        ),
        2,
        "the file was exported with other preprocessing",
        records=VALIDATE_RECORDS,
    ),
    Row(
        "predict: NaN mean",
        lambda t, r: _then(_set_raw(r, ("input", "mean"), [float("nan")] * 3), _predict(r, _image(t))),
        2,
        "input.mean: expected 3 finite numbers, got [nan, nan, nan]",
    ),
    Row(
        "predict: infinite std",
        lambda t, r: _then(_set_raw(r, ("input", "std"), [float("inf")] * 3), _predict(r, _image(t))),
        2,
        "input.std: expected 3 finite numbers",
    ),
    Row(
        "validate: 9 classes for a 10-class student",
        lambda t, r: _then(_edit_manifest(r, lambda m: m["classes"].pop()), ["validate", str(r)]),  # type: ignore[attr-defined]
        2,
        "lists 9 classes but student.num_classes is 10",
    ),
    # ---- a manifest block's key of the wrong type: refused where the manifest is read
    Row(
        "predict: student.top1 is text",
        lambda t, r: _then(_set_raw(r, ("student", "top1"), "high"), _predict(r, _image(t))),
        2,
        "manifest.json: student.top1: expected a number or null, got 'high'",
    ),
    Row(
        "triton: student.arch is a number",
        lambda t, r: _then(_set_raw(r, ("student", "arch"), 7), ["triton", str(r), "--out", str(t / "repo")]),
        2,
        "manifest.json: student.arch: expected a model name or null, got 7",
    ),
    Row(
        "report: student.test is not an object",
        lambda t, r: _then(_set_raw(r, ("student", "test"), "top1=90"), ["report", str(r)]),
        2,
        "manifest.json: student.test: expected an object, got str",
    ),
    Row(
        "report: method.name is a number",
        lambda t, r: _then(_set_raw(r, ("method", "name"), 3), ["report", str(r)]),
        2,
        "manifest.json: method.name: expected a method name or null, got 3",
    ),
    Row(
        "validate: data.dataset is a list",
        lambda t, r: _then(_set_raw(r, ("data", "dataset"), ["digits"]), ["validate", str(r)]),
        2,
        "manifest.json: data.dataset: expected a dataset name or null, got ['digits']",
    ),
    Row(
        "validate: 9 classes against 10 logits",
        lambda t, r: _then(
            _set_raw(r, ("classes",), [str(i) for i in range(9)]),
            _set_raw(r, ("student", "num_classes"), None),
            ["validate", str(r), "--device", "cpu", "--backends", "onnxruntime"],
        ),
        2,
        "student.onnx: the model gives 10 logits but the manifest has 9 classes",
        records=VALIDATE_RECORDS,
    ),
    Row(
        "triton: duplicate labels",
        lambda t, r: _then(_set_raw(r, ("classes", 1), "0"), ["triton", str(r), "--out", str(t / "repo")]),
        2,
        "classes[1]: '0' is listed twice",
    ),
    Row(
        "predict: loose ONNX with duplicate labels",
        lambda t, r: _predict(_loose_onnx(t, r, lambda m: m["classes"].__setitem__(1, "0")), _image(t)),
        2,
        "loose.onnx: classes[1]: '0' is listed twice",
    ),
    Row("bench: --seconds nan", lambda t, r: ["bench", str(r), "--seconds", "nan"], 2, "--seconds must be"),
    Row("bench: --seconds inf", lambda t, r: ["bench", str(r), "--seconds", "inf"], 2, "got inf"),
    Row(
        "triton: --max-batch-size 99999999999999",
        lambda t, r: ["triton", str(r), "--out", str(t / "repo"), "--max-batch-size", "99999999999999"],
        2,
        "--max-batch-size 99999999999999: expected 1 to 2147483647",
    ),
    # ---- issue 22: the smaller ones (item 9)
    Row(
        "distill: optim.lr=nan",
        lambda t, r: ["distill", "--out", str(t / "o"), "optim.lr=nan"],
        2,
        "config key optim.lr: expected a finite number, got nan",
    ),
    Row(
        "distill: optim.lr .inf in a config file",
        lambda t, r: [
            "distill",
            "--config",
            str(_write(t / "c.yaml", "optim:\n  lr: .inf\n")),
            "--out",
            str(t / "o"),
        ],
        2,
        "config key optim.lr: expected a finite number, got inf",
    ),
    Row(
        "distill: teacher.lr=nan (a float or null)",
        lambda t, r: ["distill", "--out", str(t / "o"), "teacher.lr=.nan"],
        2,
        "config key teacher.lr: expected a finite number, got nan",
    ),
    Row(
        "distill: data.image_size=5000",
        lambda t, r: ["distill", "--out", str(t / "o"), "data.image_size=5000"],
        2,
        "config key data.image_size: at most 4096 pixels, got 5000",
    ),
    Row(
        "export: --input-shape 3,5000,5000 lays nothing out",
        lambda t, r: [*_export_model(t, r / "student.safetensors"), "--input-shape", "3,5000,5000"],
        2,
        "H and W at most 4096",
    ),
    Row(
        "distill: method.temperature=-inf",
        lambda t, r: ["distill", "--out", str(t / "o"), "method.temperature=-.inf"],
        2,
        "config key method.temperature: expected a finite number",
    ),
    Row(
        "predict: one unreadable image among readable ones",
        lambda t, r: _predict(r, _image(t), _write(t / "bad.png", "not an image"), _image(t, "b.png")),
        2,
        "1 of 3 images could not be read (the others were); first: ",
    ),
    Row(
        "export: --trt-batch 8,4,1 (checked before TensorRT is looked for)",
        lambda t, r: ["export", str(r), "--formats", "tensorrt", "--trt-batch", "8,4,1"],
        2,
        "--trt-batch 8,4,1: expected MIN,OPT,MAX with 1 <= MIN <= OPT <= MAX",
    ),
    Row(
        "export: --dla-core -1 (checked before TensorRT is looked for)",
        lambda t, r: ["export", str(r), "--formats", "tensorrt", "--dla-core", "-1"],
        2,
        "--dla-core must be a DLA core number >= 0, got -1",
    ),
    Row(
        "export: --max-top1-drop-int8 1e309",
        lambda t, r: ["export", str(r), "--formats", "int8", "--max-top1-drop-int8", "1e309"],
        2,
        "--max-top1-drop-int8 inf: expected a finite number of top-1 points",
    ),
    Row(
        "distill: --config a directory",
        lambda t, r: ["distill", "--config", str(t), "--out", str(t / "o")],
        2,
        "is a directory; expected a YAML file",
    ),
)


def _without_training_records(run: Path) -> Path:
    """The run without its checkpoint and metrics.jsonl: only its manifest says it was trained."""
    shutil.rmtree(run / "checkpoints")
    (run / "metrics.jsonl").unlink()
    return run


def _validate(run: Path) -> list[str]:
    return ["validate", str(run), "--device", "cpu", "--limit", "16"]


def _link_into_another_run(tmp: Path, run: Path, folder: str) -> None:
    """Make a second run beside `run` (a copy of it, with `folder`), and link RUN/<folder> to its own."""
    other = Path(shutil.copytree(run, tmp / "other"))
    (other / folder).mkdir(exist_ok=True)
    _link_out(run, folder, other / folder)


def _link_out(run: Path, name: str, target: Path, *, hard: bool = False) -> None:
    """Replace RUN/<name> (if there) with a symbolic link to `target`, or a `hard` one."""
    path = run / name
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)
    if hard:
        os.link(target, path)
    else:
        path.symlink_to(target)


def _add_artifact(tmp: Path, run: Path, key: str) -> None:
    """List a file outside the run under `key`, with its true sha256, as the fp32 ONNX file."""
    outside = shutil.copyfile(run / "export" / "student.onnx", tmp / Path(key).name)
    raw = json.loads((run / "manifest.json").read_text())
    entry = dict(raw["artifacts"].pop("export/student.onnx"))
    entry["sha256"] = hashlib.sha256(outside.read_bytes()).hexdigest()
    raw["artifacts"][key] = entry
    (run / "manifest.json").write_text(json.dumps(raw))


def _raw_manifest(
    run: Path,
    *,
    artifacts: object = None,
    drop_sha: bool = False,
    entry: object = None,
    shape: object = None,
    classes: object = None,
) -> None:
    """Rewrite manifest.json by hand (valid JSON, wrong shape), as no reviewkd stage would."""
    raw = json.loads((run / "manifest.json").read_text())
    if artifacts is not None:
        raw["artifacts"] = artifacts
    if drop_sha:
        del raw["artifacts"]["export/student.onnx"]["sha256"]
    if entry is not None:
        raw["artifacts"]["export/student.onnx"] = entry
    if shape is not None:
        raw["input"]["shape"] = shape
    if classes is not None:
        raw["classes"] = classes
    (run / "manifest.json").write_text(json.dumps(raw))


def _raw_teacher_sha256(run: Path, value: object) -> None:
    """Give the manifest's teacher.sha256 a value of the wrong type, by hand."""
    raw = json.loads((run / "manifest.json").read_text())
    raw["teacher"]["sha256"] = value
    (run / "manifest.json").write_text(json.dumps(raw))


# Aliases nested six deep, nine to a level, in a key the config knows: 9^6 (531441) strings once
# expanded, which the error message for the wrong type would print (a few more levels: gigabytes).
ALIAS_BOMB = (
    "data:\n  mean: [&a [x, x, x, x, x, x, x, x, x]"
    + "".join(f", &{chr(98 + i)} [{', '.join([f'*{chr(97 + i)}'] * 9)}]" for i in range(5))
    + "]\n"
)


def _set_raw(run: Path, keys: tuple[str | int, ...], value: object) -> None:
    """Set one value of manifest.json by hand (any JSON, NaN included), as no reviewkd stage would."""
    raw = json.loads((run / "manifest.json").read_text())
    block = raw
    for key in keys[:-1]:
        block = block[key]
    block[keys[-1]] = value
    (run / "manifest.json").write_text(json.dumps(raw))


def _deep_json(depth: int = 100_000) -> str:
    return "[" * depth + "]" * depth


def _loose_onnx(
    tmp: Path, run: Path, change: Callable[[dict[str, object]], None] | None = None, raw: str | None = None
) -> Path:
    """The run's fp32 ONNX file alone as tmp/loose.onnx, its embedded manifest changed (or replaced by
    `raw` text) and the file sealed again with its content hash: a hash inside a file is no signature."""
    import onnx

    from export.onnx_export import METADATA_KEY, sealed_bytes

    model = onnx.load(str(run / "export" / "student.onnx"))
    (prop,) = [p for p in model.metadata_props if p.key == METADATA_KEY]
    if change is not None:
        embedded = json.loads(prop.value)
        change(embedded)
        prop.value = json.dumps(embedded)
    if raw is not None:
        prop.value = raw
    return _write(tmp / "loose.onnx", sealed_bytes(model))


def _result_file(run: Path, name: str, **entry: object) -> None:
    """RUN/report/NAME holding one onnxruntime/fp32 entry with `entry`'s values over an ok status."""
    document = {"results": {"onnxruntime/fp32": {"status": "ok", "reason": None, **entry}}}
    _write(run / "report" / name, json.dumps(document))


def _then(*steps: object) -> list[str]:
    """Run side effects in order (as arguments), then return the last one: the argv."""
    argv = steps[-1]
    assert isinstance(argv, list)
    return argv


def _parent(path: Path) -> Path:
    return path.parent


def _save(path: Path, pixels: np.ndarray, mode: str) -> Path:
    Image.fromarray(pixels, mode).save(path)
    return path


def _export_model(tmp: Path, weights: Path) -> list[str]:
    return [
        "export",
        "--model",
        "cifar_resnet20",
        "--out",
        str(tmp / "plain"),
        "--input-shape",
        "3,8,8",
        "--weights",
        str(weights),
    ]


@pytest.mark.parametrize("row", ROWS, ids=[row.name for row in ROWS])
def test_bad_input(
    row: Row,
    request: pytest.FixtureRequest,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    run = private_copy(request, row.base, tmp_path)
    monkeypatch.chdir(tmp_path)  # where a pickle that runs code would leave MARKER
    argv = row.setup(tmp_path, run)
    capsys.readouterr()  # what a module fixture made on first use printed
    before = snapshot(tmp_path)
    code, out, err = run_cli(argv, capsys)
    assert code == row.code, err
    assert row.fragment in err
    assert "Traceback" not in err and "Traceback" not in out
    if row.one_line:
        assert err.count("\n") == 1 and err.startswith(f"reviewkd {argv[0]}: error: "), err
    after = snapshot(tmp_path)
    for rel in row.records:
        json.loads((tmp_path / rel).read_text())  # written whole
        before.pop(rel, None)
        after.pop(rel, None)
    assert after == before, "a failed command changed files"
    assert not (tmp_path / MARKER).exists()


def test_the_table_holds_enough_rows() -> None:
    assert len(ROWS) >= 110


@pytest.mark.parametrize(
    "name",
    [
        "predict: decompression bomb",
        "triton: class name with a line break",
        "distill: YAML syntax error",
        "export: weights that run code",
        "report: earlier validate.json not JSON",
        "layerwise: export from an older student",
        "quantize: --lr inf",
    ],
)
def test_exit_codes_are_the_same_in_a_real_process(
    name: str, request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (row,) = [r for r in ROWS if r.name == name]
    run = private_copy(request, row.base, tmp_path)
    monkeypatch.chdir(tmp_path)
    argv = row.setup(tmp_path, run)
    before = snapshot(tmp_path)
    done = subprocess.run(
        [sys.executable, "-m", "reviewkd.app.cli", *argv],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(REPO_ROOT)},
        timeout=300,
    )
    assert done.returncode == row.code, done.stderr
    assert row.fragment in done.stderr and done.stderr.count("\n") == 1
    assert snapshot(tmp_path) == before
    assert not (tmp_path / MARKER).exists()


# --- what a table cannot express ---------------------------------------------------------------------


def test_files_written_by_the_commands_follow_the_umask(trained_run: Path) -> None:
    umask = os.umask(0o022)
    os.umask(umask)
    expected = 0o666 & ~umask
    for rel in ("manifest.json", "config.yaml", "student.safetensors", "export/student.onnx"):
        assert stat.S_IMODE((trained_run / rel).stat().st_mode) == expected, rel


@pytest.mark.parametrize("stage", ["validate", "bench"])
def test_a_full_disk_keeps_the_measurement(
    stage: str, run: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    argv = [stage, str(run), "--device", "cpu", "--backends", "onnxruntime"]
    if stage == "bench":
        argv += ["--batch-sizes", "1", "--iters", "2", "--warmup", "1"]
    before = snapshot(run)
    real_replace = os.replace

    def disk_full(source: str | os.PathLike[str], target: str | os.PathLike[str]) -> None:
        if Path(target).name == f"{stage}.json":
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(source))
        real_replace(source, target)

    monkeypatch.setattr(os, "replace", disk_full)
    code, out, err = run_cli(argv, capsys)
    assert code == 2
    assert err == (
        f"reviewkd {stage}: error: {run / 'report' / f'{stage}.json'}: cannot write it (No space left on"
        " device); the measurement was printed to stdout as JSON instead\n"
    )
    salvaged = json.loads(out)
    assert "onnxruntime/fp32" in salvaged["results"]
    assert snapshot(run) == before


def test_a_read_only_output_is_one_line(
    run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    # chmod cannot stop root, who runs some CI: the system's answer for a read-only folder instead.
    def read_only(*args: object, **kwargs: object) -> tuple[int, str]:
        raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(run / "report"))

    monkeypatch.setattr("tempfile.mkstemp", read_only)
    before = snapshot(tmp_path)
    code, _, err = run_cli(["report", str(run)], capsys)
    assert code == 2
    assert err.startswith("reviewkd report: error: ") and "Read-only file system" in err
    assert err.count("\n") == 1
    assert snapshot(tmp_path) == before


def test_predict_prints_a_hostile_file_name_escaped(
    run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # A readable image whose name would end the row, clear the screen and forge a row of its own.
    name = "cat\n\x1b[2J\x1b[Hforged  1  dog  1.0000.png"
    image = _image(tmp_path, name)
    code, out, err = run_cli(_predict(run, image, extra=("--top-k", "2")), capsys)
    assert code == 0, err
    assert "\x1b" not in out
    lines = out.splitlines()
    assert len(lines) == 4  # runner, header, two ranks of the one image
    assert lines[2].startswith(str(tmp_path / "cat\\n\\x1b[2J\\x1b[Hforged  1  dog  1.0000.png  1  "))


def test_one_unreadable_image_costs_only_itself(
    run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    good, other = _image(tmp_path), _image(tmp_path, "b.png")
    bad = _write(tmp_path / "bad.png", "not an image")
    code, out, err = run_cli(_predict(run, good, bad, other, extra=("--top-k", "1", "--json")), capsys)
    assert code == 2
    assert err.startswith("reviewkd predict: error: 1 of 3 images could not be read (the others were);")
    assert err.count("\n") == 1 and "bad.png: cannot read as an image" in err
    first, failed, last = json.loads(out)["predictions"]
    assert [first["image"], failed["image"], last["image"]] == [str(good), str(bad), str(other)]
    assert "bad.png: cannot read as an image" in failed["error"] and "top_k" not in failed
    assert first["top_k"] == last["top_k"] and len(first["top_k"]) == 1  # the same pixels
    code, out, _ = run_cli(_predict(run, good, bad), capsys)
    assert code == 2
    rows = out.splitlines()[2:]
    assert rows[0].startswith(f"{good}  1  ") and rows[5].startswith(f"{bad}  -  error: {bad}: cannot read")


def test_a_subset_of_formats_merges_into_earlier_results(
    run: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    common = ["--device", "cpu", "--limit", "64"]
    assert run_cli(["validate", str(run), *common], capsys)[0] == 0
    assert run_cli(["validate", str(run), *common, "--backends", "torch/fp32"], capsys)[0] == 0
    validated = json.loads((run / "report" / "validate.json").read_text())
    assert {"torch/fp32", "onnxruntime/fp32"} <= set(validated["results"])
    assert "onnxruntime/fp32" in validated["kept_from_earlier"]

    bench = ["--device", "cpu", "--batch-sizes", "1", "--iters", "2", "--warmup", "1"]
    assert run_cli(["bench", str(run), *bench, "--backends", "onnxruntime"], capsys)[0] == 0
    assert run_cli(["bench", str(run), *bench, "--backends", "torch/fp32"], capsys)[0] == 0
    benched = json.loads((run / "report" / "bench.json").read_text())
    assert {"torch/fp32", "onnxruntime/fp32"} <= set(benched["results"])
    assert benched["results"]["onnxruntime/fp32"]["status"] == "ok"
    assert run_cli(["report", str(run)], capsys)[0] == 0
    report = json.loads((run / "report" / "report.json").read_text())
    assert report["onnxruntime/fp32"]["latency"] and report["onnxruntime/fp32"]["accuracy"]


def test_retraining_takes_the_exports_out_of_service(run: Path, tmp_path: Path) -> None:
    image = _image(tmp_path)
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}

    def reviewkd(*argv: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "reviewkd.app.cli", *argv],
            capture_output=True,
            text=True,
            env=env,
            timeout=600,
        )

    assert reviewkd("predict", str(run), str(image)).returncode == 0
    before = read_manifest(run)["student"]["sha256"]
    assert main(["distill", "--out", str(run), "--resume", "train.epochs=3"]) == 0
    assert read_manifest(run)["student"]["sha256"] != before, "precondition: retraining changed the student"
    for argv in (("predict", str(run), str(image)), ("triton", str(run), "--out", str(tmp_path / "repo"))):
        done = reviewkd(*argv)
        assert done.returncode == 2, done.stderr
        assert "export/student.onnx: it was exported from student" in done.stderr
        assert done.stderr.count("\n") == 1
    assert not (tmp_path / "repo").exists()
    assert main(["export", str(run), "--formats", "onnx", "--check-samples", "64"]) == 0
    assert reviewkd("predict", str(run), str(image)).returncode == 0


def test_every_entry_the_stages_write_is_checked_for_links(request: pytest.FixtureRequest) -> None:
    # The run lock judges the links among run_layout.WRITTEN_ENTRIES before a command's first write:
    # a stage that wrote a top-level name beyond them could write through a link unchecked.
    for fixture in BASE_RUNS.values():
        run = request.getfixturevalue(fixture)
        written = {path.name for path in run.iterdir()} - {LOCK_NAME}
        assert written <= set(run_layout.WRITTEN_ENTRIES), fixture


def test_a_resume_that_does_not_improve_keeps_the_student_byte_for_byte(
    run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # A resume re-derives the best weights from last.pt; safetensors orders their metadata anew in
    # each process, so a rewrite would change the file's sha256 and take every export out of service
    # (issue 22 item 9). Not rewritten at all: the same file, the same bytes.
    student = run / "student.safetensors"
    before, inode = student.read_bytes(), student.stat().st_ino
    assert run_cli(["distill", "--out", str(run), "--resume", "train.epochs=1"], capsys)[0] == 0
    assert student.stat().st_ino == inode
    assert student.read_bytes() == before
    assert run_cli(_predict(run, _image(tmp_path)), capsys)[0] == 0  # the exports are still current


def test_the_same_weights_always_make_the_same_bytes(tmp_path: Path) -> None:
    from safetensors.torch import load_file

    from reviewkd.run_record import save_weights

    state = {"conv.weight": torch.arange(6.0).reshape(2, 3), "fc.bias": torch.ones(2)}
    metadata = {"arch": "cifar_resnet20", "num_classes": "10", "role": "student"}
    files = [tmp_path / f"{i}.safetensors" for i in range(8)]
    for path in files:
        save_weights(state, path, metadata)
    assert len({path.read_bytes() for path in files}) == 1
    assert torch.equal(load_file(files[0])["conv.weight"], state["conv.weight"])


def _disk_full_for(monkeypatch: pytest.MonkeyPatch, name: str) -> None:
    """The disk fills up exactly when `name` is renamed into place."""
    real_replace = os.replace

    def replace(source: str | os.PathLike[str], target: str | os.PathLike[str]) -> None:
        if Path(target).name == name:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(source))
        real_replace(source, target)

    monkeypatch.setattr(os, "replace", replace)


def test_a_full_disk_during_training_is_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    _disk_full_for(monkeypatch, "last.pt")
    out = tmp_path / "out"
    code, _, err = run_cli(["distill", "--out", str(out), *TINY_TRAINING, "train.epochs=1"], capsys)
    assert code == 2
    assert err == (
        f"reviewkd distill: error: {out / 'checkpoints' / 'last.pt'}: cannot write it"
        " (No space left on device)\n"
    )
    assert [p.name for p in (out / "checkpoints").iterdir()] == []


def test_a_full_disk_during_export_is_one_line(
    run: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    before = snapshot(run)
    _disk_full_for(monkeypatch, "student.onnx")
    code, _, err = run_cli(["export", str(run), "--formats", "onnx", "--check-samples", "16"], capsys)
    assert code == 2
    assert err.splitlines()[-1] == (
        f"reviewkd export: error: {run / 'export' / 'student.onnx'}: cannot write it"
        " (No space left on device)"
    )
    assert snapshot(run) == before


def test_layerwise_without_matplotlib_is_exit_3_before_any_work(
    int8_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    run = Path(shutil.copytree(int8_run, tmp_path / "run"))
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # how Python marks a module it cannot import
    before = snapshot(tmp_path)
    code, _, err = run_cli(_layerwise(run), capsys)
    assert code == 3
    assert err == (
        "reviewkd layerwise: error: layerwise's plot needs matplotlib, which this installation lacks;"
        " install the plots extra: pip install 'reviewkd[plots]'\n"
    )
    assert snapshot(tmp_path) == before


HOLD_THE_LOCK = """
import sys, time
from deploy.run_lock import run_lock
with run_lock(sys.argv[1], "validate"):
    print("held", flush=True)
    time.sleep(120)
"""


@pytest.mark.parametrize("command", ["layerwise", "quantize"])
def test_a_busy_run_is_refused_before_any_work(
    command: str, int8_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run = Path(shutil.copytree(int8_run, tmp_path / "run"))
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD_THE_LOCK, str(run)],
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": str(REPO_ROOT)},
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        before = snapshot(tmp_path)
        code, _, err = run_cli(_layerwise(run) if command == "layerwise" else _quantize(run), capsys)
        assert code == 2
        assert err == (
            f"reviewkd {command}: error: {run} is busy: another reviewkd validate (pid {holder.pid})"
            " is writing it\n"
        )
        assert snapshot(tmp_path) == before
    finally:
        holder.kill()
        holder.wait()


# --- the edge install: no torch (a serving device); bad input is still exit 2, one line -------------

WITHOUT_TORCH = """
import importlib.abc, runpy, sys

class NoTorch(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("torch", "torchvision"):
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return None

sys.meta_path.insert(0, NoTorch())
sys.argv = ["reviewkd", *sys.argv[1:]]
runpy.run_module("reviewkd.app.cli", run_name="__main__")
"""

EDGE_ROWS: tuple[Row, ...] = (
    Row("edge: distill", lambda t, r: ["distill", "--out", str(t / "o")], 3, "install the training extra"),
    Row("edge: export to ONNX", lambda t, r: ["export", str(r), "--formats", "onnx"], 3, "reviewkd[train]"),
    Row("edge: predict a bomb", lambda t, r: _predict(r, write_png_bomb(t / "b.png")), 2, "too many pixels"),
    Row("edge: predict from an older student", _retrained_elsewhere, 2, "re-export it"),
    Row("edge: predict a loose unsealed file", _loose_unsealed_onnx, 2, "carries no content hash"),
    Row(
        "edge: triton with a hostile class name",
        lambda t, r: _then(
            _edit_manifest(r, lambda m: m["classes"].__setitem__(1, "one\ntwo")),  # type: ignore[attr-defined]
            ["triton", str(r), "--out", str(t / "repo")],
        ),
        2,
        "classes[1]",
    ),
    Row("edge: mistyped gate", lambda t, r: ["validate", str(r), "--gate", "in8:max_top1_drop=0"], 2, "in8"),
    Row(
        "edge: layerwise (the run's images are read with torch)",
        lambda t, r: _layerwise(r),
        3,
        "install the training extra",
    ),
    Row(
        "edge: export-data of a digits run (its split is rebuilt with torch)",
        lambda t, r: ["export-data", str(r), "--out", str(t / "val")],
        3,
        "pip install 'reviewkd[train]'",
    ),
    Row(
        "edge: validate a digits run (its images are read with torch)",
        lambda t, r: ["validate", str(r), "--device", "cpu"],
        3,
        "pass --data FOLDER (one sub-folder of images per class; `reviewkd export-data ",
    ),
)


@pytest.mark.parametrize("row", EDGE_ROWS, ids=[row.name for row in EDGE_ROWS])
def test_bad_input_on_the_edge_install(row: Row, run: Path, tmp_path: Path) -> None:
    argv = row.setup(tmp_path, run)
    before = snapshot(tmp_path)
    done = subprocess.run(
        [sys.executable, "-c", WITHOUT_TORCH, *argv],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(REPO_ROOT)},
        timeout=300,
    )
    assert done.returncode == row.code, done.stderr
    assert row.fragment in done.stderr and "Traceback" not in done.stderr
    assert done.stderr.count("\n") == 1 and done.stderr.startswith(f"reviewkd {argv[0]}: error: ")
    after = snapshot(tmp_path)
    for rel in row.records:
        json.loads((tmp_path / rel).read_text())
        before.pop(rel, None)
        after.pop(rel, None)
    assert after == before


def test_the_edge_install_serves_a_16_bit_image(run: Path, tmp_path: Path) -> None:
    from tests.helpers import write_deep_image

    image = write_deep_image(tmp_path / "deep.png", np.full((9, 9), 120, dtype=np.uint8), "I;16")
    done = subprocess.run(
        [sys.executable, "-c", WITHOUT_TORCH, "predict", str(run), str(image), "--json"],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(REPO_ROOT)},
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    assert len(json.loads(done.stdout)["predictions"]) == 1


def test_validating_on_the_device_keeps_the_training_machines_results(
    run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Issue 22 item 12: `validate --data val/` on the edge turned torch/fp32 from ok into skipped,
    # and bench did the same.
    bench = ["--device", "cpu", "--batch-sizes", "1", "--iters", "2", "--warmup", "1"]
    assert run_cli(["validate", str(run), "--device", "cpu", "--limit", "64"], capsys)[0] == 0
    assert run_cli(["bench", str(run), *bench], capsys)[0] == 0
    val = tmp_path / "val"
    for index, name in enumerate(read_manifest(run)["classes"]):
        (val / name).mkdir(parents=True)
        Image.fromarray(np.full((8, 8, 3), 20 * index, dtype=np.uint8)).save(val / name / "a.png")

    def on_the_edge(*argv: str) -> subprocess.CompletedProcess[str]:
        done = subprocess.run(
            [sys.executable, "-c", WITHOUT_TORCH, *argv],
            capture_output=True,
            text=True,
            cwd=tmp_path,
            env={**os.environ, "PYTHONPATH": str(REPO_ROOT)},
            timeout=300,
        )
        assert done.returncode == 0, done.stderr
        return done

    done = on_the_edge("validate", str(run), "--device", "cpu", "--data", str(val))
    assert "kept beside it: 1 measurement(s)" in done.stdout
    validated = json.loads((run / "report" / "validate.json").read_text())
    assert validated["settings"]["data"] == str(val.resolve())
    assert validated["measured"]["source"]["path"] == str(val.resolve())
    assert validated["measured"]["reference"] == "onnxruntime/fp32"
    [training] = validated["other_measurements"]
    assert training["measured"]["source"]["kind"] == "run-split" and training["images"] == 64
    assert training["results"]["torch/fp32"]["status"] == "ok"

    on_the_edge("bench", str(run), *bench)
    benched = json.loads((run / "report" / "bench.json").read_text())
    assert benched["results"]["torch/fp32"]["status"] == "ok"
    assert "torch/fp32" in benched["kept_from_earlier"]

    assert run_cli(["report", str(run)], capsys)[0] == 0
    report = json.loads((run / "report" / "report.json").read_text())
    assert report["torch/fp32"]["status"] == "ok" and report["torch/fp32"]["accuracy"]["n"] == 64
    [device] = report["validation"]["other_measurements"]
    assert device["reference"] == "onnxruntime/fp32" and str(val.resolve()) in device["source_text"]


def test_validate_bench_and_report_refuse_exports_of_another_student(
    run: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Issue 22 item 7: after retraining, the old exports showed "ok, drop 0.00" and passed the gates.
    common = ["--device", "cpu", "--limit", "32"]
    assert run_cli(["validate", str(run), *common], capsys)[0] == 0
    _edit_manifest(run, lambda m: m["student"].update(sha256="0" * 64))  # what retraining records
    code, out, err = run_cli(["validate", str(run), *common], capsys)
    assert code == 2 and err.count("\n") == 1
    assert "onnxruntime/fp32: " in err and "export/student.onnx: it was exported from student" in err
    assert "note: dropped the measurement on the run's held-out split" in out

    bench = ["--device", "cpu", "--batch-sizes", "1", "--iters", "2", "--warmup", "1"]
    assert run_cli(["bench", str(run), *bench], capsys)[0] == 0
    benched = json.loads((run / "report" / "bench.json").read_text())
    assert benched["results"]["torch/fp32"]["status"] == "ok"
    stale = benched["results"]["onnxruntime/fp32"]
    assert stale["status"] == "failed" and "it was exported from student" in stale["reason"]

    assert run_cli(["report", str(run)], capsys)[0] == 0
    report = json.loads((run / "report" / "report.json").read_text())
    assert report["onnxruntime/fp32"]["status"] == "failed"
    assert report["onnxruntime/fp32"]["reason"].startswith("stale: ")
    assert report["onnxruntime/fp32"]["accuracy"] is None and report["onnxruntime/fp32"]["latency"] == {}
