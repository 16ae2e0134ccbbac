"""`reviewkd run`: teacher, distill, export, validate, bench and report in one command.

Each stage records what it read and wrote (paths and sha256) in RUN/pipeline.json. With --resume a
stage is skipped when every output it recorded is still there with the same sha256 and its inputs
have not changed since; otherwise it runs again (training stages continue from their checkpoints).
A stage that fails stops the run, names the stage, and leaves what the earlier stages wrote.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from deploy.errors import ReviewKDError, UsageError
from deploy.fileio import sha256_file, write_json_atomic
from deploy.manifest import read_manifest, write_manifest
from deploy.run_lock import run_lock
from reviewkd.config import Config, dump_config, load_config, shipped_configs

PIPELINE_FILE = "pipeline.json"
BASELINE_DIR = "baseline_ce"
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
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
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
    if not (run / "manifest.json").is_file():
        return []
    artifacts = read_manifest(run).get("artifacts", {})
    return sorted(rel for rel, entry in artifacts.items() if entry.get("kind") in kinds)


def build_stages(config: Config, run: Path, args: argparse.Namespace) -> list[Stage]:
    """The pipeline's stages for `config` writing into `run`."""
    from benchmarks.latency import parse_batch_sizes
    from reviewkd.commands.evaluate import bench_run, report_run, validate_run
    from reviewkd.engine import distill

    batch_sizes = parse_batch_sizes(args.batch_sizes)  # checked before any stage runs

    def train_student() -> None:
        resume = (run / "checkpoints" / "last.pt").is_file()
        distill(config, run, resume=resume)

    def train_baseline() -> None:
        baseline_dir = run / BASELINE_DIR
        baseline = dataclasses.replace(config, method=dataclasses.replace(config.method, name="ce"))
        baseline = dataclasses.replace(
            baseline, output=dataclasses.replace(config.output, dir=str(baseline_dir))
        )
        distill(baseline, baseline_dir, resume=(baseline_dir / "checkpoints" / "last.pt").is_file())
        scores = read_manifest(baseline_dir)["student"]
        manifest = read_manifest(run)
        manifest["baselines"] = {
            "ce": {
                "top1": scores["top1"],
                "top5": scores["top5"],
                "run": BASELINE_DIR,
                "sha256": scores["sha256"],
            }
        }
        write_manifest(run, manifest)

    def export() -> None:
        from export.pipeline import export_run

        summary = export_run(run, log=lambda line: print(f"   {line}", flush=True))
        summary.raise_for_status()

    def validate() -> None:
        from benchmarks.validate import raise_for_gates

        result = validate_run(run, threads=args.threads)
        raise_for_gates(result)

    def bench() -> None:
        bench_run(run, threads=args.threads, batch_sizes=batch_sizes, seconds=args.bench_seconds)

    def report() -> None:
        report_run(run)

    student = ["student.safetensors"]
    exported = lambda: _artifact_paths(run, ("onnx", "tensorrt"))  # noqa: E731 - read when the stage runs
    settings = dump_config(config)
    stages = [Stage("distill", train_student, lambda: [], lambda: student, settings)]
    if args.baseline:
        stages.append(
            Stage(
                "baseline",
                train_baseline,
                lambda: [],
                lambda: [f"{BASELINE_DIR}/student.safetensors"],
                settings,
            )
        )
    stages += [
        Stage("export", export, lambda: student, exported),
        Stage("validate", validate, lambda: student + exported(), lambda: ["report/validate.json"]),
        Stage("bench", bench, lambda: student + exported(), lambda: ["report/bench.json"]),
        Stage(
            "report",
            report,
            # The baseline's metrics feed the report's student-vs-baseline curves.
            lambda: [
                "report/validate.json",
                "report/bench.json",
                "metrics.jsonl",
                f"{BASELINE_DIR}/metrics.jsonl",
            ],
            lambda: ["report/report.json", "report/report.md", "report/report.html"],
        ),
    ]
    return stages


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add the `run` subcommand."""
    parser = subparsers.add_parser(
        "run",
        help="teacher, distill, export, validate, bench and report in one go",
        description="Run the whole pipeline: train the teacher (when the config gives none), distil the "
        "student and a cross-entropy baseline, export every ONNX flavour (and TensorRT where present), "
        "validate, benchmark and report. Without --config it runs the embedded digits default.",
        epilog=f"shipped configs: {', '.join(shipped_configs())}",
    )
    parser.add_argument("--config", metavar="FILE|NAME", help="a YAML config or a shipped config's name")
    parser.add_argument("--out", type=Path, default=Path("runs/demo"), metavar="DIR", help="run directory")
    parser.add_argument("--resume", action="store_true", help="skip the stages whose outputs verify")
    parser.add_argument(
        "--no-baseline",
        dest="baseline",
        action="store_false",
        help="do not train the cross-entropy student the report compares against",
    )
    parser.add_argument("--threads", type=int, metavar="N", help="CPU threads for validate and bench")
    parser.add_argument(
        "--batch-sizes", default="1,8,32", metavar="1,8,32", help="bench batch sizes (default 1,8,32)"
    )
    parser.add_argument(
        "--bench-seconds", type=float, default=1.0, metavar="S", help="timing per format and batch size"
    )
    parser.add_argument(
        "overrides", nargs="*", metavar="key=value", help="config overrides, e.g. train.epochs=5"
    )
    parser.set_defaults(handler=run_pipeline)


def run_pipeline(args: argparse.Namespace) -> int:
    """Handler of `reviewkd run`."""
    run: Path = args.out
    source: str | Path | None = args.config
    if source is None and args.resume and (run / "config.yaml").is_file():
        source = run / "config.yaml"
    config = load_config(source, [*args.overrides, f"output.dir={run}"])
    if not args.resume and (run / PIPELINE_FILE).exists():
        raise UsageError(
            f"{run} already holds a pipeline run; pass --resume to continue it or choose another --out"
        )
    stages = build_stages(config, run, args)
    started = time.perf_counter()
    with run_lock(run, "run", create=True):
        run_stages(run, stages, resume=args.resume)
    from benchmarks.report import format_final_table

    print(format_final_table(json.loads((run / "report" / "report.json").read_text(encoding="utf-8"))))
    print(f"pipeline finished in {time.perf_counter() - started:.0f} s; reports in {run / 'report'}")
    return 0
