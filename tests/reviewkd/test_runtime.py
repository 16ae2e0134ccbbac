"""The training runtime: the AMP choice, the scaler across an amp change, and DDP for real: two gloo
processes on the CPU (the finite-loss check is collective, the group is left, a 2-rank distill runs)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from safetensors.torch import save_file

from deploy.errors import UsageError
from reviewkd.checkpoint import load_checkpoint, load_scaler_state
from reviewkd.config import load_config
from reviewkd.models import create_model
from reviewkd.run_record import read_metrics
from reviewkd.runtime import all_ranks_finite, choose_amp, runtime_session, setup_runtime
from tests.helpers import free_port, launch_ranks


@pytest.mark.parametrize(
    ("requested", "capability", "expected"),
    [
        ("auto", None, "none"),  # the CPU
        ("auto", (6, 1), "none"),  # Pascal: bf16 only emulated
        ("auto", (7, 0), "none"),  # Volta: bf16 only emulated, fp16 is never picked automatically
        ("auto", (7, 5), "none"),  # Turing
        ("auto", (8, 0), "bf16"),  # Ampere A100
        ("auto", (8, 7), "bf16"),  # Jetson Orin
        ("auto", (9, 0), "bf16"),  # Hopper
        ("bf16", (7, 5), "bf16"),  # an explicit choice is kept
        ("fp16", (7, 0), "fp16"),
        ("none", (9, 0), "none"),
        ("bf16", None, "bf16"),
    ],
)
def test_amp_choice_follows_the_compute_capability(
    requested: str, capability: tuple[int, int] | None, expected: str
) -> None:
    assert choose_amp(requested, capability) == expected


def test_fp16_without_cuda_is_a_usage_error() -> None:
    with pytest.raises(UsageError, match=r"train\.amp: fp16 needs CUDA"):
        choose_amp("fp16", None)


def test_scaler_state_survives_a_change_of_train_amp() -> None:
    # A run trained without fp16 saved a disabled scaler's state, {}; resumed with fp16 the enabled
    # scaler starts fresh instead of raising on the empty state.
    saved_disabled = torch.amp.GradScaler("cpu", enabled=False).state_dict()
    assert saved_disabled == {}
    enabled = torch.amp.GradScaler("cpu", enabled=True, init_scale=1024.0)
    with pytest.raises(RuntimeError):  # what torch does with it unguarded
        torch.amp.GradScaler("cpu", enabled=True).load_state_dict(saved_disabled)
    load_scaler_state(enabled, saved_disabled)
    assert enabled.get_scale() == 1024.0
    # fp16 before, not now: the saved scale is ignored. fp16 both times: it is restored.
    trained = torch.amp.GradScaler("cpu", enabled=True, init_scale=8.0)
    trained.scale(torch.ones(()))
    trained.update(new_scale=32.0)
    disabled = torch.amp.GradScaler("cpu", enabled=False)
    load_scaler_state(disabled, trained.state_dict())
    assert disabled.state_dict() == {}
    fresh = torch.amp.GradScaler("cpu", enabled=True)
    load_scaler_state(fresh, trained.state_dict())
    assert fresh.get_scale() == 32.0


def test_sync_batchnorm_on_the_cpu_is_refused_before_joining(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WORLD_SIZE", "2")
    config = load_config(None, ["train.device=cpu", "train.sync_batchnorm=true"])
    with pytest.raises(UsageError, match=r"train\.sync_batchnorm: SyncBatchNorm needs CUDA"):
        setup_runtime(config)
    assert not dist.is_initialized()


def _finite_worker(rank: int, port: int, results: Path) -> None:
    """One rank of a 2-process gloo group: rank 0 sees a NaN loss, rank 1 a finite one."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE="2", RANK=str(rank))
    config = load_config(None, ["train.device=cpu", "train.threads=1"])
    with runtime_session(config) as runtime:
        loss = torch.tensor(float("nan") if rank == 0 else 1.0)
        verdict = all_ranks_finite([loss, torch.tensor(2.0)], runtime)
        healthy = all_ranks_finite([torch.tensor(1.0)], runtime)
    (results / f"rank{rank}").write_text(f"{verdict} {healthy} {dist.is_initialized()}")


def test_the_finite_check_is_collective_and_the_group_is_left(tmp_path: Path) -> None:
    mp.start_processes(_finite_worker, args=(free_port(), tmp_path), nprocs=2, start_method="spawn")
    # Both ranks stop together (neither waits for the other), and both left the group.
    assert (tmp_path / "rank0").read_text() == "False True False"
    assert (tmp_path / "rank1").read_text() == "False True False"


@pytest.fixture(scope="module")
def teacher_weights(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An untrained cifar_resnet20 as teacher: DDP mechanics need no good teacher."""
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("teacher") / "teacher.safetensors"
    save_file({k: v.contiguous() for k, v in create_model("cifar_resnet20", 10).state_dict().items()}, path)
    return path


DDP_TINY = [
    "data.image_size=8",
    "data.subset=256",
    "train.batch_size=32",
    "train.threads=1",
    "train.device=cpu",
    "teacher.arch=cifar_resnet20",
    "student.arch=cifar_resnet20",
    "method.name=reviewkd",
    "train.find_unused_parameters=true",
]


def test_two_rank_gloo_distill_trains_and_agrees(teacher_weights: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    overrides = [*DDP_TINY, f"teacher.weights={teacher_weights}", "train.epochs=2"]
    results = launch_ranks("distill", "--out", out, *overrides)
    for rank, result in enumerate(results):
        assert result.returncode == 0, f"rank {rank}: {result.stderr[-2000:]}"
    assert "student epoch 2/2" in results[0].stdout and results[1].stdout.strip() == ""  # rank 0 prints
    records = read_metrics(out / "metrics.jsonl")
    assert [r["epoch"] for r in records] == [1, 2]
    # 256 images over 2 ranks of 32: 4 steps each, 256 images in all per epoch.
    state = load_checkpoint(out / "checkpoints" / "last.pt")
    assert state.epoch == 2 and state.scheduler["last_epoch"] == 8
    assert all(0.0 <= r["val_top1"] <= 100.0 for r in records)


def test_two_rank_divergence_stops_both_ranks(teacher_weights: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    overrides = [
        *DDP_TINY,
        f"teacher.weights={teacher_weights}",
        "train.epochs=3",
        "schedule.name=step",
        "schedule.milestones=[1]",
        "schedule.gamma=1e30",
    ]
    results = launch_ranks("distill", "--out", out, *overrides)  # a hang would time out here
    for rank, result in enumerate(results):
        assert result.returncode == 1, f"rank {rank}: {result.stderr[-2000:]}"
        assert "epoch 2 step" in result.stderr and "the loss is not finite" in result.stderr
    assert [r["epoch"] for r in read_metrics(out / "metrics.jsonl")] == [1]
