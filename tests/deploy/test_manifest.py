"""manifest.json: its shape is checked once where it is read, and its paths cannot leave the run.

Issue 11 items 1 and 11: a hostile or careless manifest (keys outside the run, symlinks out of it,
the wrong shape) is refused with one line and exit 2 by every command, before any file it names is
opened or hashed.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from deploy.errors import UsageError
from deploy.fileio import sha256_file
from deploy.manifest import artifact_path, check_manifest, read_manifest, verify_artifact
from reviewkd.app.cli import main
from tests.helpers import (
    CLASSES,
    export_onnx,
    make_run,
    run_reviewkd,
    tiny_net,
    write_class_folders,
    write_image,
)


def _edit_manifest(run: Path, edit: Callable[[dict[str, Any]], None]) -> None:
    path = run / "manifest.json"
    data = json.loads(path.read_text(encoding="utf-8"))
    edit(data)
    path.write_text(json.dumps(data), encoding="utf-8")


@pytest.fixture
def run(tmp_path: Path) -> Path:
    run_dir, _ = make_run(tmp_path)
    return run_dir


@pytest.mark.parametrize(
    "key",
    ["../secret/other.onnx", "/abs/path/other.onnx", "export/../../other.onnx", "export\\other.onnx", ""],
)
def test_reading_a_manifest_refuses_keys_that_leave_the_run(run: Path, key: str) -> None:
    entry = {"sha256": "0" * 64, "size_bytes": 1, "kind": "onnx", "precision": "fp32"}
    _edit_manifest(run, lambda data: data["artifacts"].update({key: entry}))
    with pytest.raises(UsageError, match="expected a relative path inside the run directory"):
        read_manifest(run)


def test_a_key_outside_the_run_is_refused_by_predict_validate_and_triton(
    run: Path, tmp_path: Path
) -> None:
    # A real model outside the run, recorded with its true sha256: predict ran it, triton copied it.
    outside = export_onnx(tiny_net(seed=3), tmp_path / "secret" / "other.onnx")
    image = write_image(tmp_path / "picture.png", (20, 16))
    data = write_class_folders(tmp_path / "val", CLASSES)
    for key in ("../secret/other.onnx", str(outside)):
        entry = {"sha256": sha256_file(outside), "size_bytes": outside.stat().st_size, "kind": "onnx"}

        def plant(manifest: dict[str, Any], key: str = key, entry: dict[str, Any] = entry) -> None:
            manifest["artifacts"] = {key: {**entry, "precision": "fp32"}}

        _edit_manifest(run, plant)
        for args in (
            ["predict", run, image, "--backend", "onnxruntime/fp32"],
            ["validate", run, "--data", data],
            ["triton", run, "--out", tmp_path / "repo"],
        ):
            completed = run_reviewkd(*args)
            assert completed.returncode == 2, (args, completed.stderr)
            assert "relative path inside the run directory" in completed.stderr, completed.stderr
            assert "Traceback" not in completed.stderr and len(completed.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "repo").exists()


def test_an_etc_passwd_key_is_refused_without_opening_it(
    run: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    secret = Path("/etc/passwd")
    key = "../../../../../../../../etc/passwd"
    entry = {"sha256": "f" * 64, "size_bytes": 1, "kind": "onnx"}
    _edit_manifest(run, lambda data: data["artifacts"].update({key: entry}))
    assert main(["predict", str(run), str(secret)]) == 2
    err = capsys.readouterr().err
    assert "relative path inside the run directory" in err
    if secret.is_file():  # before, the message carried 12 hex digits of the real file's hash
        assert hashlib.sha256(secret.read_bytes()).hexdigest()[:12] not in err


def test_a_symlink_out_of_the_run_is_refused_before_the_file_is_opened(run: Path, tmp_path: Path) -> None:
    onnx_file = run / "export" / "student.onnx"
    outside = tmp_path / "elsewhere" / "student.onnx"
    outside.parent.mkdir()
    shutil.move(onnx_file, outside)
    onnx_file.symlink_to(outside)  # same bytes, same sha256: only the location is wrong
    manifest = read_manifest(run)
    with pytest.raises(UsageError, match="resolves outside the run directory"):
        verify_artifact(run, manifest, "export/student.onnx")
    # A FIFO blocks whoever opens it: refusing it proves the check comes before any open or hash.
    fifo = tmp_path / "elsewhere" / "pipe.onnx"
    os.mkfifo(fifo)
    onnx_file.unlink()
    onnx_file.symlink_to(fifo)
    image = write_image(tmp_path / "picture.png", (20, 16))
    completed = run_reviewkd("predict", run, image, timeout=60)
    assert completed.returncode == 2 and "resolves outside the run directory" in completed.stderr
    # A symlink that stays inside the run is fine.
    inside = run / "export" / "real.onnx"
    shutil.copyfile(outside, inside)
    onnx_file.unlink()
    onnx_file.symlink_to(inside)
    assert verify_artifact(run, manifest, "export/student.onnx") == onnx_file
    assert artifact_path(run, "export/student.onnx") == onnx_file


WRONG_SHAPES: dict[str, Callable[[dict[str, Any]], None]] = {
    "artifacts a list": lambda m: m.update(artifacts=list(m["artifacts"])),
    "an entry without sha256": lambda m: m["artifacts"]["export/student.onnx"].pop("sha256"),
    "an entry that is a string": lambda m: m["artifacts"].update({"export/student.onnx": "a string"}),
    "a 2-element input shape": lambda m: m["input"].update(shape=[8, 10]),
    "classes not a list": lambda m: m.update(classes="cat,dog"),
    "a student block that is a list": lambda m: m.update(student=["tiny_net"]),
    "a size that is text": lambda m: m["artifacts"]["export/student.onnx"].update(size_bytes="big"),
}


@pytest.mark.parametrize("wrong", list(WRONG_SHAPES))
def test_a_manifest_of_the_wrong_shape_is_one_line_and_exit_2_everywhere(
    run: Path, tmp_path: Path, wrong: str, capsys: pytest.CaptureFixture[str]
) -> None:
    _edit_manifest(run, WRONG_SHAPES[wrong])
    with pytest.raises(UsageError, match=r"manifest\.json"):
        read_manifest(run)
    image = write_image(tmp_path / "picture.png", (20, 16))
    for args in (
        ["predict", run, image],
        ["triton", run, "--out", tmp_path / "repo"],
        ["report", run],
        ["validate", run, "--data", tmp_path],
        ["bench", run, "--iters", "1"],
    ):
        assert main([str(a) for a in args]) == 2, args
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "manifest.json" in err, err
    assert not (tmp_path / "repo").exists() and not (run / "report").exists()


def test_a_wrong_shape_through_the_real_command_line_exits_2_without_a_traceback(
    run: Path, tmp_path: Path
) -> None:
    _edit_manifest(run, WRONG_SHAPES["an entry without sha256"])
    completed = run_reviewkd("predict", run, write_image(tmp_path / "picture.png", (20, 16)))
    assert completed.returncode == 2
    assert "sha256: expected 64 lower-case hex digits" in completed.stderr
    assert "Traceback" not in completed.stderr


def test_a_valid_manifest_is_returned_as_read(run: Path) -> None:
    data = json.loads((run / "manifest.json").read_text(encoding="utf-8"))
    assert check_manifest(data, "manifest") == read_manifest(run)
