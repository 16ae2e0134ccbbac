"""int8 calibration measured, not guessed: each method is tried and the best kept, on training images.

The training images the export reads (a fixed-seed shuffle of the training split) are cut in two
disjoint parts: the first calibrates, the next is held out to judge. With method "auto", every
method of CALIBRATION_METHODS quantizes the file and the one whose logits are closest to the fp32
file's on the held-out part wins: the smallest relative L2 error (||int8 - fp32|| / ||fp32||), ties
broken by top-1 agreement with fp32, then by the order of CALIBRATION_METHODS. Faithfulness to fp32,
not accuracy against labels, is the score: a student is often near 100% on its own training images,
where labels cannot tell methods apart, while every departure from fp32 is quantization damage.
The L2 error, not the agreement, comes first because it weighs every logit of every image: on the
pretrained CIFAR ResNet-56 (benchmarks/RESULTS.md) the agreement of the TensorRT file on 1,000
held-out images moved by 0.2 points between two calibrations of the same method and picked minmax
(0.34 points lost on the 10,000 test images) over percentile (0.05), whose L2 error was 22% below
minmax's both times. The validation split is never used, so the checks that follow judge a
choice they did not make.

The candidates race (`race`): the held-out batches run on every candidate still in the race, and a
candidate whose per-image squared logit error is, paired on the same images, clearly above the
leader's (a 99.9% interval entirely above zero, after at least 200 images) drops out; the choice is
made among those that ran on every held-out image. Its score, on the images it ran, is recorded
with their number. All three candidates share one pass of activation statistics
(export.precision.ActivationStatistics), so each costs its ranges and its file, not a calibration.

The manifest records the method, the image counts, the seed of the shuffle and a sha256 of each
image list (of the float32 pixels in order, shape included), so a calibration can be reproduced
and two exports compared.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from deploy.errors import UsageError
from export.check import open_check_session, run_onnx
from export.mixed_precision import first_images, fit_budget
from export.precision import CALIBRATION_METHODS, ActivationStatistics, Int8Quantizer
from export.race import RACE_MIN_IMAGES, clearly_above
from export.timing import StageClock, untimed

AUTO = "auto"
METHOD_CHOICES: tuple[str, ...] = (AUTO, *CALIBRATION_METHODS)
DEFAULT_HELD_OUT = 1000


def images_sha256(batches: Sequence[np.ndarray]) -> str:
    """sha256 of a list of image batches: each image's shape and float32 bytes, in order."""
    digest = hashlib.sha256()
    for batch in batches:
        for image in np.asarray(batch, dtype=np.float32):
            digest.update(repr(image.shape).encode())
            digest.update(np.ascontiguousarray(image).tobytes())
    return digest.hexdigest()


@dataclass(frozen=True)
class CalibrationData:
    """Training images for int8: `calibration` to set the ranges, `held_out` to choose a method."""

    calibration: list[np.ndarray]
    held_out: list[np.ndarray]
    held_out_labels: np.ndarray
    seed: int | None  # the seed of the training-image shuffle, where known

    def describe(self) -> dict[str, Any]:
        """The manifest's record of the images."""
        return {
            "split": "train",
            "images": sum(len(b) for b in self.calibration),
            "images_sha256": images_sha256(self.calibration),
            "held_out_images": sum(len(b) for b in self.held_out),
            "held_out_sha256": images_sha256(self.held_out) if self.held_out else None,
            "seed": self.seed,
        }


def split_training_images(
    batches: Iterable[tuple[np.ndarray, np.ndarray]],
    calib_samples: int,
    held_out_samples: int,
    *,
    seed: int | None,
) -> CalibrationData:
    """Cut the first calib_samples + held_out_samples (image, label) pairs of `batches` in two.

    With fewer images than asked, the held-out part gets at most half of them and calibration
    the rest, so both parts are non-empty whenever a held-out part was asked for and two images exist.
    """
    if calib_samples < 1 or held_out_samples < 0:
        raise UsageError(
            f"calibration needs >= 1 image and >= 0 held out, got {calib_samples}, {held_out_samples}"
        )
    wanted = calib_samples + held_out_samples
    taken: list[np.ndarray] = []
    labels: list[np.ndarray] = []
    count = 0
    for images_batch, labels_batch in batches:
        if count >= wanted:
            break
        part = np.asarray(images_batch, dtype=np.float32)[: wanted - count]
        taken.append(part)
        labels.append(np.asarray(labels_batch, dtype=np.int64)[: len(part)])
        count += len(part)
    if count == 0:
        raise UsageError("int8 calibration found no training images")
    images, all_labels = np.concatenate(taken), np.concatenate(labels)
    held = held_out_samples if count >= wanted else min(held_out_samples, count // 2)
    calibrate = min(calib_samples, count - held)
    return CalibrationData(
        calibration=_batched(images[:calibrate], len(taken[0])),
        held_out=_batched(images[calibrate : calibrate + held], len(taken[0])),
        held_out_labels=all_labels[calibrate : calibrate + held],
        seed=seed,
    )


def _batched(images: np.ndarray, size: int) -> list[np.ndarray]:
    return [images[i : i + size] for i in range(0, len(images), size)]


@dataclass(frozen=True)
class MethodScore:
    """How a calibration method's int8 file did against fp32 on the held-out training images."""

    method: str
    agreement: float  # top-1 agreement with the fp32 file
    logit_rel_l2: float  # ||int8 - fp32|| / ||fp32|| of the logits
    images: int | None = None  # the held-out images it was scored on (fewer: it dropped out of the race)

    def as_dict(self) -> dict[str, float | int | None]:
        """A JSON-ready form for the manifest."""
        return {"top1_agreement": self.agreement, "logit_rel_l2": self.logit_rel_l2, "images": self.images}


def score(
    path: str | os.PathLike[str], reference: np.ndarray, held_out: Sequence[np.ndarray], method: str
) -> MethodScore:
    """Score the int8 file at `path` against the fp32 `reference` logits of `held_out`."""
    logits = run_onnx(path, held_out).astype(np.float64)
    ref = reference.astype(np.float64)
    return MethodScore(
        method,
        float(np.mean(logits.argmax(1) == ref.argmax(1))),
        float(np.linalg.norm(logits - ref)) / max(float(np.linalg.norm(ref)), 1e-12),
    )


def race(
    candidates: Mapping[str, Path], reference: np.ndarray, held_out: Sequence[np.ndarray], device: str = "cpu"
) -> list[MethodScore]:
    """Score each candidate int8 file against the fp32 `reference` logits of `held_out`, dropping a
    candidate as soon as it is clearly behind.

    The batches run in turn on every candidate still in the race. After each batch, once
    RACE_MIN_IMAGES images are in, every candidate is compared with the leader (the smallest sum of
    squared logit errors so far, the order `best_method` ranks by): per image, its squared error
    minus the leader's, on the same images. A candidate whose mean difference is above 0 beyond
    RACE_CONFIDENCE (export.race.clearly_above) drops out: the full race would almost surely rank it behind.
    Returns every candidate's score over the images it ran on (`images`); the ones that finished
    ran on all of them, and `best_method` of those is the full race's choice unless a dropped
    candidate's 0.1% chance of coming back came true. The candidates run on `device`
    (export.check.open_check_session).
    """
    ref = reference.astype(np.float64)
    sessions = {method: open_check_session(path, device) for method, path in candidates.items()}
    errors: dict[str, list[np.ndarray]] = {method: [] for method in candidates}
    agreements: dict[str, list[np.ndarray]] = {method: [] for method in candidates}
    running = list(candidates)
    seen = 0
    for batch in held_out:
        batch_ref = ref[seen : seen + len(batch)]
        for method in running:
            session = sessions[method]
            logits = np.asarray(session.run(None, {session.get_inputs()[0].name: batch})[0], dtype=np.float64)
            errors[method].append(np.sum((logits - batch_ref) ** 2, axis=1))
            agreements[method].append(logits.argmax(1) == batch_ref.argmax(1))
        seen += len(batch)
        if seen >= RACE_MIN_IMAGES and seen < len(ref):
            so_far = {method: np.concatenate(errors[method]) for method in running}
            leader = min(running, key=lambda m: (float(so_far[m].sum()), CALIBRATION_METHODS.index(m)))
            running = [m for m in running if not clearly_above(so_far[m] - so_far[leader])]
    scores = []
    for method in candidates:
        squared = np.concatenate(errors[method])
        count = len(squared)
        scale = max(float(np.linalg.norm(ref[:count])), 1e-12)
        agreement = float(np.mean(np.concatenate(agreements[method])))
        scores.append(MethodScore(method, agreement, float(np.sqrt(squared.sum())) / scale, count))
    return scores


def quantize_calibrated(
    fp32_path: str | os.PathLike[str],
    dst: str | os.PathLike[str],
    data: CalibrationData,
    *,
    flavour: str,
    method: str = AUTO,
    max_top1_drop: float | None = None,
    held_out_reference: np.ndarray | None = None,
    statistics: ActivationStatistics | None = None,
    clock: StageClock = untimed,
    device: str = "cpu",
) -> dict[str, Any]:
    """Write the int8 `flavour` of `fp32_path` to `dst`, with `method` or, for "auto", the best one.

    With `max_top1_drop` (points), the most sensitive layers stay in float until the drop on the
    held-out training images is within it (export.mixed_precision). Returns the manifest's
    description of the file, with the candidates' scores under calibration.selection when the
    method was chosen and the search under mixed_precision.

    `held_out_reference` is the fp32 file's logits on `data.held_out` (run_onnx), which every
    candidate's score and the mixed-precision search compare against: an export of several int8
    flavours computes it once and passes it to each; None computes it here, once for this file.
    `statistics` are `data.calibration`'s ActivationStatistics of `fp32_path`: one pass over the
    calibration images that every method and flavour reads; None collects them here for this file.
    `clock` times the stages: "calibration statistics" (that pass, where it runs here),
    "calibrate <method>" (the method's ranges, and for "auto" writing that candidate), "score race"
    (the candidates on the held-out images, `race`), then "mixed-precision" (the search and the
    final write) or "quantize" (the write without a budget). The fp32 file, the candidates and the
    search's files run on `device` (export.check.run_onnx; the ONNX Runtime CPU flavour on the CPU).
    """
    if method not in METHOD_CHOICES:
        raise UsageError(f"--calib-method {method!r}: expected one of {', '.join(METHOD_CHOICES)}")
    if (method == AUTO or max_top1_drop is not None) and not data.held_out:
        raise UsageError(
            "--calib-method auto and --max-top1-drop-int8 need held-out training images; none were left"
        )
    record = data.describe()
    if held_out_reference is None and data.held_out:
        with clock("fp32 reference"):
            held_out_reference = run_onnx(fp32_path, data.held_out, device)
    with contextlib.ExitStack() as stack:
        if statistics is None:
            statistics = stack.enter_context(ActivationStatistics(fp32_path, data.calibration))
            with clock("calibration statistics"):
                statistics.collect()
        if method == AUTO:
            assert held_out_reference is not None  # held-out images exist: checked above
            quantizer = _best_quantizer(
                stack, fp32_path, data, flavour, record, held_out_reference, statistics, clock, device
            )
        else:
            with clock(f"calibrate {method}"):
                quantizer = stack.enter_context(
                    Int8Quantizer(
                        fp32_path, data.calibration, flavour=flavour, method=method, statistics=statistics
                    )
                )
                quantizer.calibrate()
        if max_top1_drop is None:
            with clock("quantize"):
                return quantizer.write(dst, calibration_record=record)
        with clock("mixed-precision"):
            description, _ = fit_budget(
                quantizer,
                fp32_path,
                dst,
                data.held_out,
                data.held_out_labels,
                budget=max_top1_drop,
                calibration_record=record,
                reference=held_out_reference,
                device=device,
            )
        return description


SELECTED_BY = "relative L2 error of the logits against fp32 on the held-out training images"


def best_method(scores: Sequence[MethodScore]) -> MethodScore:
    """The calibration `--calib-method auto` keeps: the smallest relative L2 error of the logits on
    the held-out images; top-1 agreement, then CALIBRATION_METHODS order, break ties. (Agreement on
    1,000 images flips with batching noise; the L2 error does not.)"""
    return min(scores, key=lambda s: (s.logit_rel_l2, -s.agreement, CALIBRATION_METHODS.index(s.method)))


def _best_quantizer(
    stack: contextlib.ExitStack[Any],
    fp32_path: str | os.PathLike[str],
    data: CalibrationData,
    flavour: str,
    record: dict[str, Any],
    reference: np.ndarray,
    statistics: ActivationStatistics,
    clock: StageClock,
    device: str,
) -> Int8Quantizer:
    """Quantize with every method, race them against the fp32 `reference` logits of the held-out
    images (`race`, on `device`), record the scores in `record`, and return the quantizer of the
    best method that finished (kept open on `stack`)."""
    tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="reviewkd-calib-")))
    # The first DEFAULT_HELD_OUT held-out images score; the rest are there for the budget's interval.
    scoring = first_images(data.held_out, DEFAULT_HELD_OUT)
    reference = reference[: sum(len(b) for b in scoring)]
    quantizers: dict[str, Int8Quantizer] = {}
    for candidate in CALIBRATION_METHODS:
        with clock(f"calibrate {candidate}"):
            quantizer = stack.enter_context(
                Int8Quantizer(
                    fp32_path, data.calibration, flavour=flavour, method=candidate, statistics=statistics
                )
            )
            quantizers[candidate] = quantizer
            quantizer.write(tmp / f"{candidate}.onnx")
    with clock("score race"):
        scores = race({m: tmp / f"{m}.onnx" for m in CALIBRATION_METHODS}, reference, scoring, device)
    finished = [s for s in scores if s.images == len(reference)]
    best = best_method(finished)
    record["selected_by"] = SELECTED_BY
    record["selection"] = {s.method: s.as_dict() for s in scores}
    return quantizers[best.method]
