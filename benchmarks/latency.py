"""Latency and throughput per format and batch size, after a warm-up.

Each call is timed on its own: on a CUDA runner with a pair of CUDA events recorded on the
runner's stream (when torch is installed), on the CPU with the monotonic `time.perf_counter_ns`,
and in both cases with the runner's `synchronize()` before, so queued device work is not charged to
the next call. Because runners return host arrays, a sample covers the whole `infer` call: input
check, host-to-device copy, execution and the copy back, which is what a caller waits for. The
events do not isolate GPU compute: the call waits on the host for its results, so the end event is
recorded after the host work too; they measure the call on the GPU's clock (`cuda_event_call`).

CUDA graphs: a runner that can replay its work as a CUDA graph says so with a class attribute
`supports_cuda_graphs = True` and turns the feature on when the harness sets
`runner.use_cuda_graphs = True` (it captures one graph per batch shape, during the warm-up).
Whether graphs were used, and why not, is recorded per format.

Warm-up and stability (benchmarks.stability): the warm-up takes at least `warmup` calls, then goes on
until the timings reach a steady state (two windows of calls with medians within 10%), capped;
`--warmup 0` skips it. Each measurement records its warm-up calls, bootstrap intervals on its
percentiles and a `stable`/`noisy` verdict. `compare_targets` times two formats interleaved in
counterbalanced pairs (A B, B A, ...) and states the ratio of their medians with an interval.

Machine state (benchmarks.machine_state): each measurement records other processes' share of the
CPUs' time over its timed calls ("cpu_usage"), and each format a snapshot of the CPU governor and
frequency, the GPUs' clocks and throttling, a Jetson's power mode and clocks ("machine_state") and its
runtime's thread pools ("threads"), taken after its measurements. What in them undermines a number
(other load, a governor other than performance, throttling) is among the measurement's `noisy`
reasons. A TensorRT engine is also timed as trtexec splits it (benchmarks.trt_breakdown: H2D, GPU
compute, D2H, enqueue, throughput, and whether a CUDA graph ran). Energy per image
(benchmarks.energy) is metered over the timed calls where this machine has power rails or energy
counters, less an idle baseline read before each measurement's warm-up.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from benchmarks.energy import EnergyMeter, detect_energy_meter
from benchmarks.environment import collect_environment, machine_text
from benchmarks.machine_state import (
    CpuUsageWatch,
    machine_state,
    runner_threads,
    state_flags,
    unknown,
    usage_flags,
)
from benchmarks.measured import SOURCE_RANDOM, measured_block
from benchmarks.stability import (
    MAX_WARMUP_ITERS,
    MAX_WARMUP_SECONDS,
    compare_medians,
    distribution,
    is_steady,
    stability_verdict,
)
from benchmarks.targets import Target, check_unique, error_reason, open_target
from benchmarks.trt_breakdown import tensorrt_breakdown
from deploy.errors import UsageError
from deploy.optional import installed, optional_import
from deploy.runners.base import Runner
from deploy.status import Status

# 2: results record what they measured ("measured"); see benchmarks.measured.
# 3: each measurement records its steady-state warm-up, percentile intervals and stability verdict.
# 4: each measurement records its CPU usage, energy and percentiles; each format its machine state,
# thread pools and (TensorRT) breakdown.
BENCH_SCHEMA_VERSION = 4
DEFAULT_BATCH_SIZES: tuple[int, ...] = (1, 8, 32)
DEFAULT_WARMUP = 10
DEFAULT_SECONDS = 1.0
# With a time budget, still take enough samples for p50/p90 to mean something, and stop a
# pathological zero-duration timer from looping forever.
MIN_ITERS = 10
MAX_ITERS = 100_000
# The longest time budget per format and batch size: an hour says all a latency run can say, and
# keeps a typo (or inf) from running for ever.
MAX_SECONDS = 3600.0
# The largest batch timed: a GPU's throughput curve has flattened long before; a batch of 3 x 224 x
# 224 images this size is 2.5 GB of float32, where 10^8 would ask numpy for terabytes.
MAX_BATCH_SIZE = 4096
# The largest batch of random float32 images bench allocates for one call; a batch of the largest
# inputs a manifest allows (3 x 4096 x 4096) would need 200 MB an image. Larger is "skipped".
MAX_BATCH_BYTES = 2 << 30
# The percentiles each measurement keeps of its distribution.
PERCENTILES = tuple(range(101))


class Timer(Protocol):
    """Times one call: `measure(call, synchronize)` returns milliseconds."""

    name: str

    def measure(self, call: Callable[[], object], synchronize: Callable[[], None]) -> float:
        """Run `call` once and return how long it took, in milliseconds."""
        ...


class PerfCounterTimer:
    """Wall-clock timing with a monotonic nanosecond clock (the CPU path)."""

    name = "perf_counter"

    def __init__(self, clock: Callable[[], int] = time.perf_counter_ns) -> None:
        self.clock = clock

    def measure(self, call: Callable[[], object], synchronize: Callable[[], None]) -> float:
        """Time `call` plus the synchronisation that makes its results ready."""
        synchronize()
        start = self.clock()
        call()
        synchronize()
        return (self.clock() - start) / 1e6


class CudaEventTimer:
    """The whole call on the GPU's clock: torch CUDA events recorded on the runner's stream (its
    `stream_handle` where it has one, else torch's current stream) just before and just after it.

    Not GPU compute time: a runner's call returns host arrays, so the end event is queued after the
    call's copies, kernels and the host work between them, and the span includes all of that.
    """

    name = "cuda_event_call"

    def __init__(self, stream_handle: int | None = None) -> None:
        with optional_import("timing on a CUDA device with torch"):
            import torch

        self._start = torch.cuda.Event(enable_timing=True)
        self._end = torch.cuda.Event(enable_timing=True)
        # The runner's own stream, wrapped; None records on torch's current stream (the torch runner's).
        self._stream = None if stream_handle is None else torch.cuda.ExternalStream(stream_handle)

    def measure(self, call: Callable[[], object], synchronize: Callable[[], None]) -> float:
        """Time `call` between two events on the runner's stream."""
        synchronize()
        self._start.record(self._stream)
        call()
        self._end.record(self._stream)
        self._end.synchronize()
        return float(self._start.elapsed_time(self._end))


def cuda_events_available() -> bool:
    """Return True when torch is installed and sees a CUDA device."""
    if not installed("torch"):
        return False
    with optional_import("timing on a CUDA device with torch"):
        import torch

    return bool(torch.cuda.is_available())


def choose_timer(runner: Runner) -> Timer:
    """Return CUDA events for a CUDA runner where torch can provide them, else the CPU clock."""
    if str(runner.device).startswith("cuda") and cuda_events_available():
        return CudaEventTimer(getattr(runner, "stream_handle", None))
    return PerfCounterTimer()


def latency_stats(
    samples_ms: Sequence[float],
    batch_size: int,
    warmup_steady: bool | None = None,
    machine_flags: Sequence[str] = (),
) -> dict[str, Any]:
    """Summarise per-call latencies of one batch size.

    Percentiles interpolate linearly between samples (numpy's default), each with a seeded
    bootstrap 95% interval ("p50_ci_ms" ...); std is the sample standard deviation (0 for one
    sample); "cv" is std / mean (None when the mean is 0); "percentiles_ms" the 0th to the 100th
    percentile, the distribution the report plots; throughput is images per second at the
    mean latency (None when the mean is 0). "verdict" is `stable` or `noisy`, "noisy_because" says
    why and what to do (benchmarks.stability.stability_verdict; `warmup_steady` False and each of
    `machine_flags`, benchmarks.machine_state's, count).
    """
    if len(samples_ms) == 0:
        raise ValueError("latency_stats needs at least one sample")
    if batch_size < 1:
        raise ValueError(f"batch size must be >= 1, got {batch_size}")
    stats = distribution(samples_ms)
    mean = stats["mean_ms"]
    verdict, why = stability_verdict(
        stats["iters"], stats["cv"], stats["p50_ms"], stats["p99_ms"], warmup_steady, machine_flags
    )
    # A clock too coarse to see the calls measures a mean of 0: no throughput can be stated, and
    # infinity is not JSON (json.dumps would write the invalid token `Infinity`).
    stats["throughput_ips"] = batch_size * 1000.0 / mean if mean > 0 else None
    stats.update(verdict=verdict, noisy_because=why)
    # The whole distribution in 101 numbers (the 0th to the 100th percentile), for the report's plot.
    stats["percentiles_ms"] = [round(float(v), 6) for v in np.percentile(samples_ms, PERCENTILES)]
    return stats


def check_settings(warmup: int, iters: int | None, seconds: float | None) -> None:
    """Raise UsageError, naming the option, for a warm-up or measurement length that cannot work."""
    if iters is not None and seconds is not None:
        raise UsageError("give either --iters or --seconds, not both")
    if iters is not None and not 1 <= iters <= MAX_ITERS:
        raise UsageError(f"--iters must be 1 to {MAX_ITERS}, got {iters}")
    if seconds is not None and not (math.isfinite(seconds) and 0 < seconds <= MAX_SECONDS):
        raise UsageError(f"--seconds must be a number of seconds > 0 and <= {MAX_SECONDS:g}, got {seconds}")
    if not 0 <= warmup <= MAX_ITERS:
        raise UsageError(f"--warmup must be 0 to {MAX_ITERS}, got {warmup}")


@dataclass(frozen=True)
class Timings:
    """What one measurement timed: the per-call latencies (ms), how its warm-up went and the CPU
    usage over its timed calls (benchmarks.machine_state.CpuUsageWatch)."""

    samples_ms: list[float]
    warmup_iters: int
    # True: the warm-up reached a steady state; False: it hit its cap first; None: no warm-up.
    warmup_steady: bool | None
    cpu_usage: dict[str, Any] = field(default_factory=dict)
    # Energy over the timed calls (benchmarks.energy.EnergyMeter.stop), None when not metered.
    energy: dict[str, Any] | None = None


def warm_up(measure: Callable[[], float], minimum: int) -> tuple[int, bool | None]:
    """Time calls (`measure` makes one and returns its ms) until the timings reach a steady state
    (benchmarks.stability.is_steady), after at least `minimum` calls, capped at MAX_WARMUP_ITERS
    calls or MAX_WARMUP_SECONDS of timed calls. `minimum` 0 skips the warm-up.
    Returns (calls made, steady: True, False at the cap, None when skipped).
    """
    if minimum == 0:
        return 0, None
    timings: list[float] = []
    spent_ms = 0.0
    while True:
        timings.append(measure())
        spent_ms += timings[-1]
        if len(timings) >= minimum and is_steady(timings):
            return len(timings), True
        if len(timings) >= max(minimum, MAX_WARMUP_ITERS) or spent_ms >= 1000.0 * MAX_WARMUP_SECONDS:
            return len(timings), False


def infer_logits(runner: Runner, images: np.ndarray) -> object:
    """One call of a classifier: its logits for `images` (Runner.infer)."""
    return runner.infer(images)


def _measurer(
    timer: Timer,
    runner: Runner,
    images: np.ndarray,
    work: Callable[[Runner, np.ndarray], object] = infer_logits,
) -> Callable[[], float]:
    """A function that times one call, `work(runner, images)`, and returns its milliseconds."""

    def call() -> object:
        return work(runner, images)

    def measure() -> float:
        return timer.measure(call, runner.synchronize)

    return measure


def time_runner(
    runner: Runner,
    images: np.ndarray,
    *,
    warmup: int = DEFAULT_WARMUP,
    iters: int | None = None,
    seconds: float | None = None,
    timer: Timer | None = None,
    energy: EnergyMeter | None = None,
) -> Timings:
    """Warm a runner up on `images` (see `warm_up`; `warmup` is the least number of calls), then
    time calls one by one, watching the CPUs' usage over the timed calls.

    Exactly one of `iters` (a fixed count) and `seconds` (a budget of measured time, with at
    least MIN_ITERS samples) may be given; with neither, the budget is DEFAULT_SECONDS. `energy`
    (its idle baseline already read) meters the timed calls.
    """
    check_settings(warmup, iters, seconds)
    measure = _measurer(timer if timer is not None else choose_timer(runner), runner, images)
    warmup_iters, steady = warm_up(measure, warmup)
    runner.synchronize()
    samples: list[float] = []
    watch = CpuUsageWatch()
    watch.start()
    if energy is not None:
        energy.start()
    if iters is not None:
        for _ in range(iters):
            samples.append(measure())
    else:
        budget_ms = 1000.0 * (seconds if seconds is not None else DEFAULT_SECONDS)
        total = 0.0
        while (len(samples) < MIN_ITERS or total < budget_ms) and len(samples) < MAX_ITERS:
            sample = measure()
            samples.append(sample)
            total += sample
    usage = watch.stop()
    metered = energy.stop(len(samples) * images.shape[0]) if energy is not None else None
    return Timings(samples, warmup_iters, steady, usage, metered)


def _batch_out_of_range(runner: Runner, batch_size: int) -> str | None:
    if batch_size < runner.min_batch or (runner.max_batch is not None and batch_size > runner.max_batch):
        upper = runner.max_batch if runner.max_batch is not None else "any"
        return f"batch {batch_size} outside the model's range {runner.min_batch}..{upper}"
    size = batch_size * int(np.prod(runner.input_shape)) * np.dtype(np.float32).itemsize
    if size > MAX_BATCH_BYTES:
        shape = "x".join(map(str, runner.input_shape))
        return (
            f"batch {batch_size} of {shape} images is {size / 2**20:.0f} MiB of float32,"
            f" more than the {MAX_BATCH_BYTES / 2**20:.0f} MiB bench allocates for one call"
        )
    return None


def enable_cuda_graphs(runner: Runner, wanted: bool) -> tuple[bool, str | None]:
    """Turn CUDA graphs on where the runner supports them; return (used, reason when not)."""
    if not wanted:
        return False, "disabled"
    if not str(runner.device).startswith("cuda"):
        return False, "CPU runner"
    if not getattr(runner, "supports_cuda_graphs", False):
        return False, f"the {runner.backend} runner does not support CUDA graphs"
    runner.use_cuda_graphs = True  # type: ignore[attr-defined]
    return True, None


def _bench_one(
    target: Target,
    batch_sizes: Sequence[int],
    *,
    warmup: int,
    iters: int | None,
    seconds: float | None,
    cuda_graphs: bool,
    seed: int,
    timer_factory: Callable[[Runner], Timer],
) -> dict[str, Any]:
    entry: dict[str, Any] = {"status": Status.OK, "reason": None, **target.describe()}
    entry.update(device=None, timer=None, cuda_graphs={"used": False, "reason": None})
    entry.update(latency={}, skipped_batches={}, machine_state=None, threads=None)
    runner, status, reason, _ = open_target(target)
    if runner is None:
        entry.update(status=status, reason=reason)
        return entry
    with runner, detect_energy_meter(gpu=str(runner.device).startswith("cuda")) as meter:
        entry["device"] = runner.device
        used, why_not = enable_cuda_graphs(runner, cuda_graphs)
        entry["cuda_graphs"] = {"used": used, "reason": why_not}
        timer = timer_factory(runner)
        entry["timer"] = timer.name
        entry["threads"] = runner_threads(runner)
        rng = np.random.default_rng(seed)
        all_timings: dict[str, Timings] = {}
        for batch_size in batch_sizes:
            out_of_range = _batch_out_of_range(runner, batch_size)
            if out_of_range is not None:
                entry["skipped_batches"][str(batch_size)] = out_of_range
                continue
            images = random_images(batch_size, runner.input_shape, rng)
            try:
                meter.measure_idle()
                timings = time_runner(
                    runner, images, warmup=warmup, iters=iters, seconds=seconds, timer=timer, energy=meter
                )
            except Exception as exc:
                # Keep the batch sizes already measured; the format as a whole is failed.
                entry.update(status=Status.FAILED, reason=f"batch {batch_size}: {error_reason(exc)}")
                break
            all_timings[str(batch_size)] = timings
        # The snapshot after the measurements: a GPU that throttled under them still shows it.
        on_gpu = str(runner.device).startswith("cuda")
        # Bench opens its runners on CUDA device 0; the TensorRT runner names its own.
        entry["machine_state"] = machine_state(gpus=on_gpu, device_index=getattr(runner, "device_index", 0))
        snapshot_flags = state_flags(entry["machine_state"])
        for batch, timings in all_timings.items():
            flags = [*usage_flags(timings.cpu_usage), *snapshot_flags]
            stats = latency_stats(timings.samples_ms, int(batch), timings.warmup_steady, flags)
            stats.update(warmup_iters=timings.warmup_iters, warmup_steady=timings.warmup_steady)
            stats.update(cpu_usage=timings.cpu_usage, machine_flags=flags, energy=timings.energy)
            entry["latency"][batch] = stats
        engine = getattr(runner, "engine", None) if runner.backend == "tensorrt" else None
        if engine is not None:
            entry["trt_breakdown"] = {
                batch: _breakdown(engine, int(batch), warmup, len(timings.samples_ms), used)
                for batch, timings in all_timings.items()
            }
        if used:
            # A shape whose capture failed was timed eagerly: say so rather than claim graphs.
            graph_error = getattr(runner, "cuda_graph_error", None)
            if graph_error:
                entry["cuda_graphs"]["reason"] = f"fell back to eager: {graph_error}"
            entry["cuda_graphs"]["shapes"] = [list(s) for s in getattr(runner, "cuda_graph_shapes", [])]
    if entry["status"] == Status.OK and not entry["latency"]:
        reason = "; ".join(entry["skipped_batches"].values()) or "no batch sizes"
        entry.update(status=Status.SKIPPED, reason=reason)
    return entry


def _breakdown(engine: Any, batch_size: int, warmup: int, iters: int, cuda_graph: bool) -> dict[str, Any]:
    """The TensorRT breakdown at one batch size (benchmarks.trt_breakdown), or unknown with the error."""
    try:
        return tensorrt_breakdown(engine, batch_size, warmup=warmup, iters=iters, cuda_graph=cuda_graph)
    except Exception as exc:
        return unknown(f"the breakdown failed: {error_reason(exc)}")


def parse_batch_sizes(text: str) -> tuple[int, ...]:
    """Parse "1,8,32" into (1, 8, 32); anything else is a UsageError naming --batch-sizes."""
    try:
        sizes = tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise UsageError(f"--batch-sizes {text!r}: expected comma-separated integers, e.g. 1,8,32") from None
    if not sizes or any(not 1 <= size <= MAX_BATCH_SIZE for size in sizes):
        raise UsageError(f"--batch-sizes {text!r}: expected one or more integers from 1 to {MAX_BATCH_SIZE}")
    return tuple(dict.fromkeys(sizes))


def benchmark_runners(
    targets: Sequence[Target],
    *,
    batch_sizes: Sequence[int] = DEFAULT_BATCH_SIZES,
    warmup: int = DEFAULT_WARMUP,
    iters: int | None = None,
    seconds: float | None = None,
    threads: int | None = None,
    cuda_graphs: bool = True,
    seed: int = 0,
    timer_factory: Callable[[Runner], Timer] = choose_timer,
    student_sha256: str | None = None,
) -> dict[str, Any]:
    """Time every target at every batch size, one target open at a time.

    Inputs are seeded random float32 batches of each runner's input shape. `threads` is only
    recorded (the openers apply it). A target that cannot open is "skipped" or "failed" as in
    validation; a batch size outside a runner's range is listed under "skipped_batches".
    `student_sha256` (the run's student) is recorded in "measured" with the inputs' seed.

    Returns the content of bench.json: {"schema_version", "settings", "environment",
    "results": {key: {"status", "reason", backend, precision, file, size_bytes, "device",
    "timer", "cuda_graphs": {"used", "reason"}, "latency": {"<batch>": stats},
    "skipped_batches": {"<batch>": reason}, "machine", "machine_state", "threads"}}, "measured"}, stats
    as `latency_stats` returns them plus "warmup_iters" and "warmup_steady" (see `warm_up`),
    "cpu_usage" (benchmarks.machine_state.CpuUsageWatch), "machine_flags" (what in the machine's
    state made the measurement noisy) and "energy" (benchmarks.energy: mJ per image per rail and in
    total, over the timed calls less an idle baseline read before the warm-up, or unknown with why).
    A TensorRT entry also has "trt_breakdown": {"<batch>": benchmarks.trt_breakdown's summary, or
    unknown with why}, timed after the measurements on the same engine with as many iterations.
    """
    check_unique(targets)
    check_settings(warmup, iters, seconds)
    if iters is None and seconds is None:
        seconds = DEFAULT_SECONDS
    sizes = tuple(batch_sizes)
    if not sizes or any(not 1 <= size <= MAX_BATCH_SIZE for size in sizes):
        raise UsageError(f"batch sizes must be integers from 1 to {MAX_BATCH_SIZE}, got {list(sizes)}")
    results = {
        target.key: _bench_one(
            target,
            sizes,
            warmup=warmup,
            iters=iters,
            seconds=seconds,
            cuda_graphs=cuda_graphs,
            seed=seed,
            timer_factory=timer_factory,
        )
        for target in targets
    }
    # Collected after the runs, so that the thread pools the runtimes created are visible.
    environment = collect_environment(threads)
    for entry in results.values():
        # Each entry names its machine: merged with another machine's results, it stays told apart.
        entry["machine"] = machine_text(environment)
    return {
        "schema_version": BENCH_SCHEMA_VERSION,
        "settings": {
            "batch_sizes": list(sizes),
            "warmup": warmup,
            "iters": iters,
            "seconds": seconds,
            "threads": threads,
            "cuda_graphs": cuda_graphs,
            "seed": seed,
        },
        "environment": environment,
        "results": results,
        "measured": measured_block(
            {"kind": SOURCE_RANDOM, "seed": seed, "images": None}, None, student_sha256
        ),
    }


def random_images(batch_size: int, input_shape: Sequence[int], rng: np.random.Generator) -> np.ndarray:
    """A batch of seeded standard-normal float32 images of `input_shape` (C, H, W)."""
    return rng.standard_normal((batch_size, *input_shape), dtype=np.float32)


@dataclass(frozen=True)
class Workload:
    """What `compare_targets` times: `call(runner, images)` is one timed call, `images(batch_size,
    input_shape, rng)` the batch both formats get at a batch size, and `inputs` says what those
    images are (recorded in the comparison's settings). A classifier's (CLASSIFIER_WORKLOAD) is the
    logits of seeded random images; a task whose work depends on the images' content brings its own
    (a detector's NMS: benchmarks.detection)."""

    inputs: str
    images: Callable[[int, Sequence[int], np.random.Generator], np.ndarray]
    call: Callable[[Runner, np.ndarray], object] = infer_logits


CLASSIFIER_WORKLOAD = Workload("seeded random float32 images", random_images)


def parse_compare(text: str) -> tuple[str, str]:
    """Parse "onnxruntime/fp32,onnxruntime/int8" into its two format keys; else a UsageError
    naming --compare."""
    keys = [part.strip() for part in text.split(",")]
    if len(keys) != 2 or not all(keys):
        raise UsageError(
            f"--compare {text!r}: expected two format keys A,B, e.g. onnxruntime/fp32,onnxruntime/int8"
        )
    return keys[0], keys[1]


def compared_pair(
    targets: Mapping[str, Target], pair: tuple[str, str], run: str | os.PathLike[str]
) -> tuple[Target, Target]:
    """The two targets `bench --compare` names; a UsageError naming --compare and the run's formats
    where the run has no format of a key."""
    missing = [key for key in pair if key not in targets]
    if missing:
        raise UsageError(
            f"--compare: {', '.join(missing)} is not a format of {run}; it has {', '.join(targets)}"
        )
    return targets[pair[0]], targets[pair[1]]


def _interleaved(
    measures: tuple[Callable[[], float], Callable[[], float]], *, iters: int | None, seconds: float | None
) -> tuple[list[float], list[float]]:
    """Time pairs A B, B A, A B, ...: `iters` pairs, or pairs until both together took `seconds` (at
    least MIN_ITERS pairs). Returns A's and B's timings, paired by index."""
    series: tuple[list[float], list[float]] = ([], [])
    budget_ms = None if iters is not None else 1000.0 * (seconds if seconds is not None else DEFAULT_SECONDS)
    total = 0.0
    while len(series[0]) < MAX_ITERS:
        if iters is not None and len(series[0]) >= iters:
            break
        if budget_ms is not None and len(series[0]) >= MIN_ITERS and total >= budget_ms:
            break
        # Every other pair runs B first (ABBA...): a call's position in the pair (first after the
        # loop's own work, or straight after the other format) then weighs on A and B alike.
        order = (0, 1) if len(series[0]) % 2 == 0 else (1, 0)
        for side in order:
            series[side].append(measures[side]())
            total += series[side][-1]
    return series


def compare_targets(
    target_a: Target,
    target_b: Target,
    batch_sizes: Sequence[int],
    *,
    warmup: int = DEFAULT_WARMUP,
    iters: int | None = None,
    seconds: float | None = None,
    seed: int = 0,
    timer_factory: Callable[[Runner], Timer] = choose_timer,
    workload: Workload = CLASSIFIER_WORKLOAD,
) -> dict[str, Any]:
    """Time two formats interleaved (A, B, A, B, ...) on the same inputs at each batch size, after
    each one's steady-state warm-up, and compare their medians (benchmarks.stability.compare_medians).

    `workload` says what a timed call does and on which images (default: a classifier's logits of
    seeded random images). `iters` counts pairs; `seconds` is the budget of both together. Both stay
    open for the whole comparison. Returns {"a", "b", "status", "reason", "batches": {"<batch>":
    comparison plus "a_warmup_iters", "b_warmup_iters", "cpu_usage" and "machine_flags" over the pairs},
    "skipped_batches", "settings", "machine_state" and its "machine_flags" after the pairs}; a
    format that cannot open makes the comparison "skipped" or "failed" with its reason. Pairing
    cancels load that slows A and B alike; the flags say when there was load to cancel.
    """
    check_settings(warmup, iters, seconds)
    entry: dict[str, Any] = {"a": target_a.key, "b": target_b.key, "status": Status.OK, "reason": None}
    entry.update(batches={}, skipped_batches={})
    entry["settings"] = {
        "warmup": warmup,
        "iters": iters,
        "seconds": seconds,
        "seed": seed,
        "inputs": workload.inputs,
    }
    runner_a, status, reason, _ = open_target(target_a)
    if runner_a is None:
        entry.update(status=status, reason=f"{target_a.key}: {reason}")
        return entry
    with runner_a:
        runner_b, status, reason, _ = open_target(target_b)
        if runner_b is None:
            entry.update(status=status, reason=f"{target_b.key}: {reason}")
            return entry
        with runner_b:
            if tuple(runner_a.input_shape) != tuple(runner_b.input_shape):
                shapes = f"{list(runner_a.input_shape)} and {list(runner_b.input_shape)}"
                entry.update(status=Status.FAILED, reason=f"input shapes differ: {shapes}")
                return entry
            runners = (runner_a, runner_b)
            _compare_batches(
                entry, runners, batch_sizes, warmup, iters, seconds, seed, timer_factory, workload
            )
    return entry


def _compare_batches(
    entry: dict[str, Any],
    runners: tuple[Runner, Runner],
    batch_sizes: Sequence[int],
    warmup: int,
    iters: int | None,
    seconds: float | None,
    seed: int,
    timer_factory: Callable[[Runner], Timer],
    workload: Workload,
) -> None:
    timers = (timer_factory(runners[0]), timer_factory(runners[1]))
    rng = np.random.default_rng(seed)
    for batch_size in batch_sizes:
        out_of_range = _batch_out_of_range(runners[0], batch_size) or _batch_out_of_range(
            runners[1], batch_size
        )
        if out_of_range is not None:
            entry["skipped_batches"][str(batch_size)] = out_of_range
            continue
        try:
            images = workload.images(batch_size, runners[0].input_shape, rng)
            measures = (
                _measurer(timers[0], runners[0], images, workload.call),
                _measurer(timers[1], runners[1], images, workload.call),
            )
            warmups = [warm_up(measure, warmup)[0] for measure in measures]
            watch = CpuUsageWatch()
            watch.start()
            a_ms, b_ms = _interleaved(measures, iters=iters, seconds=seconds)
            usage = watch.stop()
            comparison = compare_medians(a_ms, b_ms)
        except Exception as exc:
            entry.update(status=Status.FAILED, reason=f"batch {batch_size}: {error_reason(exc)}")
            return
        comparison.update(a_warmup_iters=warmups[0], b_warmup_iters=warmups[1])
        comparison.update(cpu_usage=usage, machine_flags=usage_flags(usage))
        entry["batches"][str(batch_size)] = comparison
    on_gpu = any(str(runner.device).startswith("cuda") for runner in runners)
    entry["machine_state"] = machine_state(gpus=on_gpu, device_index=getattr(runners[0], "device_index", 0))
    entry["machine_flags"] = state_flags(entry["machine_state"])
    if not entry["batches"]:
        reason = "; ".join(entry["skipped_batches"].values()) or "no batch sizes"
        entry.update(status=Status.SKIPPED, reason=reason)


def comparison_text(entry: Mapping[str, Any], batch: str) -> str:
    """One line: "A vs B batch N: A is 1.52x faster (time ratio 0.66, 95% CI 0.64-0.68), 400 pairs"."""
    c = entry["batches"][batch]
    low, high = c["time_ratio_ci"]
    interval = f"time ratio A/B {c['time_ratio']:.3f}, 95% CI {low:.3f}-{high:.3f}, {c['pairs']} pairs"
    if c["verdict"] == "no difference":
        claim = "no difference"
    else:
        claim = f"{entry['a']} is {max(c['time_ratio'], 1 / c['time_ratio']):.2f}x {c['verdict']}"
    return f"{entry['a']} vs {entry['b']} batch {batch}: {claim} ({interval})"
