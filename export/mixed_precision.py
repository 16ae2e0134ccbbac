"""Sensitivity-driven mixed precision: the fewest, most sensitive layers stay in float.

Sensitivity of a layer: the top-1 it costs when it is the only one quantized (its Q/DQ inputs,
weights and output), on the held-out training images (never validation). Layers are ranked by
that cost, ties broken by the disagreement with fp32 and then by the logits' relative L2 error,
which still separate layers whose cost on a few images is zero; the ranking orders layers and
runs on the first RANKING_IMAGES held-out images. Then the search finds the fewest top-ranked
layers to leave in float (`search_float_count`) for the int8 file to be confirmed within the
budget (`--max-top1-drop-int8`, 0.3 points by default): the paired interval of its top-1 drop
against fp32 (deploy.paired_stats) lies entirely at or below the budget, judged sequentially on as
many held-out images as it takes (deploy.gates' looks over up to BUDGET_HELD_OUT of them, stopping
once the interval is inside or outside the budget). A point estimate within the budget is not
enough: a depthwise student's int8 file that met the budget on its point estimate over 1,000
held-out images lost 0.60 points on its test set (issue 23). Where the held-out images are too few
to confirm a typical file (`confirmable`: no drop, 1% of its images
discordant), the search falls back to the point estimate and its record says so.

Float is the flavour's `float_layers`: fp32 for the cpu file (ONNX Runtime), fp16 for the trt file
(TensorRT; export/precision.py's `compute_in_fp16`). The search judges the file in ONNX Runtime on
the CPU, which only approximates TensorRT's fp16 there: onnxruntime 1.32 on x86 has no fp16 kernels
for these nodes, so it computes them in fp32 from the fp16 weights and drops the casts that would
round their activations to fp16 (seen in its optimised graph). TensorRT's strongly typed builder
(10.12+, 11) runs them in fp16; a weakly typed build (older 10.x) gets the FP16 flag besides INT8
for such a file (export/tensorrt_engine.py's `weak_typing_flags`).

The search over k, the number of top-ranked layers in float (the file with k float layers is always
the ranking's first k), gallops and then bisects: it judges k = 1, 2, 4, 8, ... (capped at the
number of ranked layers) until one meets the budget, then bisects between the largest k that did not
meet and the smallest that did until they are adjacent, and writes the smallest k that met. That is
about 2 log2(k) judged files, not k: a depthwise student (mobilenet_v3_small, 98 ranked layers)
that keeps about 90 layers in float was 87 to 93 judged files one more at a time, each on up to
10,000 images, and is 14 this way (the all-int8 file included). It assumes that, as a rule, more
float layers do not make a file worse. Where that fails (some k does not meet though a smaller one
does), the written file still meets the budget, since it was judged to; it may keep more float
layers than the fewest possible (that student's ONNX Runtime file: 90, where one more at a time had
stopped at 86). Fewer judgements are also statistically better: each judgement is another look at
the same held-out images, and the more files are held to them, the likelier one of them meets the
budget on these images by luck rather than on unseen ones.

The search's record (`MixedPrecision.as_dict`) lists every judged file in the order judged (its
float layer count, held-out drop and interval, images, verdict and latency at batch 32 on one
thread, the median of a few runs). A float layer's own latency cost would need the file with one
layer fewer, which the search does not judge, so the record has none.
"""

from __future__ import annotations

import os
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from deploy.errors import UsageError
from deploy.gates import sequential_looks
from deploy.paired_stats import PairedComparison, Verdict, compare_predictions, judge_drop
from deploy.runners.onnxruntime_runner import CPU_PROVIDER, open_session
from deploy.status import Status
from export.check import batch_looks, open_check_session, run_onnx, sequential_logits
from export.onnx_export import module_path
from export.precision import Int8Quantizer

DEFAULT_MAX_TOP1_DROP = 0.3  # points
# Node types ONNX Runtime quantizes that do arithmetic (Relu and Clip fold into their producer's Q/DQ;
# shape ops only pass quantized tensors through).
LAYER_OPS = frozenset(
    {"Conv", "ConvTranspose", "Gemm", "MatMul", "Add", "Mul", "GlobalAveragePool", "AveragePool", "Concat"}
)
TIMING_ROUNDS = 10
# Held-out training images the budget may be judged on: a 0.3-point budget needs thousands (a file
# with 1.4% of images discordant and no drop resolves it at about 6,000).
BUDGET_HELD_OUT = 10_000
# Below the images that could confirm the budget for a file that loses nothing and disagrees with
# fp32 on 1% of them (the pretrained ResNet-56's int8 files disagree on 1.4-2% of the test images),
# the interval would keep nearly every layer in float: the point estimate decides instead.
TYPICAL_DISCORDANCE = 0.01
# Held-out images the layer ranking runs on: it only orders layers, and runs once per layer.
RANKING_IMAGES = 1000


def first_images(batches: Sequence[np.ndarray], count: int) -> list[np.ndarray]:
    """The leading whole batches of `batches` that hold at least `count` images (all if fewer)."""
    taken: list[np.ndarray] = []
    for batch in batches:
        if sum(len(b) for b in taken) >= count:
            break
        taken.append(batch)
    return taken


@dataclass(frozen=True)
class BudgetJudgement:
    """One file held to the budget: the paired comparison at the look it stopped at, and the verdict."""

    comparison: PairedComparison
    verdict: Verdict

    @property
    def within(self) -> bool:
        """Confirmed within the budget: the whole interval at or below it."""
        return self.verdict.status == Status.OK

    def as_dict(self) -> dict[str, Any]:
        """The manifest's record: points, the interval, the images used, the verdict."""
        low, high = self.comparison.interval
        return {
            "drop_points": 100 * self.comparison.drop,
            "interval_points": [100 * low, 100 * high],
            "confidence": self.comparison.confidence,
            "images": self.comparison.n,
            "verdict": self.verdict.status,
        }


@dataclass(frozen=True)
class Sensitivity:
    """What quantizing one layer alone costs against fp32 on the held-out images."""

    node: str
    op_type: str
    module: str
    top1_cost: float  # points of top-1 lost
    disagreement: float  # fraction of images whose top-1 class changes
    logit_rel_l2: float

    def as_dict(self) -> dict[str, Any]:
        """A JSON-ready form."""
        return dict(self.__dict__)


@dataclass(frozen=True)
class SearchStep:
    """One file the search judged: its float layer count, its judgement, whether it met the budget
    (by interval or point estimate, as the search decides), and its latency at batch 32."""

    float_count: int
    judgement: BudgetJudgement
    met: bool
    latency_ms: float  # batch 32, one thread

    def as_dict(self) -> dict[str, Any]:
        """The manifest's record of the step."""
        return {
            "float_layers": self.float_count,
            **self.judgement.as_dict(),
            "met": self.met,
            "latency_ms_batch32": self.latency_ms,
        }


@dataclass(frozen=True)
class MixedPrecision:
    """The search's outcome: every judged file in the order judged (the all-int8 file first), the
    float layers of the one written (the ranking's first len(float_layers), a judged step), the
    ranking, and whether the written file met the budget."""

    budget: float  # points
    decided_by: str  # "interval", or "point estimate" where the held-out images cannot confirm
    steps: list[SearchStep]
    float_layers: list[Sensitivity] = field(default_factory=list)
    ranking: list[Sensitivity] = field(default_factory=list)
    met: bool = True

    @property
    def full_int8(self) -> BudgetJudgement:
        """The judgement of the file with every layer quantized."""
        return self.steps[0].judgement

    @property
    def written_step(self) -> SearchStep:
        """The judged step of the file written."""
        return next(step for step in self.steps if step.float_count == len(self.float_layers))

    @property
    def written(self) -> BudgetJudgement:
        """The judgement of the file written."""
        return self.written_step.judgement

    @property
    def full_int8_drop(self) -> float:
        """Points lost with every layer quantized, on the images its judgement used."""
        return 100 * self.full_int8.comparison.drop

    @property
    def drop(self) -> float:
        """Points the written file loses, on the images its judgement used."""
        return 100 * self.written.comparison.drop

    def as_dict(self) -> dict[str, Any]:
        """The manifest's record."""
        return {
            "budget_points": self.budget,
            "decided_by": self.decided_by,
            "held_out_drop_points": {"all_int8": self.full_int8_drop, "written": self.drop},
            "held_out": {"all_int8": self.full_int8.as_dict(), "written": self.written.as_dict()},
            "met": self.met,
            "float_layers": [layer.as_dict() for layer in self.float_layers],
            "steps": [step.as_dict() for step in self.steps],
            "latency_ms_batch32": {
                "all_int8": self.steps[0].latency_ms,
                "written": self.written_step.latency_ms,
            },
            "ranking": [layer.as_dict() for layer in self.ranking[:10]],
        }


def search_float_count(meets_with: Callable[[int], bool], ranked: int) -> int | None:
    """The smallest k in 1..`ranked` for which `meets_with(k)` holds, found by galloping (k = 1, 2,
    4, ..., capped at `ranked`, until one meets) and then bisecting between the largest k that did
    not meet and the smallest that did until they are adjacent; None when not even `ranked` meets.

    `meets_with` is asked about each k at most once, about 2 log2(answer) times in all. The answer is
    the fewest where `meets_with` never turns false again as k grows (the search assumes it, as a
    rule, of float layers); otherwise it is still a k that met, with k - 1 asked and not met, though
    a smaller k may have met too.
    """
    if ranked < 1:
        return None
    failed = 0  # the largest k known not to meet (0: the all-int8 file, judged by the caller)
    count = 1
    while not meets_with(count):
        if count == ranked:
            return None
        failed = count
        count = min(2 * count, ranked)
    met = count  # the smallest k known to meet
    while met - failed > 1:
        middle = (failed + met) // 2
        if meets_with(middle):
            met = middle
        else:
            failed = middle
    return met


def _top1(logits: np.ndarray, labels: np.ndarray) -> float:
    return float(np.mean(logits.argmax(1) == labels))


def _rel_l2(logits: np.ndarray, reference: np.ndarray) -> float:
    return float(np.linalg.norm(logits - reference)) / max(float(np.linalg.norm(reference)), 1e-12)


def rank_layers(
    quantizer: Int8Quantizer,
    images: Sequence[np.ndarray],
    labels: np.ndarray,
    reference: np.ndarray,
    workdir: Path,
    device: str = "cpu",
) -> list[Sensitivity]:
    """Quantize each layer of `quantizer.prepared` alone and rank them, most sensitive first, each
    file run on `device` (export.check.run_onnx)."""
    graph = onnx.load(str(quantizer.prepared)).graph
    reference_top1 = _top1(reference, labels)
    ranked: list[Sensitivity] = []
    for node in graph.node:
        if node.op_type not in LAYER_OPS:
            continue
        path = workdir / "alone.onnx"
        quantizer.write(path, only_nodes=[node.name])
        logits = run_onnx(path, images, device)
        ranked.append(
            Sensitivity(
                node.name,
                node.op_type,
                module_path(node.name),
                100 * (reference_top1 - _top1(logits, labels)),
                float(np.mean(logits.argmax(1) != reference.argmax(1))),
                _rel_l2(logits, reference),
            )
        )
    ranked.sort(key=lambda s: (s.top1_cost, s.disagreement, s.logit_rel_l2), reverse=True)
    return ranked


def _batch32_ms(path: Path, images: Sequence[np.ndarray]) -> float:
    session, _ = open_session(path, [CPU_PROVIDER], threads=1)
    batch = np.concatenate(list(images))[:32]
    session.run(None, {session.get_inputs()[0].name: batch})
    times = []
    for _ in range(TIMING_ROUNDS):
        start = time.perf_counter()
        session.run(None, {session.get_inputs()[0].name: batch})
        times.append(1000 * (time.perf_counter() - start))
    return float(np.median(times))


def fit_budget(
    quantizer: Int8Quantizer,
    fp32_path: str | os.PathLike[str],
    dst: str | os.PathLike[str],
    images: Sequence[np.ndarray],
    labels: np.ndarray,
    *,
    budget: float = DEFAULT_MAX_TOP1_DROP,
    calibration_record: dict[str, Any] | None = None,
    reference: np.ndarray | None = None,
    device: str = "cpu",
) -> tuple[dict[str, Any], MixedPrecision]:
    """Write `quantizer`'s int8 file to `dst` with the fewest float layers that meet `budget` points.

    `images` and `labels` are the held-out training images the drop is judged on: a file meets the
    budget when its paired interval lies at or below it (`judge_budget`), or, where a typical file
    could not be confirmed on so few images (`confirmable`), when its point estimate does. The number
    of top-ranked layers left in float is searched by `search_float_count`, each file judged once
    and recorded as a step; the smallest that met is written. When no number of float layers meets
    the budget, the file with every ranked layer in float is written and the result says
    `met=False`. `reference` is the fp32 file's logits on `images` where the caller has
    them (export computes them once for every int8 flavour); None runs the fp32 file here. Every
    file is judged on `device` (export.check.run_onnx; the batch-32 latencies are the CPU's).
    Returns (the file's description, the search).
    """
    if budget < 0:
        raise UsageError(f"--max-top1-drop-int8 {budget}: expected >= 0 points")
    if not len(labels):
        raise UsageError("mixed precision needs held-out labelled training images; none were given")
    if reference is None:
        reference = run_onnx(fp32_path, images, device)
    by_interval = confirmable(len(labels), budget)
    with tempfile.TemporaryDirectory(prefix="reviewkd-mixed-") as tmp:
        work = Path(tmp)

        def judge_with(excluded: list[str]) -> tuple[BudgetJudgement, Path]:
            path = work / f"float{len(excluded)}.onnx"
            quantizer.write(path, exclude_nodes=excluded)
            if by_interval:
                return judge_budget(path, images, labels, reference, budget, device), path
            logits = run_onnx(path, images, device)
            comparison = compare_predictions(labels, reference.argmax(1), logits.argmax(1))
            return BudgetJudgement(comparison, judge_drop(comparison, budget)), path

        def meets(judgement: BudgetJudgement) -> bool:
            return judgement.within if by_interval else 100 * judgement.comparison.drop <= budget

        judged: dict[int, SearchStep] = {}  # by float layer count, in the order judged: none twice

        def step_with(ranking: list[Sensitivity], count: int) -> SearchStep:
            if count not in judged:
                judgement, path = judge_with([layer.node for layer in ranking[:count]])
                judged[count] = SearchStep(count, judgement, meets(judgement), _batch32_ms(path, images))
            return judged[count]

        unconfirmable = (
            f"point estimate: {len(labels):,} held-out images cannot confirm a {budget:g}-point budget"
        )
        decided_by = "interval" if by_interval else unconfirmable
        ranking: list[Sensitivity] = []
        count, met = 0, step_with(ranking, 0).met
        if not met:
            ranking_images = first_images(images, RANKING_IMAGES)
            ranked_count = sum(len(b) for b in ranking_images)
            ranking = rank_layers(
                quantizer, ranking_images, labels[:ranked_count], reference[:ranked_count], work, device
            )
            fewest = search_float_count(lambda k: step_with(ranking, k).met, len(ranking))
            met = fewest is not None
            # search_float_count judged it: the smallest that met, or, where none did, every layer.
            count = len(ranking) if fewest is None else fewest
        result = MixedPrecision(budget, decided_by, list(judged.values()), ranking[:count], ranking, met)
    excluded = [layer.node for layer in result.float_layers]
    description = quantizer.write(
        dst,
        exclude_nodes=excluded,
        calibration_record=calibration_record,
        record={"mixed_precision": result.as_dict()},
    )
    return description, result


def confirmable(images: int, budget: float) -> bool:
    """Whether `images` held-out images can confirm a `budget`-point drop for a typical int8 file: at
    the last look, the interval of a file that loses nothing but disagrees with fp32 on
    TYPICAL_DISCORDANCE of the images lies within the budget."""
    if images < 1:
        return False
    half = round(images * TYPICAL_DISCORDANCE / 2)  # as many losses as gains: no drop
    typical = PairedComparison(
        images, images - half, images - half, half, half, sequential_looks(images)[-1].confidence
    )
    return 100 * typical.interval[1] <= budget


def judge_budget(
    path: str | os.PathLike[str],
    images: Sequence[np.ndarray],
    labels: np.ndarray,
    reference: np.ndarray,
    budget: float,
    device: str = "cpu",
) -> BudgetJudgement:
    """Hold the int8 file at `path` to `budget` points against the fp32 `reference` logits, on the
    held-out `images` in deploy.gates' sequential looks: stop at the first look whose paired interval
    lies at or below the budget (ok) or above it (failed); else the last look's (inconclusive). The
    file runs on `device` (export.check.run_onnx)."""
    reference_predictions = reference.argmax(1)
    for _, look, logits in sequential_logits(open_check_session(path, device), images, batch_looks(images)):
        seen = len(logits)
        comparison = compare_predictions(
            labels[:seen], reference_predictions[:seen], logits.argmax(1), look.confidence
        )
        verdict = judge_drop(comparison, budget)
        if verdict.status != Status.INCONCLUSIVE:
            break
    return BudgetJudgement(comparison, verdict)
