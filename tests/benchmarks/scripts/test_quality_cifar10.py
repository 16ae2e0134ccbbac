"""quality_cifar10's seed statistics: mean and sample std per method, paired gains, the table."""

from __future__ import annotations

import pytest

from benchmarks.scripts.quality_cifar10 import PRESETS, aggregate, distill_command, mean_std, render_table


def _run(top1: float, val_top1: float | None = None) -> dict[str, float | None]:
    return {"top1_last": top1, "val_top1_last": val_top1, "teacher_top1": 83.2}


def test_seed_statistics_pair_the_gains_by_seed() -> None:
    per_seed = {
        0: {"ce": _run(67.0), "kd": _run(71.0), "reviewkd": _run(75.0)},
        1: {"ce": _run(66.0), "kd": _run(70.5), "reviewkd": _run(74.0)},
        2: {"ce": _run(68.0), "reviewkd": _run(76.0)},  # kd of seed 2 did not finish
    }
    summary = aggregate(per_seed)
    assert summary["ce"]["top1"]["mean"] == pytest.approx(67.0)
    assert summary["ce"]["top1"]["std"] == pytest.approx(1.0)  # sample std (ddof=1)
    assert summary["kd"]["seeds"] == [0, 1] and summary["kd"]["gain_over_ce"]["values"] == [4.0, 4.5]
    review = summary["reviewkd"]
    assert review["gain_over_ce"]["values"] == [8.0, 8.0, 8.0] and review["gain_over_ce"]["std"] == 0.0
    assert review["gain_over_kd"]["values"] == [4.0, 3.5]  # only the seeds that have both
    assert "gain_over_kd" not in summary["ce"] and "gain_over_ce" not in summary["ce"]
    table = render_table(summary, 83.2)
    # Student-t intervals: t(0.975, 2) = 4.303 for three seeds, t(0.975, 1) = 12.706 for two.
    assert (
        "| reviewkd | 3 | 75.00 ± 1.00 [72.52, 77.48] | 75.00, 74.00, 76.00 | +8.00 ± 0.00 [8.00, 8.00] |"
        " +3.75 ± 0.35 [0.57, 6.93] |  |" in table
    )
    assert mean_std([70.0])["std"] is None and "| 1 | 70.00 | 70.00 |" in render_table(
        aggregate({0: {"ce": _run(70.0)}}), None
    )


def test_runs_that_carved_a_val_split_show_its_top1_beside_the_test_top1() -> None:
    summary = aggregate({0: {"ce": _run(68.0, 69.0)}, 1: {"ce": _run(70.0, 71.0)}})
    assert summary["ce"]["val_top1"]["values"] == [69.0, 71.0]
    assert render_table(summary, None).endswith("| 70.00 ± 1.41 [57.29, 82.71] |")
    assert "data.val_split=5000" in PRESETS["cpu"].overrides()


def test_each_seed_is_its_own_run_with_train_seed(tmp_path) -> None:  # type: ignore[no-untyped-def]
    command = distill_command(
        PRESETS["cpu"], "kd", 2, tmp_path / "seed2" / "kd", tmp_path, tmp_path / "t.th", ["x.y=1"]
    )
    assert "train.seed=2" in command and command[-1] == "x.y=1"
    assert "schedule.name=onecycle" in command and "data.first_per_class=1000" in command
    assert "--resume" not in command
