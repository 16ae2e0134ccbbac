"""validate and bench for a detection run: every exported file with ONNX Runtime, as deployed.

validate: each ONNX file of the run (kind "onnx") and each TensorRT engine (kind "tensorrt", through
deploy's TensorRT runner, its four outputs read by name; "skipped" with the reason where TensorRT or
a GPU is missing) runs on every image of the validation split; its
COCO mAP@[.5:.95], AP50 and per-class AP (pycocotools), and, against the fp32 file, its mAP drop
with the paired image-level bootstrap 95% interval and the detection gates (deploy.gates'
DETECTION_GATES through the task registry). Where torch is installed the torch student runs too and
the fp32 file's box parity against it is gated (min_box_parity). The report's example grid is chosen
from every image's detections (benchmarks.report.detection.choose_examples). Written to
RUN/report/validate.json.

bench: for each file and batch size, the latency of one batch in three parts: pre-processing (the
image files decoded and laid out as the file takes them), the model (one ONNX Runtime call: network,
box decoding and NMS, all inside the file) and post-processing (the padded outputs checked and cut
into per-image detections, deploy.detection.outputs). With a pair of formats to compare, only those
two, interleaved, through benchmarks.latency.compare_targets as for a classifier. Merged into
RUN/report/bench.json.
"""

from __future__ import annotations

import functools
import math
import os
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.environment import collect_environment, machine_text
from benchmarks.latency import (
    BENCH_SCHEMA_VERSION,
    Workload,
    check_settings,
    compare_targets,
    compared_pair,
    latency_stats,
)
from benchmarks.measured import SOURCE_RUN_SPLIT, manifest_student_sha256, measured_block
from benchmarks.report.detection import (
    EXAMPLE_MODELS,
    INT8,
    TEACHER,
    choose_examples,
    class_accuracy,
    examples_block,
)
from benchmarks.report.results import report_dir, saved_with_notes
from benchmarks.targets import Target
from benchmarks.validate import VALIDATE_SCHEMA_VERSION
from deploy import run_layout
from deploy.detection.annotations import ImageAnnotation, read_coco
from deploy.detection.bootstrap import ImageMatches, map_drop, match_images
from deploy.detection.coco_metric import Detections as CocoDetections
from deploy.detection.coco_metric import coco_metrics
from deploy.detection.images import image_batches, read_image
from deploy.detection.onnx_run import DetectionSession
from deploy.detection.outputs import Detections, decode_outputs
from deploy.detection.parity import box_parity
from deploy.errors import GateFailedError, MissingDependencyError, UsageError
from deploy.fileio import write_json_atomic
from deploy.formats import ONNX_FORMATS
from deploy.gates import GateTable, describe_check, evaluate_gates, gates_for
from deploy.manifest import Manifest, artifacts_of_kind, input_spec, read_manifest, verify_artifact
from deploy.optional import installed, optional_import
from deploy.predict import pad_to_min_batch
from deploy.run_lock import locks_run
from deploy.runners import open_runner
from deploy.runners.base import Runner
from deploy.tasks import DETECTION, TASKS

FP32_KEY = "onnxruntime/fp32"
TORCH_KEY = "torch/fp32"
DEFAULT_BATCH = 16
DEFAULT_BENCH_BATCHES = (1, 8, 32)
DEFAULT_BENCH_SECONDS = 2.0


def _coco(found: Sequence[Detections]) -> list[CocoDetections]:
    return [CocoDetections(f.boxes, f.scores, f.classes) for f in found]


def _validation_file(run: Path, manifest: Manifest) -> Path:
    """The COCO file of the run's held-out images: the test split where data.val_split carved the val
    split from the training images, else val."""
    data = manifest.get("data") or {}
    key = "test" if data.get("test") else "val"
    source = data.get(key)
    if not isinstance(source, str) or not Path(source).is_file():
        raise UsageError(
            f"{run / run_layout.MANIFEST}: data.{key} names no readable COCO annotation file ({source!r})"
        )
    return Path(source)


def validation_records(run: Path, manifest: Manifest, limit: int | None = None) -> list[ImageAnnotation]:
    """The run's held-out images with their boxes, read from the COCO file its manifest names
    (`_validation_file`)."""
    source = _validation_file(run, manifest)
    records = list(read_coco(source).images)
    if not records:
        raise UsageError(f"{source}: no validation images")
    return records[:limit] if limit else records


def _run_inputs(
    run: Path, limit: int | None
) -> tuple[Manifest, tuple[int, int], int, Path, list[ImageAnnotation]]:
    """What validate and bench read of a detection run: its manifest, the network's (H, W), the class
    count, the annotation file of its held-out split and that split's records (`limit` of them)."""
    manifest = read_manifest(run)
    spec = input_spec(manifest)
    records = validation_records(run, manifest, limit)
    size = (spec.shape[1], spec.shape[2])
    return manifest, size, len(manifest["classes"]), _validation_file(run, manifest), records


def onnx_files(run: Path, manifest: Manifest) -> dict[str, str]:
    """Report key ("onnxruntime/<precision label>") -> run-relative path of each ONNX file, fp32 first."""
    keys = {}
    for rel, entry in artifacts_of_kind(manifest, "onnx").items():
        label = next((f.name for f in ONNX_FORMATS.values() if f.file == rel), None)
        precision = "fp32" if label == "onnx" else (label or entry.get("precision", "fp32"))
        keys[f"onnxruntime/{precision}"] = rel
    if FP32_KEY not in keys:
        raise UsageError(f"{run}: no fp32 ONNX file; run reviewkd export first")
    return {FP32_KEY: keys.pop(FP32_KEY), **keys}


def engine_files(manifest: Manifest) -> dict[str, str]:
    """Report key ("tensorrt/<precision>") -> run-relative path of each TensorRT engine."""
    return {
        f"tensorrt/{entry.get('precision', 'fp32')}": rel
        for rel, entry in artifacts_of_kind(manifest, "tensorrt").items()
    }


class RunnerDetections:
    """A detection file run through deploy's runner (a TensorRT engine): the four outputs by name,
    each batch cut to the runner's largest and padded to its smallest, the padding dropped."""

    def __init__(self, runner: Runner, num_classes: int) -> None:
        self.runner, self.num_classes = runner, num_classes

    def raw(self, images: np.ndarray) -> dict[str, np.ndarray]:
        """The four outputs of `images` [B, 3, H, W], by name, one row per image."""
        chunk = self.runner.max_batch or len(images)
        parts = []
        for start in range(0, len(images), chunk):
            padded, count = pad_to_min_batch(self.runner, images[start : start + chunk])
            parts.append({name: value[:count] for name, value in self.runner.infer_outputs(padded).items()})
        return {name: np.concatenate([part[name] for part in parts]) for name in parts[0]}

    def detect(self, images: np.ndarray) -> list[Detections]:
        """Each image's detections for one batch."""
        return decode_outputs(self.raw(images), self.runner.name, self.num_classes)

    def close(self) -> None:
        self.runner.close()


def _open_engine(run: Path, manifest: Manifest, rel: str, classes: int) -> RunnerDetections | str:
    """The engine at `rel` opened for detection, or why it cannot run here (TensorRT or a GPU missing)."""
    try:
        runner = open_runner(run / rel, manifest=manifest, run_dir=run)
    except MissingDependencyError as exc:
        return str(exc)
    return RunnerDetections(runner, classes)


def _file_fields(manifest: Manifest, key: str, rel: str) -> dict[str, Any]:
    """What a result entry says of the file it measured, as the report reads it (backend, file,
    precision, size) and its sha256, by which the report refuses numbers of a file changed since."""
    artifact = manifest["artifacts"][rel]
    return {
        "backend": key.partition("/")[0],
        "file": rel,
        "sha256": artifact.get("sha256"),
        "precision": artifact.get("precision", "fp32"),
        "size_bytes": artifact.get("size_bytes"),
    }


def _torch_detections(run: Path, manifest: Manifest, batches: Sequence[np.ndarray]) -> list[Detections]:
    with optional_import("box parity against the torch student"):
        from reviewkd.detection.inference import load_run_detector, torch_detections

    return torch_detections(load_run_detector(run, manifest), batches)


def _teacher_detections(
    run: Path, manifest: Manifest, batches: Sequence[np.ndarray]
) -> list[Detections] | None:
    """The teacher's detections on `batches` where torch and the run's teacher are here, else None."""
    if not installed("torch"):
        return None
    with optional_import("the teacher's example detections"):
        from reviewkd.detection.inference import load_run_teacher, torch_detections

    teacher = load_run_teacher(run, manifest)
    return torch_detections(teacher, batches) if teacher is not None else None


def _examples(
    run: Path,
    manifest: Manifest,
    records: Sequence[ImageAnnotation],
    found: Mapping[str, Sequence[Detections]],
    fp32_truth: ImageMatches,
) -> dict[str, Any]:
    """The report's example grid (benchmarks.report.detection.examples_block): the images
    choose_examples picks from every image's fp32 and int8 detections and the fp32 file's matches to
    the ground truth (`fp32_truth`), with the teacher's detections (where it can run here) and each
    shown format's."""
    spec = input_spec(manifest)
    chosen = choose_examples(fp32_truth, found[FP32_KEY], found.get(INT8))
    shown = [records[example.index] for example in chosen]
    models = {
        key: [found[key][example.index] for example in chosen] for key in EXAMPLE_MODELS if key in found
    }
    size = (spec.shape[1], spec.shape[2])
    teacher = _teacher_detections(run, manifest, [np.stack([read_image(r, size) for r in shown])])
    if teacher is not None:
        models = {TEACHER: teacher, **models}
    sizes = [(record.width, record.height) for record in shown]
    reasons = [example.reason for example in chosen]
    return examples_block([record.file for record in shown], sizes, spec, models, reasons)


@locks_run("validate")
def validate_detection_run(
    run_dir: str | os.PathLike[str],
    *,
    threads: int | None = None,
    batch_size: int = DEFAULT_BATCH,
    limit: int | None = None,
    gates: GateTable | None = None,
    inconclusive_passes: bool = True,
) -> dict[str, Any]:
    """Validate every ONNX file of a detection run (module docstring); save and return the result.
    Does not raise on a failed gate: `raise_for_detection_gates` does."""
    run = Path(run_dir)
    manifest, size, classes, source_file, records = _run_inputs(run, limit)
    gate_table = gates if gates is not None else TASKS[DETECTION].gates
    batches = list(image_batches(records, size, batch_size))
    files = onnx_files(run, manifest)
    found: dict[str, list[Detections]] = {}
    for key, rel in files.items():
        session = DetectionSession(verify_artifact(run, manifest, rel), classes, threads=threads)
        found[key] = [d for batch in batches for d in session.detect(batch)]
    results: dict[str, Any] = {}
    for key, rel in engine_files(manifest).items():
        files[key] = rel
        engine = _open_engine(run, manifest, rel, classes)
        if isinstance(engine, str):
            results[key] = {**_file_fields(manifest, key, rel), "status": "skipped", "reason": engine}
            continue
        try:
            found[key] = [d for batch in batches for d in engine.detect(batch)]
        finally:
            engine.close()
    reference = match_images(records, found[FP32_KEY], classes)
    for key, dets in found.items():
        coco = coco_metrics(records, _coco(dets), classes)
        accuracy: dict[str, Any] = {
            "map": 100 * coco.map,
            "ap50": 100 * coco.ap50,
            "n": len(records),
            **class_accuracy(coco),
        }
        if key != FP32_KEY:
            accuracy.update(map_drop(reference, match_images(records, dets, classes)).as_dict())
        results[key] = {**_file_fields(manifest, key, files[key]), "status": "ok", "accuracy": accuracy}
    if installed("torch"):
        torch_found = _torch_detections(run, manifest, batches)
        parity = box_parity(torch_found, found[FP32_KEY])
        torch_coco = coco_metrics(records, _coco(torch_found), classes)
        results[FP32_KEY]["parity"] = {"box_matched": 100 * parity.matched_fraction, **parity.as_dict()}
        results[TORCH_KEY] = {
            **_file_fields(manifest, TORCH_KEY, run_layout.STUDENT_WEIGHTS),
            "precision": "fp32",
            "status": "ok",
            "accuracy": {"map": 100 * torch_coco.map, "ap50": 100 * torch_coco.ap50, "n": len(records)},
        }
    failures = []
    for key, entry in results.items():
        if key == TORCH_KEY or entry["status"] != "ok":
            continue
        own = gates_for(gate_table, entry["precision"])
        if key == FP32_KEY and "parity" not in entry:
            own.pop("min_box_parity", None)  # no torch here to hold the fp32 file to
        entry["gates"] = evaluate_gates(entry, own, inconclusive_passes=inconclusive_passes)
        failures += [
            f"{key}: {c['gate']} ({c.get('reason') or c['value']})" for c in entry["gates"] if not c["passed"]
        ]
    source = {
        "kind": SOURCE_RUN_SPLIT,
        "path": str(source_file.resolve()),
        "dataset": (manifest.get("data") or {}).get("dataset"),
        "images": len(records),
        "limit": limit,
    }
    result = {
        "schema_version": VALIDATE_SCHEMA_VERSION,
        "task": DETECTION,
        "reference": FP32_KEY,
        "images": len(records),
        "results": results,
        "failures": failures,
        "passed": not failures,
        "examples": _examples(run, manifest, records, found, reference),
        "settings": {"threads": threads, "batch_size": batch_size, "limit": limit},
        "environment": collect_environment(threads),
        "measured": measured_block(source, FP32_KEY, manifest_student_sha256(manifest)),
    }
    write_json_atomic(report_dir(run) / run_layout.VALIDATE_FILE, result)
    return result


def raise_for_detection_gates(result: Mapping[str, Any]) -> None:
    """GateFailedError listing the failed gates of a detection validate result."""
    if result["failures"]:
        raise GateFailedError(f"detection gates failed: {'; '.join(result['failures'])}")


def _timed(call: Any) -> tuple[Any, float]:
    start = time.perf_counter()
    value = call()
    return value, 1000 * (time.perf_counter() - start)


def _targets(run: Path, manifest: Manifest, threads: int | None) -> dict[str, Target]:
    """Every file of the run as a target of benchmarks.latency, opened by deploy's runner (the ONNX
    files with ONNX Runtime on the CPU, the engines with TensorRT), keyed as bench.json keys them."""
    targets = {}
    for key, rel in {**onnx_files(run, manifest), **engine_files(manifest)}.items():
        artifact = manifest["artifacts"][rel]
        opener = functools.partial(open_runner, run / rel, manifest=manifest, run_dir=run, threads=threads)
        targets[key] = Target(
            key,
            artifact.get("precision", "fp32"),
            opener,
            file=rel,
            size_bytes=artifact.get("size_bytes"),
            sha256=artifact.get("sha256"),
        )
    return targets


def detection_workload(records: Sequence[ImageAnnotation], size: tuple[int, int], classes: int) -> Workload:
    """What `bench --compare` times of a detection file: one call of the file (network, box decoding
    and NMS, all inside it) and its outputs cut into per-image detections, on the validation split's
    images cycled to fill the batch (NMS's work depends on what the images hold, so not random
    inputs). Pre-processing, the same for both formats, is done before the pairs."""

    def images(batch_size: int, input_shape: Sequence[int], rng: np.random.Generator) -> np.ndarray:
        return np.stack([read_image(records[i % len(records)], size) for i in range(batch_size)])

    def detect(runner: Runner, batch: np.ndarray) -> list[Detections]:
        return decode_outputs(runner.infer_outputs(batch), runner.name, classes)

    return Workload("the validation split's images, cycled to fill each batch", images, detect)


@locks_run("bench")
def bench_detection_run(
    run_dir: str | os.PathLike[str],
    *,
    threads: int | None = None,
    batch_sizes: Sequence[int] = DEFAULT_BENCH_BATCHES,
    seconds: float | None = None,
    iters: int | None = None,
    warmup: int = 3,
    compare: tuple[str, str] | None = None,
) -> dict[str, Any]:
    """Time every file of a detection run per batch size, pre/model/post apart (module docstring),
    for `iters` calls or about `seconds` each (DEFAULT_BENCH_SECONDS where neither is given) after
    `warmup` calls; save it into RUN/report/bench.json (benchmarks.report.save_result: formats not
    timed now keep their earlier numbers) and return it with the merge's notes.

    compare: two format keys (A, B): time only those two, interleaved in pairs, with
    benchmarks.latency.compare_targets as for a classifier (`detection_workload`: NMS and decoding
    included; `iters` counts pairs, `seconds` is both together, DEFAULT_SECONDS where neither is given),
    recorded under "comparisons" ("A,B"). A key the run does not have is a UsageError."""
    check_settings(warmup, iters, seconds)
    if not batch_sizes or min(batch_sizes) < 1:
        raise UsageError("bench: batch sizes must be >= 1")
    run = Path(run_dir)
    manifest, size, classes, source_file, records = _run_inputs(run, None)
    pair = None if compare is None else compared_pair(_targets(run, manifest, threads), compare, run)
    budget = DEFAULT_BENCH_SECONDS if seconds is None else seconds
    results: dict[str, Any] = {}
    files = {} if pair is not None else {**onnx_files(run, manifest), **engine_files(manifest)}
    for key, rel in files.items():
        path = verify_artifact(run, manifest, rel)
        session: DetectionSession | RunnerDetections
        if key in engine_files(manifest):
            engine = _open_engine(run, manifest, rel, classes)
            if isinstance(engine, str):
                results[key] = {**_file_fields(manifest, key, rel), "status": "skipped", "reason": engine}
                continue
            session = engine
        else:
            session = DetectionSession(path, classes, threads=threads)
        latency: dict[str, Any] = {}
        for batch in batch_sizes:
            chosen = [records[i % len(records)] for i in range(batch)]
            parts: dict[str, list[float]] = {"pre": [], "model": [], "post": [], "total": []}
            # `iters` timed calls, or at least 5 and until the budget is spent
            least = warmup + (iters if iters is not None else 5)
            calls, end = 0, math.inf if warmup else time.perf_counter() + budget
            while calls < least or (iters is None and time.perf_counter() < end):
                images, pre = _timed(lambda: np.stack([read_image(r, size) for r in chosen]))  # noqa: B023
                outputs, model = _timed(lambda: session.raw(images))  # noqa: B023
                _, post = _timed(lambda: decode_outputs(outputs, str(path), classes))  # noqa: B023
                calls += 1
                if calls == warmup:
                    end = time.perf_counter() + budget
                if calls <= warmup:
                    continue
                for name, value in (
                    ("pre", pre),
                    ("model", model),
                    ("post", post),
                    ("total", pre + model + post),
                ):
                    parts[name].append(value)
            latency[str(batch)] = {
                **latency_stats(parts["total"], batch),
                "parts_p50_ms": {name: float(np.median(parts[name])) for name in ("pre", "model", "post")},
            }
        if isinstance(session, RunnerDetections):
            session.close()
        results[key] = {**_file_fields(manifest, key, rel), "status": "ok", "latency": latency}
    result: dict[str, Any] = {
        "schema_version": BENCH_SCHEMA_VERSION,
        "task": DETECTION,
        "results": results,
        "settings": {
            "threads": threads,
            "batch_sizes": list(batch_sizes),
            "seconds": None if iters is not None else budget,
            "iters": iters,
            "warmup": warmup,
        },
        "environment": collect_environment(threads),
        # The images timed are the validation split's, cycled to fill each batch.
        "measured": measured_block(
            {"kind": SOURCE_RUN_SPLIT, "path": str(source_file.resolve()), "images": None},
            None,
            manifest_student_sha256(manifest),
        ),
    }
    if pair is not None:
        comparison = compare_targets(
            *pair,
            batch_sizes,
            warmup=warmup,
            iters=iters,
            seconds=seconds,
            workload=detection_workload(records, size, classes),
        )
        # Named like a classifier's comparison, so that comparisons from two machines stay told apart.
        comparison["machine"] = machine_text(result["environment"])
        result["comparisons"] = {f"{pair[0].key},{pair[1].key}": comparison}
    return saved_with_notes(run, run_layout.BENCH_FILE, result)


def validate_lines(result: Mapping[str, Any]) -> list[str]:
    """One line per file of a detection validate result: mAP, AP50, the drop and each gate."""
    lines = []
    for key, entry in result["results"].items():
        if entry["status"] != "ok":
            lines.append(f"{key:<22} {entry['status']}: {entry.get('reason', '')}")
            continue
        accuracy = entry["accuracy"]
        line = f"{key:<22} mAP {accuracy['map']:6.2f}"
        if "ap50" in accuracy:
            line += f"  AP50 {accuracy['ap50']:6.2f}"
        if "map_drop" in accuracy:
            low, high = accuracy["map_drop_interval"]
            line += f"  drop {accuracy['map_drop']:.2f} [{low:.2f}, {high:.2f}]"
        if "parity" in entry:
            line += f"  boxes matched to torch {entry['parity']['box_matched']:.2f}%"
        lines.append(line)
        lines += [f"{'':<22} {describe_check(check)}" for check in entry.get("gates", [])]
    return lines
