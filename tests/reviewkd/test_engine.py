"""Training: every method runs, the run directory is complete, kill/SIGINT and resume are exact,
a diverging loss stops with the last checkpoint intact. Short real runs on a digits subset at 8x8."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from deploy.errors import UsageError
from deploy.manifest import (
    data_block,
    input_spec,
    method_block,
    model_block,
    read_manifest,
    verify_artifact,
    write_manifest,
)
from reviewkd.app.cli import main
from reviewkd.checkpoint import load_checkpoint
from reviewkd.config import Config, load_config, save_config
from reviewkd.data import build_data
from reviewkd.engine import TrainingDivergedError, distill, train_teacher
from reviewkd.models import create_model
from reviewkd.run_record import read_metrics
from tests.helpers import REPO_ROOT

# One thread: identical reduction order in every process, so resumed weights can be compared exactly.
TINY = [
    "data.image_size=8",
    "data.val_split=null",
    "data.subset=160",
    "train.batch_size=32",
    "train.threads=1",
    "train.device=cpu",
    "teacher.arch=cifar_resnet20",
    "teacher.full_data=false",
    "optim.lr=0.05",
]


def tiny(*overrides: str) -> Config:
    return load_config(None, [*TINY, *overrides])


@pytest.fixture(scope="module")
def teacher_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A teacher trained once for the module (1 epoch), through the teacher stage."""
    out = tmp_path_factory.mktemp("teacher")
    path = train_teacher(tiny("teacher.epochs=1"), out)
    assert path == out / "teacher.safetensors"
    return path


def with_teacher(teacher_file: Path, *overrides: str) -> Config:
    return tiny(f"teacher.weights={teacher_file}", *overrides)


@pytest.mark.parametrize("method", ["ce", "kd", "reviewkd", "reviewkd+kd"])
def test_each_method_runs(method: str, teacher_file: Path, tmp_path: Path) -> None:
    path = distill(with_teacher(teacher_file, f"method.name={method}", "train.epochs=1"), tmp_path)
    assert path == tmp_path / "student.safetensors" and path.is_file()
    (record,) = read_metrics(tmp_path / "metrics.jsonl")
    assert record["epoch"] == 1
    assert {"loss", "ce", "val_top1", "val_top5", "images_per_s", "lr", "epoch_time_s"} <= set(record)
    assert ("hcl" in record) == method.startswith("reviewkd")
    assert ("kd" in record) == (method in ("kd", "reviewkd+kd"))
    assert all(isinstance(v, float) and v == v for k, v in record.items() if k != "epoch")
    manifest = read_manifest(tmp_path)
    assert manifest["method"]["name"] == method
    if method == "ce":
        assert manifest["teacher"]["arch"] is None
    else:
        assert manifest["teacher"]["arch"] == "cifar_resnet20" and manifest["teacher"]["top1"] is not None


def test_run_directory_and_manifest_are_complete(teacher_file: Path, tmp_path: Path) -> None:
    config = with_teacher(teacher_file, "train.epochs=2", "method.hcl_weight=0.6")
    distill(config, tmp_path)
    for name in (
        "config.yaml",
        "manifest.json",
        "metrics.jsonl",
        "student.safetensors",
        "checkpoints/last.pt",
    ):
        assert (tmp_path / name).is_file(), name
    assert load_config(tmp_path / "config.yaml") == config
    m = read_manifest(tmp_path)
    assert m["classes"] == [str(d) for d in range(10)]
    assert m["input"] == {
        "shape": [3, 8, 8],
        "layout": "NCHW",
        "dtype": "float32",
        "mean": [0.3053] * 3,
        "std": [0.376] * 3,
        "resize": None,
    }
    metrics = read_metrics(tmp_path / "metrics.jsonl")
    best = max(metrics, key=lambda r: r["val_top1"])
    student = m["student"]
    assert (student["arch"], student["num_classes"], student["epoch"]) == (
        "cifar_resnet20",
        10,
        best["epoch"],
    )
    assert (student["top1"], student["top5"]) == (best["val_top1"], best["val_top5"])
    teacher = m["teacher"]
    assert (
        teacher["arch"] == "cifar_resnet20"
        and 0 <= teacher["top1"] <= 100
        and teacher["top5"] >= teacher["top1"]
    )
    from deploy.fileio import sha256_file

    assert teacher["sha256"] == sha256_file(teacher_file)
    assert m["method"] == {
        "name": "reviewkd",
        "params": {
            "warmup_epochs": 1.0,
            "hcl_weight": 0.6,
            "student_taps": None,
            "teacher_taps": None,
            "teacher_pre_activation": False,  # the digits default's choice
        },
    }
    assert m["data"]["dataset"] == "digits" and m["data"]["num_train"] == 160 and m["data"]["num_val"] == 360
    assert m["artifacts"]["student.safetensors"]["kind"] == "weights"
    assert student["sha256"] == m["artifacts"]["student.safetensors"]["sha256"]
    verify_artifact(tmp_path, m, "student.safetensors")
    ckpt = load_checkpoint(tmp_path / "checkpoints" / "last.pt")  # weights_only=True inside
    assert ckpt.epoch == 2 and ckpt.step == 0 and ckpt.head  # ReviewKD's ABF head is saved
    assert {"python", "numpy", "torch", "cuda"} <= set(ckpt.rng)
    assert ckpt.optimizer["state"] and ckpt.scheduler["last_epoch"] > 0 and ckpt.best is not None

    # The bare student: loads strictly into a fresh model, no ABF or teacher tensors.
    state = load_file(tmp_path / "student.safetensors")
    fresh = create_model("cifar_resnet20", 10)
    assert set(state) == set(fresh.state_dict())
    fresh.load_state_dict(state, strict=True)
    assert not any(k.startswith(("head", "abf", "teacher", "student.")) for k in state)

    # The same directory again without --resume is refused; with a changed config, too.
    with pytest.raises(UsageError, match="already holds a training run"):
        distill(config, tmp_path)
    with pytest.raises(UsageError, match=r"--resume with a different config \(optim\.lr changed\)"):
        distill(
            with_teacher(teacher_file, "train.epochs=2", "method.hcl_weight=0.6", "optim.lr=0.2"),
            tmp_path,
            resume=True,
        )


def _cli(out: Path, config_file: Path, *extra: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "reviewkd.app.cli",
        "distill",
        "--config",
        str(config_file),
        "--out",
        str(out),
        *extra,
    ]


def _wait_for_epochs(proc: subprocess.Popen[bytes], metrics: Path, epochs: int, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    # The checkpoint follows the metrics line: wait for both, so the resume starts mid-run.
    while len(read_metrics(metrics)) < epochs or not (metrics.parent / "checkpoints" / "last.pt").exists():
        assert proc.poll() is None, "the training process ended before it could be interrupted"
        assert time.monotonic() < deadline, "no epoch finished in time"
        time.sleep(0.05)


def _student_state(run: Path) -> dict[str, torch.Tensor]:
    return load_checkpoint(run / "checkpoints" / "last.pt").student


def _assert_same_run(run: Path, reference: Path) -> None:
    assert [r["epoch"] for r in read_metrics(run / "metrics.jsonl")] == [1, 2, 3]
    got, want = _student_state(run), _student_state(reference)
    assert got.keys() == want.keys()
    assert all(torch.equal(got[k], want[k]) for k in want), (
        "resumed weights differ from the uninterrupted run"
    )
    got_ema = load_checkpoint(run / "checkpoints" / "last.pt").ema
    want_ema = load_checkpoint(reference / "checkpoints" / "last.pt").ema
    assert got_ema is not None and want_ema is not None and got_ema["updates"] == want_ema["updates"]
    assert all(torch.equal(got_ema["weights"][k], want_ema["weights"][k]) for k in want_ema["weights"]), (
        "the resumed weight average differs from the uninterrupted run's"
    )
    best, best_reference = (
        load_file(run / "student.safetensors"),
        load_file(reference / "student.safetensors"),
    )
    assert all(torch.equal(best[k], best_reference[k]) for k in best_reference)


@pytest.fixture(scope="module")
def resume_setup(teacher_file: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A 3-epoch config file and its uninterrupted run, with a weight average to resume as well."""
    base = tmp_path_factory.mktemp("resume")
    config_file = base / "tiny.yaml"
    save_config(
        with_teacher(
            teacher_file,
            "train.epochs=3",
            "data.subset=320",
            "method.name=reviewkd+kd",
            "train.ema_decay=0.9",
        ),
        config_file,
    )
    reference = base / "reference"
    distill(load_config(config_file), reference)
    return config_file, reference


def test_sigkill_then_resume_reproduces_the_uninterrupted_run(
    resume_setup: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config_file, reference = resume_setup
    run = tmp_path / "run"
    proc = subprocess.Popen(
        _cli(run, config_file), cwd=REPO_ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    _wait_for_epochs(proc, run / "metrics.jsonl", 1)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert len(read_metrics(run / "metrics.jsonl")) < 3
    assert main(["distill", "--out", str(run), "--resume"]) == 0
    assert "resuming" in capsys.readouterr().out
    _assert_same_run(run, reference)


def test_sigint_saves_mid_epoch_and_resume_is_exact(resume_setup: tuple[Path, Path], tmp_path: Path) -> None:
    config_file, reference = resume_setup
    run = tmp_path / "run"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(
        _cli(run, config_file), cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env
    )
    _wait_for_epochs(proc, run / "metrics.jsonl", 1)
    time.sleep(0.3)  # into epoch 2
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err.decode()
    assert b"continue with --resume" in out
    ckpt = load_checkpoint(run / "checkpoints" / "last.pt")
    assert ckpt.epoch >= 1
    assert main(["distill", "--config", str(config_file), "--out", str(run), "--resume"]) == 0
    _assert_same_run(run, reference)


def test_the_weight_average_is_validated_and_kept_and_the_live_weights_logged(
    teacher_file: Path, tmp_path: Path
) -> None:
    config = with_teacher(teacher_file, "train.epochs=2", "train.eval_every=2", "train.ema_decay=0.8")
    distill(config, tmp_path)
    first, last = read_metrics(tmp_path / "metrics.jsonl")
    assert "val_top1" not in first and {"val_top1", "live_val_top1", "live_val_top5"} <= set(last)
    checkpoint = load_checkpoint(tmp_path / "checkpoints" / "last.pt")
    assert checkpoint.ema is not None
    kept = load_file(tmp_path / "student.safetensors")
    averaged = checkpoint.ema["weights"]
    # The file holds the average (its only validated epoch), not the live weights.
    assert all(torch.equal(kept[k], averaged[k]) for k in kept)
    assert any(not torch.equal(kept[k], checkpoint.student[k]) for k in kept)
    assert read_manifest(tmp_path)["student"]["top1"] == pytest.approx(last["val_top1"])


def test_nan_loss_stops_and_keeps_the_last_checkpoint(teacher_file: Path, tmp_path: Path) -> None:
    # The learning rate jumps by 1e30 after epoch 1, so epoch 2 diverges.
    config = with_teacher(
        teacher_file, "train.epochs=3", "schedule.name=step", "schedule.milestones=[1]", "schedule.gamma=1e30"
    )
    with pytest.raises(TrainingDivergedError, match=r"epoch 2 step \d+: the loss is not finite") as info:
        distill(config, tmp_path)
    assert info.value.exit_code == 1
    ckpt = load_checkpoint(tmp_path / "checkpoints" / "last.pt")
    assert ckpt.epoch == 1 and all(
        torch.isfinite(v).all() for v in ckpt.student.values() if v.is_floating_point()
    )
    assert [r["epoch"] for r in read_metrics(tmp_path / "metrics.jsonl")] == [1]
    verify_artifact(tmp_path, read_manifest(tmp_path), "student.safetensors")


def test_cli_teacher_then_distill_trains_the_teacher_first(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    overrides = [*TINY, "data.subset=100", "teacher.epochs=1"]
    assert main(["teacher", "--out", str(tmp_path / "t"), *overrides]) == 0
    manifest = read_manifest(tmp_path / "t")
    assert manifest["teacher"]["arch"] == "cifar_resnet20" and manifest["teacher"]["top1"] is not None
    assert "teacher weights:" in capsys.readouterr().out
    # Without teacher.weights, distill trains the teacher into DIR/teacher/ first.
    assert main(["distill", "--out", str(tmp_path / "s"), "--epochs", "1", *overrides]) == 0
    assert (tmp_path / "s" / "teacher" / "teacher.safetensors").is_file()
    manifest = read_manifest(tmp_path / "s")
    assert manifest["teacher"]["weights"] == str(tmp_path / "s" / "teacher" / "teacher.safetensors")
    out = capsys.readouterr().out
    assert out.index("teacher cifar_resnet20: val top1") < out.index("student epoch 1/1")
    data = json.loads((tmp_path / "s" / "metrics.jsonl").read_text().splitlines()[0])
    assert data["epoch"] == 1


def test_resume_with_a_missing_checkpoint_refuses_instead_of_retraining(
    teacher_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = with_teacher(teacher_file, "train.epochs=1", "method.name=kd")
    distill(config, tmp_path)
    student, metrics = (
        (tmp_path / "student.safetensors").read_bytes(),
        (tmp_path / "metrics.jsonl").read_text(),
    )
    (tmp_path / "checkpoints" / "last.pt").unlink()
    with pytest.raises(UsageError, match=r"last\.pt: missing, but .* holds trained epochs"):
        distill(config, tmp_path, resume=True)
    with pytest.raises(UsageError, match=r"already holds a training run \(student\.safetensors\)"):
        distill(config, tmp_path)
    save_config(config, tmp_path / "run.yaml")
    assert main(["distill", "--config", str(tmp_path / "run.yaml"), "--out", str(tmp_path), "--resume"]) == 2
    assert "last.pt: missing" in capsys.readouterr().err
    # Nothing was retrained or rewritten.
    assert (tmp_path / "student.safetensors").read_bytes() == student
    assert (tmp_path / "metrics.jsonl").read_text() == metrics
    assert not (tmp_path / "checkpoints" / "last.pt").exists()
    # --resume on a directory that holds no run yet starts it (what `make demo` relies on).
    assert distill(config, tmp_path / "fresh", resume=True).is_file()


@pytest.mark.parametrize(
    "override", ["student.arch=no_such_net", "teacher.arch=no_such_net", "student.arch=torchvision:nope"]
)
def test_unknown_model_names_are_refused_before_any_work(override: str, tmp_path: Path) -> None:
    # No teacher.weights: without the early check the teacher would be trained into OUT/teacher/ first.
    config = tiny("teacher.epochs=1", "train.epochs=1", override)
    with pytest.raises(UsageError, match="unknown model"):
        distill(config, tmp_path / "run")
    assert not (tmp_path / "run").exists()
    if override.startswith("teacher."):
        with pytest.raises(UsageError, match="unknown model 'no_such_net'"):
            train_teacher(config, tmp_path / "teacher")
        assert not (tmp_path / "teacher").exists()


def test_eval_every_scores_only_some_epochs_and_always_the_last(teacher_file: Path, tmp_path: Path) -> None:
    distill(with_teacher(teacher_file, "method.name=kd", "train.epochs=3", "train.eval_every=2"), tmp_path)
    records = read_metrics(tmp_path / "metrics.jsonl")
    assert ["val_top1" in r for r in records] == [False, True, True]
    assert all("loss" in r and "train_top1" in r for r in records)
    student = read_manifest(tmp_path)["student"]
    assert student["epoch"] in (2, 3)
    assert student["top1"] == max(r["val_top1"] for r in records[1:])


def test_teacher_full_data_trains_the_teacher_on_every_image(tmp_path: Path) -> None:
    config = tiny(
        "data.subset=100", "teacher.full_data=true", "teacher.epochs=1", "train.epochs=1", "method.name=kd"
    )
    distill(config, tmp_path)
    assert read_manifest(tmp_path / "teacher")["data"]["num_train"] == 1437
    assert read_manifest(tmp_path)["data"]["num_train"] == 100


def test_a_carved_val_split_selects_and_the_test_split_is_scored_once_at_the_end(
    teacher_file: Path, tmp_path: Path
) -> None:
    config = with_teacher(teacher_file, "method.name=kd", "train.epochs=2", "data.val_split=100")
    distill(config, tmp_path)
    records = read_metrics(tmp_path / "metrics.jsonl")
    manifest = read_manifest(tmp_path)
    student, data = manifest["student"], manifest["data"]
    assert (data["val_split"], data["num_val"], data["test_split"], data["num_test"]) == (
        "train-holdout",
        100,
        "heldout",
        360,
    )
    # The best epoch is chosen on the carved split; the test split is read only for the kept weights.
    assert student["top1"] == max(r["val_top1"] for r in records)
    assert all("test_top1" not in r for r in records)
    test = student["test"]
    assert (test["split"], test["n"]) == ("heldout", 360) and set(test) == {"split", "n", "top1", "top5"}
    # The teacher is scored on the same test split once, for the report's comparison.
    assert (manifest["teacher"]["test"]["split"], manifest["teacher"]["test"]["n"]) == ("heldout", 360)
    kept = create_model("cifar_resnet20", 10, weights=tmp_path / "student.safetensors").eval()
    bundle = build_data(config)
    with torch.no_grad():
        x = bundle.normalize(bundle.held_out.images)  # type: ignore[arg-type]
        top1 = 100.0 * float((kept(x).argmax(1) == bundle.held_out.labels).float().mean())
    assert test["top1"] == pytest.approx(top1, abs=1e-6)


def test_the_manifest_reads_into_its_typed_blocks_and_writes_back_byte_for_byte(
    teacher_file: Path, tmp_path: Path
) -> None:
    # A real run's manifest, with a carved val split so that the student has its "test" scores.
    distill(with_teacher(teacher_file, "method.name=kd", "train.epochs=1", "data.val_split=100"), tmp_path)
    text = (tmp_path / "manifest.json").read_text(encoding="utf-8")
    raw = json.loads(text)
    manifest = read_manifest(tmp_path)
    write_manifest(tmp_path, manifest)
    assert (tmp_path / "manifest.json").read_text(encoding="utf-8") == text

    for role in ("student", "teacher"):
        block, recorded = model_block(manifest, role), raw[role]
        assert block.arch == recorded["arch"] and block.sha256 == recorded["sha256"]
        assert block.scores == {key: recorded[key] for key in ("top1", "top5")}
        test = {key: recorded["test"][key] for key in ("top1", "top5")} if "test" in recorded else None
        assert block.test_scores == test
        assert block.reported_scores == (test or block.scores)
    assert model_block(manifest, "student").test_scores is not None
    student = model_block(manifest, "student")
    assert (student.num_classes, student.weights, student.epoch) == (
        raw["student"]["num_classes"],
        raw["student"]["weights"],
        raw["student"]["epoch"],
    )
    method, data = method_block(manifest), data_block(manifest)
    assert (method.name, method.params) == (raw["method"]["name"], raw["method"]["params"])
    assert (data.dataset, data.root) == (raw["data"]["dataset"], raw["data"].get("root"))
    spec = input_spec(manifest)
    assert [list(spec.shape), list(spec.mean), list(spec.std), spec.resize] == [
        raw["input"][key] for key in ("shape", "mean", "std", "resize")
    ]
