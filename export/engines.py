"""The TensorRT engines of a run: one per precision, built from the run's checked ONNX files.

Every task builds its engines here; which ONNX file each precision comes from is the task's
`engine_sources` (export.producing.ExportTask): a classifier's registry files, a detector's
EfficientNMS file for fp32. `produce_engines` is the "tensorrt" format's producer of every task.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path

from deploy import run_layout
from deploy.errors import UsageError
from deploy.manifest import Manifest, verify_artifact
from deploy.predict import STUDENT_SHA256_KEY
from deploy.trt_sidecar import sidecar_path
from export.producing import ExportContext, ExportRecorder, TensorRTOptions
from export.tensorrt_engine import build_engine
from export.timing import StageTimer


def produce_engines(context: ExportContext, name: str) -> bool:
    """Build the TensorRT engines from the run's checked ONNX files (format "tensorrt"); without
    TensorRT or a GPU, record the missing dependency (exit 3)."""
    if context.tensorrt_missing is not None:
        context.recorder.summary.missing_dependency = f"--formats {name}: {context.tensorrt_missing}"
        context.recorder.skip(name, context.tensorrt_missing)
        return False
    build_engines(
        context.run,
        context.manifest,
        context.recorder,
        context.options.tensorrt,
        context.log,
        context.timer,
        context.engine_sources,
    )
    return True


def build_engines(
    run: Path,
    manifest: Manifest,
    recorder: ExportRecorder,
    options: TensorRTOptions,
    log: Callable[[str], None],
    timer: StageTimer,
    sources: Mapping[str, str],
) -> None:
    """Build one engine per precision from its ONNX file in `sources` (the task's engine_sources:
    precision -> run-relative file), where that file passed its check (this export or an earlier one)."""
    for precision, rel in sources.items():
        if options.dla_core is not None and precision == "fp32":
            recorder.skip(f"tensorrt/{precision}", "the DLA computes in fp16 and int8 only")
            continue
        try:
            source = verify_artifact(run, manifest, rel)
        except UsageError as exc:
            recorder.skip(f"tensorrt/{precision}", f"no checked {rel} to build from ({exc})")
            continue
        plan_rel = run_layout.engine_file(precision)
        log(f"building {plan_rel} from {rel}")
        with timer.stage(plan_rel, "tensorrt build"):
            sidecar = build_engine(
                source,
                run / plan_rel,
                min_batch=options.min_batch,
                opt_batch=options.opt_batch,
                max_batch=options.max_batch,
                workspace_mib=options.workspace_mib,
                timing_cache=run / run_layout.TIMING_CACHE,
                optimization_level=options.optimization_level,
                compatibility=options.compatibility,
                precision=precision,
                dla_core=options.dla_core,
                gpu_fallback=options.gpu_fallback,
            )
        recorder.keep(
            plan_rel,
            "tensorrt",
            precision=precision,
            source=rel,
            tensorrt_version=sidecar.get("tensorrt_version"),
            # An engine is as current as the ONNX file it was built from, maybe from an earlier export.
            **{STUDENT_SHA256_KEY: manifest["artifacts"][rel].get(STUDENT_SHA256_KEY)},
        )
        side_rel = sidecar_path(run / plan_rel).relative_to(run).as_posix()
        recorder.keep(side_rel, "sidecar", precision=precision, plan=plan_rel)
