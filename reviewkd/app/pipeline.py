"""The pipeline of `reviewkd run`: teacher, distill, export, validate, bench and report as stages.

Each stage records what it read and wrote (paths and sha256) in RUN/pipeline.json. With --resume a
stage is skipped when every output it recorded is still there with the same sha256 and its inputs
have not changed since; otherwise it runs again (training stages continue from their checkpoints).
A stage that fails stops the run, names the stage, and leaves what the earlier stages wrote.
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from benchmarks.runs import bench_run, report_run, validate_run
from benchmarks.tasks import OWN_EVALUATION
from benchmarks.validate import raise_for_gates
from deploy import run_layout
from deploy.errors import ReviewKDError, UsageError
from deploy.fileio import parse_json, sha256_file, write_json_atomic
from deploy.manifest import read_manifest, write_manifest
from deploy.optional import optional_import
from deploy.run_lock import locks_run
from export.pipeline import export_run
from reviewkd.config import Config, dump_config

PIPELINE_FILE = run_layout.PIPELINE
BASELINE_DIR = run_layout.BASELINE_DIR
STAGES = ("distill", "baseline", "export", "validate", "bench", "report")


class StageFailedError(ReviewKDError):
    """A pipeline stage failed; carries the stage's own exit code."""

    def __init__(self, stage: str, cause: BaseException) -> None:
        super().__init__(f"stage '{stage}' failed: {cause}")
        self.exit_code = cause.exit_code if isinstance(cause, ReviewKDError) else 1


@dataclasses.dataclass(frozen=True)
class Stage:
    """One step of the pipeline: what it runs and which run-relative files it reads and writes."""

    name: str
    action: Callable[[], None]
    inputs: Callable[[], list[str]]
    outputs: Callable[[], list[str]]
    settings: str = ""  # what else the outputs depend on (the resolved config); a change reruns the stage


def _hashes(run: Path, relpaths: Sequence[str]) -> dict[str, str | None]:
    return {rel: sha256_file(run / rel) if (run / rel).is_file() else None for rel in relpaths}


def _read_pipeline(run: Path) -> dict[str, Any]:
    path = run / PIPELINE_FILE
    if not path.is_file():
        return {}
    try:
        data = parse_json(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise UsageError(
            f"{path}: unreadable pipeline record ({exc}); delete it to rerun every stage"
        ) from exc
    return data if isinstance(data, dict) else {}


def _inputs_record(run: Path, stage: Stage) -> dict[str, Any]:
    return {"files": _hashes(run, stage.inputs()), "settings": stage.settings}


def stage_is_complete(run: Path, record: dict[str, Any] | None, stage: Stage) -> bool:
    """Whether a recorded stage's outputs all verify by sha256 and its inputs are unchanged."""
    if not record or not record.get("outputs"):
        return False
    outputs_now = _hashes(run, list(record["outputs"]))
    if any(digest is None for digest in outputs_now.values()) or outputs_now != record["outputs"]:
        return False
    return _inputs_record(run, stage) == record.get("inputs")


def run_stages(run: Path, stages: Sequence[Stage], resume: bool, log: Callable[[str], None] = print) -> None:
    """Run `stages` in order, skipping complete ones on resume and recording each in pipeline.json."""
    pipeline = _read_pipeline(run) if resume else {}
    for stage in stages:
        if resume and stage_is_complete(run, pipeline.get(stage.name), stage):
            log(f"== {stage.name}: complete and verified, skipped")
            continue
        log(f"== {stage.name}")
        started = time.perf_counter()
        try:
            stage.action()
        except (ReviewKDError, OSError, RuntimeError, ValueError) as exc:
            raise StageFailedError(stage.name, exc) from exc
        pipeline[stage.name] = {
            "inputs": _inputs_record(run, stage),
            "outputs": _hashes(run, stage.outputs()),
            "seconds": round(time.perf_counter() - started, 2),
        }
        write_json_atomic(run / PIPELINE_FILE, pipeline)
        log(f"   {stage.name} done in {pipeline[stage.name]['seconds']:.1f} s")


def _artifact_paths(run: Path, kinds: Sequence[str]) -> list[str]:
    if not run_layout.run_path(run, run_layout.MANIFEST).is_file():
        return []
    artifacts = read_manifest(run).get("artifacts", {})
    return sorted(rel for rel, entry in artifacts.items() if entry["kind"] in kinds)


@dataclasses.dataclass(frozen=True)
class PipelineOptions:
    """What `reviewkd run` lets the user set beyond the config."""

    baseline: bool = True  # also train the cross-entropy student the report compares against
    threads: int | None = None  # CPU threads for validate and bench
    batch_sizes: tuple[int, ...] = (1, 8, 32)  # bench batch sizes
    bench_seconds: float = 1.0  # timing per format and batch size


def build_stages(config: Config, run: Path, options: PipelineOptions) -> list[Stage]:
    """The pipeline's stages for `config` writing into `run`: training by config.task's TrainingTask,
    then export, validate and bench where the task has them (deploy.tasks: TaskSpec.is_ready), and
    the report of what they measured."""
    with optional_import("training"):
        from reviewkd.tasks import training_task

    task = training_task(config)
    spec = task.spec

    def train_student() -> None:
        resume = run_layout.run_path(run, run_layout.CHECKPOINT).is_file()
        task.distill(config, run, resume=resume)

    def train_baseline() -> None:
        baseline_dir = run / BASELINE_DIR
        method = dataclasses.replace(config.method, name=spec.baseline_method)
        baseline = dataclasses.replace(config, method=method)
        baseline = dataclasses.replace(
            baseline, output=dataclasses.replace(config.output, dir=str(baseline_dir))
        )
        resume = run_layout.run_path(baseline_dir, run_layout.CHECKPOINT).is_file()
        task.distill(baseline, baseline_dir, resume=resume)
        scores = read_manifest(baseline_dir)["student"]
        manifest = read_manifest(run)
        manifest["baselines"] = {
            spec.baseline_method: {
                **{key: scores[key] for key, _ in spec.model_metrics},
                **({"test": scores["test"]} if "test" in scores else {}),  # data.val_split
                "run": BASELINE_DIR,
                "sha256": scores["sha256"],
            }
        }
        write_manifest(run, manifest)

    def export() -> None:
        summary = export_run(run, log=lambda line: print(f"   {line}", flush=True))
        summary.raise_for_status()

    own = OWN_EVALUATION.get(spec.name)  # a task whose validate and bench are its own

    def validate() -> None:
        if own is not None:
            own.raise_for_gates(own.validate(run, threads=options.threads))
            return
        result = validate_run(run, threads=options.threads)
        raise_for_gates(result)

    def bench() -> None:
        measure = own.bench if own is not None else bench_run
        measure(run, threads=options.threads, batch_sizes=options.batch_sizes, seconds=options.bench_seconds)

    def report() -> None:
        report_run(run)

    student = [run_layout.STUDENT_WEIGHTS]
    exported = lambda: _artifact_paths(run, ("onnx", "tensorrt"))  # noqa: E731 - read when the stage runs
    settings = dump_config(config)
    stages = [Stage("distill", train_student, lambda: [], lambda: student, settings)]
    if options.baseline:
        stages.append(
            Stage(
                "baseline",
                train_baseline,
                lambda: [],
                lambda: [f"{BASELINE_DIR}/{run_layout.STUDENT_WEIGHTS}"],
                settings,
            )
        )
    deployment = [
        Stage("export", export, lambda: student, exported),
        Stage("validate", validate, lambda: student + exported(), lambda: [run_layout.VALIDATE_RESULT]),
        Stage("bench", bench, lambda: student + exported(), lambda: [run_layout.BENCH_RESULT]),
    ]
    stages += [
        *(stage for stage in deployment if spec.is_ready(stage.name)),
        Stage(
            "report",
            report,
            # The baseline's metrics feed the report's student-vs-baseline curves.
            lambda: [
                run_layout.VALIDATE_RESULT,
                run_layout.BENCH_RESULT,
                run_layout.METRICS,
                f"{BASELINE_DIR}/{run_layout.METRICS}",
            ],
            lambda: [run_layout.REPORT_JSON, run_layout.REPORT_MARKDOWN, run_layout.REPORT_HTML],
        ),
    ]
    return stages


@locks_run("run", run_arg="run", create=True)
def run_pipeline(config: Config, run: Path, options: PipelineOptions, resume: bool = False) -> dict[str, Any]:
    """Run every stage into `run` (skipping verified ones on resume); return report.json's content.

    UsageError if `run` already holds a pipeline run and `resume` is False.
    """
    if not resume and run_layout.run_path(run, PIPELINE_FILE).exists():
        raise UsageError(
            f"{run} already holds a pipeline run; pass --resume to continue it or choose another --out"
        )
    stages = build_stages(config, run, options)
    run.mkdir(parents=True, exist_ok=True)
    run_stages(run, stages, resume=resume)
    report_file = run_layout.run_path(run, run_layout.REPORT_JSON)
    report: dict[str, Any] = json.loads(report_file.read_text(encoding="utf-8"))
    return report
