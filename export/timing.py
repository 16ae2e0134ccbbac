"""The export's timing table: wall and CPU seconds of each stage, per file.

A StageTimer starts when the export starts. Each stage runs inside `timer.stage(file, name)`, which
reads time.perf_counter (wall) and time.process_time (CPU of this process, all its threads) before
and after; stages never nest, so no second is counted twice. `block()` is the manifest's record
(deploy.manifest.ExportTiming) and `table()` the text the export prints at its end; the untimed
row is whatever ran between stages (loading the student, hashing and recording files, writing the
manifest), so the rows add up to the total.

The stages export.pipeline and export.calibration time, and what each covers:
    read check images, read calibration images   (shared) decoding the images into batches
    reference logits (PyTorch)      the student's logits on the check images (shared; the uint8
                                    file has its own pass on its rounded images)
    held-out reference logits (fp32 ONNX)  (shared) the fp32 file on the held-out training images
    lay out                         export --model: building the zoo model, re-saving its weights
    export                          torch -> the fp32 ONNX file: traced, weights counted, optimised, saved
    convert, bake                   fp16 conversion; the uint8-input file
    calibration statistics          (shared) one pass over the calibration images that every
                                    method and int8 flavour reads its ranges from
    calibrate <method>              that method's ranges (with --calib-method auto, also writing
                                    that candidate's file)
    score race                      the candidates on the held-out images, until each finishes or
                                    drops out (export.calibration.race)
    mixed-precision, quantize       the search and the final write; the write without a budget
    check                           running the file on the check images, comparing, gating
    tensorrt build                  building one engine and its sidecar
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from functools import partial

from deploy.manifest import SHARED_STAGE_FILE, ExportTiming, StageTime

# A stage clock bound to one file: `with clock("check"): ...`.
StageClock = Callable[[str], AbstractContextManager[None]]


def untimed(_name: str) -> AbstractContextManager[None]:
    """The StageClock of a caller that keeps no timing table."""
    return contextlib.nullcontext()


class StageTimer:
    """Records the stages of one export in the order they ran."""

    def __init__(self) -> None:
        self.stages: list[StageTime] = []
        self._start_wall = time.perf_counter()
        self._start_cpu = time.process_time()
        self._running: str | None = None

    @contextlib.contextmanager
    def stage(self, file: str, name: str) -> Iterator[None]:
        """Time the block as stage `name` of `file`; a stage that raises is not recorded."""
        if self._running is not None:
            raise RuntimeError(f"stage {name!r} of {file} started inside stage {self._running!r}")
        self._running = name
        wall, cpu = time.perf_counter(), time.process_time()
        try:
            yield
        finally:
            self._running = None
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
        self.stages.append(StageTime(file=file, stage=name, wall_s=wall, cpu_s=cpu))

    def clock(self, file: str) -> StageClock:
        """A StageClock for the stages of `file`."""
        return partial(self.stage, file)

    def shared(self, name: str) -> AbstractContextManager[None]:
        """Time a stage whose result every file uses."""
        return self.stage(SHARED_STAGE_FILE, name)

    def block(self) -> ExportTiming:
        """The manifest's record: every stage, the total from the start to now, and the rest."""
        total_wall = time.perf_counter() - self._start_wall
        total_cpu = time.process_time() - self._start_cpu
        return ExportTiming(
            stages=list(self.stages),
            total_wall_s=total_wall,
            total_cpu_s=total_cpu,
            untimed_wall_s=total_wall - sum(s["wall_s"] for s in self.stages),
            untimed_cpu_s=total_cpu - sum(s["cpu_s"] for s in self.stages),
        )


def timing_table(timing: ExportTiming) -> str:
    """The timing block as an aligned text table: one row per stage, then untimed and total."""
    rows = [(s["file"], s["stage"], s["wall_s"], s["cpu_s"]) for s in timing["stages"]]
    rows.append(("", "untimed (load, hash, record)", timing["untimed_wall_s"], timing["untimed_cpu_s"]))
    rows.append(("", "total", timing["total_wall_s"], timing["total_cpu_s"]))
    file_width = max(len("file"), *(len(r[0]) for r in rows))
    stage_width = max(len("stage"), *(len(r[1]) for r in rows))
    lines = [f"{'file':<{file_width}}  {'stage':<{stage_width}}  {'wall s':>8}  {'cpu s':>8}"]
    lines += [f"{f:<{file_width}}  {s:<{stage_width}}  {w:8.2f}  {c:8.2f}" for f, s, w, c in rows]
    return "\n".join(lines)
