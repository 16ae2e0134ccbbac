"""The calibration candidates' race: a candidate clearly behind drops out; the rest finish and decide."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from export.calibration import best_method, race, score
from export.check import run_onnx
from export.race import RACE_MIN_IMAGES, clearly_above
from tests.helpers import INPUT_SHAPE, export_onnx, tiny_net

BATCH = 50
IMAGES = 600


def test_clearly_above_needs_the_whole_interval_above_zero() -> None:
    rng = np.random.default_rng(0)
    assert clearly_above(np.full(300, 1e-6))  # always a little worse: no doubt left
    assert clearly_above(1.0 + rng.standard_normal(300))
    assert not clearly_above(rng.standard_normal(300))  # no difference on average
    assert not clearly_above(0.1 + rng.standard_normal(300))  # behind, but not beyond doubt yet
    assert not clearly_above(np.zeros(300)) and not clearly_above(np.array([5.0]))


def _perturbed(tmp_path: Path, name: str, noise: float) -> Path:
    model = tiny_net()
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(noise * torch.randn_like(parameter))
    return export_onnx(model, tmp_path / f"{name}.onnx")


def test_a_candidate_clearly_behind_drops_out_and_the_finishers_decide(tmp_path: Path) -> None:
    exact = export_onnx(tiny_net(), tmp_path / "exact.onnx")
    rng = np.random.default_rng(1)
    held_out = [rng.standard_normal((BATCH, *INPUT_SHAPE)).astype(np.float32) for _ in range(IMAGES // BATCH)]
    reference = run_onnx(exact, held_out)
    torch.manual_seed(2)
    candidates = {
        "minmax": _perturbed(tmp_path, "close", 1e-3),
        "entropy": _perturbed(tmp_path, "far", 0.3),
        "percentile": _perturbed(tmp_path, "close_too", 1e-3),
    }
    scores = {s.method: s for s in race(candidates, reference, held_out)}
    assert scores["entropy"].images == RACE_MIN_IMAGES  # out at the first look
    assert scores["minmax"].images == scores["percentile"].images == IMAGES
    # The finishers' scores are the full scores, and the race's choice is the full race's.
    full = {m: score(path, reference, held_out, m) for m, path in candidates.items()}
    for method in ("minmax", "percentile"):
        assert scores[method].logit_rel_l2 == full[method].logit_rel_l2
        assert scores[method].agreement == full[method].agreement
    finished = [scores["minmax"], scores["percentile"]]
    assert best_method(finished).method == best_method(list(full.values())).method
    assert full["entropy"].logit_rel_l2 > 10 * max(s.logit_rel_l2 for s in finished)
