"""benchmarks.latency: statistics on injected timings, the timing loop, and bench results.

No test asserts a wall-clock threshold: the statistics are checked on durations injected through
a fake clock, and real ONNX Runtime timings only for their shape and sanity.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from benchmarks.latency import (
    MIN_ITERS,
    PerfCounterTimer,
    benchmark_runners,
    choose_timer,
    compare_targets,
    enable_cuda_graphs,
    latency_stats,
    parse_batch_sizes,
    time_runner,
)
from benchmarks.machine_state import OTHER_CPU_SHARE_LIMIT
from benchmarks.stability import MAX_WARMUP_ITERS, MIN_JUDGED_ITERS
from benchmarks.targets import Target
from deploy.errors import UsageError
from deploy.runners.base import Runner
from tests.helpers import (
    TINY_INPUT_SHAPE,
    NumpyRunner,
    export_tiny_onnx,
    missing_tensorrt,
    onnx_target,
    tiny_module,
)


class FakeClock:
    """A nanosecond clock that only moves when a fake runner 'computes'."""

    def __init__(self) -> None:
        self.now = 0

    def __call__(self) -> int:
        return self.now


class TimedRunner(NumpyRunner):
    """A runner whose every call advances a fake clock by the next of the given durations (ms),
    cycling; synchronize() calls are counted."""

    def __init__(self, clock: FakeClock, durations_ms: list[float], **kwargs: object) -> None:
        super().__init__(lambda x: np.zeros((x.shape[0], 5), np.float32), **kwargs)  # type: ignore[arg-type]
        self.clock = clock
        self.durations = durations_ms
        self.index = 0
        self.syncs = 0

    def _infer(self, images: np.ndarray) -> np.ndarray:
        self.clock.now += round(self.durations[self.index % len(self.durations)] * 1e6)
        self.index += 1
        return super()._infer(images)

    def synchronize(self) -> None:
        self.syncs += 1


def _images(batch: int = 2) -> np.ndarray:
    return np.zeros((batch, *TINY_INPUT_SHAPE), np.float32)


def test_latency_stats_on_known_samples() -> None:
    samples = [float(v) for v in range(1, 101)]  # 1..100 ms
    stats = latency_stats(samples, batch_size=8)
    assert stats["p50_ms"] == pytest.approx(50.5)
    assert stats["p90_ms"] == pytest.approx(90.1)
    assert stats["p99_ms"] == pytest.approx(99.01)
    assert stats["mean_ms"] == pytest.approx(50.5)
    assert stats["std_ms"] == pytest.approx(np.sqrt(sum((v - 50.5) ** 2 for v in samples) / 99))
    assert (stats["min_ms"], stats["max_ms"], stats["iters"]) == (1.0, 100.0, 100)
    assert stats["throughput_ips"] == pytest.approx(8 * 1000 / 50.5)
    percentiles = stats["percentiles_ms"]
    assert len(percentiles) == 101 and percentiles[0] == 1.0 and percentiles[100] == 100.0
    assert percentiles[50] == pytest.approx(50.5) and percentiles == sorted(percentiles)


def test_latency_stats_edge_cases() -> None:
    one = latency_stats([4.0], batch_size=1)
    assert one["std_ms"] == 0.0 and one["p99_ms"] == 4.0 and one["throughput_ips"] == pytest.approx(250.0)
    # A clock that saw nothing: no throughput, and nothing json cannot write as JSON.
    unseen = latency_stats([0.0, 0.0], batch_size=8)
    assert unseen["throughput_ips"] is None
    json.dumps(unseen, allow_nan=False)
    with pytest.raises(ValueError):
        latency_stats([], batch_size=1)
    with pytest.raises(ValueError):
        latency_stats([1.0], batch_size=0)


def test_time_runner_warms_up_to_a_steady_state_then_measures_each_call() -> None:
    clock = FakeClock()
    # Warm-up calls slow down from 100 ms to a steady 10 ms; the measured calls take 1, 2, 3, 4 ms.
    # Steady at call 21: calls 12-21 (all 10 ms) and calls 2-11 (80, 60, 40, 20 and six 10s) both
    # have a median of 10 ms.
    runner = TimedRunner(clock, [100.0, 80.0, 60.0, 40.0, 20.0, *[10.0] * 16, 1.0, 2.0, 3.0, 4.0])
    timings = time_runner(runner, _images(), warmup=2, iters=4, timer=PerfCounterTimer(clock))
    assert timings.samples_ms == pytest.approx([1.0, 2.0, 3.0, 4.0])
    assert (timings.warmup_iters, timings.warmup_steady) == (21, True)
    assert runner.calls == [2] * 25
    # Warm-up calls are timed too (to see the steady state): two synchronize calls each, one after
    # the warm-up, then two around each measured call.
    assert runner.syncs == 2 * 21 + 1 + 2 * 4


def test_the_warmup_takes_at_least_the_calls_asked_for() -> None:
    clock = FakeClock()
    runner = TimedRunner(clock, [5.0])
    timings = time_runner(runner, _images(), warmup=30, iters=1, timer=PerfCounterTimer(clock))
    assert (timings.warmup_iters, timings.warmup_steady) == (30, True)
    unwarmed = time_runner(runner, _images(), warmup=0, iters=1, timer=PerfCounterTimer(clock))
    assert (unwarmed.warmup_iters, unwarmed.warmup_steady) == (0, None)


def test_a_warmup_that_never_settles_stops_at_its_cap() -> None:
    clock = FakeClock()
    # Ever slower calls: no two windows agree, so the warm-up stops at MAX_WARMUP_ITERS calls.
    growing = TimedRunner(clock, [0.01 * 1.02**k for k in range(MAX_WARMUP_ITERS)] + [1.0] * 40)
    timings = time_runner(growing, _images(), warmup=1, iters=40, timer=PerfCounterTimer(clock))
    assert (timings.warmup_iters, timings.warmup_steady) == (MAX_WARMUP_ITERS, False)
    # Calls of 3 s and 1 s in turn pass the MAX_WARMUP_SECONDS cap (10 s) at the fifth call (11 s).
    slow = TimedRunner(clock, [3000.0, 1000.0])
    timings = time_runner(slow, _images(), warmup=1, iters=1, timer=PerfCounterTimer(clock))
    assert (timings.warmup_iters, timings.warmup_steady) == (5, False)
    stats = latency_stats([1.0] * 40, 1, warmup_steady=False)
    assert stats["verdict"] == "noisy" and "no steady state" in stats["noisy_because"]


def test_time_runner_with_a_time_budget() -> None:
    clock = FakeClock()
    runner = TimedRunner(clock, [300.0])
    samples = time_runner(runner, _images(), warmup=0, seconds=5.0, timer=PerfCounterTimer(clock)).samples_ms
    assert len(samples) == 17  # the first count whose total (17 x 300 ms) reaches 5 s
    quick = TimedRunner(clock, [1.0])
    timings = time_runner(quick, _images(), warmup=0, seconds=0.001, timer=PerfCounterTimer(clock))
    assert len(timings.samples_ms) == MIN_ITERS


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"iters": 3, "seconds": 1.0}, "not both"),
        ({"iters": 0}, "--iters"),
        ({"seconds": -1.0}, "--seconds"),
        ({"warmup": -1}, "--warmup"),
    ],
)
def test_time_runner_rejects_bad_settings(kwargs: dict[str, float], match: str) -> None:
    runner = TimedRunner(FakeClock(), [1.0])
    with pytest.raises(UsageError, match=match):
        time_runner(runner, _images(), **kwargs)  # type: ignore[arg-type]


def test_a_batch_too_large_to_allocate_is_skipped_not_allocated(monkeypatch: pytest.MonkeyPatch) -> None:
    # The limit scaled down from 2 GiB to 1 MiB, so that the test allocates nothing large either way.
    monkeypatch.setattr("benchmarks.latency.MAX_BATCH_BYTES", 1 << 20)

    def opener() -> NumpyRunner:
        return NumpyRunner(lambda x: x[:, 0, 0, :5], input_shape=(3, 64, 64))

    target = Target("fake/fp32", "fp32", opener)
    result = benchmark_runners([target], batch_sizes=(8, 128), warmup=0, iters=1)
    entry = result["results"]["fake/fp32"]
    assert entry["status"] == "ok" and list(entry["latency"]) == ["8"]  # 8 images: 384 KiB
    assert entry["skipped_batches"] == {
        "128": "batch 128 of 3x64x64 images is 6 MiB of float32, more than the 1 MiB bench allocates"
        " for one call"
    }


def test_benchmark_runners_records_stats_skips_and_failures() -> None:
    clock = FakeClock()

    def explode(images: np.ndarray) -> np.ndarray:
        raise RuntimeError("out of memory")

    targets = [
        Target("fake/fp32", "fp32", lambda: TimedRunner(clock, [2.0, 4.0]), file="a.onnx", size_bytes=10),
        Target("engine/fp16", "fp16", lambda: TimedRunner(clock, [1.0], max_batch=4)),
        Target("tensorrt/fp16", "fp16", missing_tensorrt),
        Target("broken/fp32", "fp32", lambda: NumpyRunner(explode)),
    ]

    def fake_timer(runner: Runner) -> PerfCounterTimer:
        return PerfCounterTimer(clock)

    result = benchmark_runners(
        targets, batch_sizes=(1, 8), warmup=1, iters=4, threads=2, timer_factory=fake_timer
    )
    res = result["results"]

    ok = res["fake/fp32"]
    assert ok["status"] == "ok" and ok["timer"] == "perf_counter" and ok["device"] == "cpu"
    assert ok["cuda_graphs"] == {"used": False, "reason": "CPU runner"}
    assert set(ok["latency"]) == {"1", "8"}
    # Alternating 2 and 4 ms: two windows of 10 calls agree at once (20 warm-up calls, even), then
    # 2, 4, 2, 4 ms are measured.
    assert ok["latency"]["1"]["mean_ms"] == pytest.approx(3.0)
    assert ok["latency"]["8"]["throughput_ips"] == pytest.approx(8 * 1000 / 3.0)
    assert (ok["file"], ok["size_bytes"]) == ("a.onnx", 10)

    engine = res["engine/fp16"]
    assert engine["status"] == "ok" and set(engine["latency"]) == {"1"}
    assert engine["skipped_batches"] == {"8": "batch 8 outside the model's range 1..4"}

    assert res["tensorrt/fp16"]["status"] == "skipped"
    assert "TensorRT is not installed" in res["tensorrt/fp16"]["reason"]
    assert res["tensorrt/fp16"]["latency"] == {}

    assert res["broken/fp32"]["status"] == "failed"
    assert res["broken/fp32"]["reason"] == "batch 1: RuntimeError: out of memory"

    assert result["settings"]["batch_sizes"] == [1, 8]
    assert result["settings"]["threads"] == 2
    env = result["environment"]
    assert env["threads"]["requested"] == 2
    assert env["cpu"]["model"] and env["libraries"]["numpy"] == np.__version__


def test_a_runner_with_no_batch_size_in_range_is_skipped() -> None:
    clock = FakeClock()
    target = Target("engine/fp16", "fp16", lambda: TimedRunner(clock, [1.0], min_batch=16, max_batch=16))
    entry = benchmark_runners([target], batch_sizes=(1, 8), warmup=0, iters=2)["results"]["engine/fp16"]
    assert entry["status"] == "skipped"
    assert "batch 1 outside" in entry["reason"] and "batch 8 outside" in entry["reason"]


def test_benchmark_on_a_real_onnxruntime_session(tmp_path: Path) -> None:
    path = export_tiny_onnx(tiny_module(), tmp_path / "student.onnx")
    result = benchmark_runners([onnx_target(path)], batch_sizes=(1, 4), warmup=2, iters=5, threads=1)
    entry = result["results"]["onnxruntime/fp32"]
    assert entry["status"] == "ok" and entry["timer"] == "perf_counter"
    for batch in ("1", "4"):
        stats = entry["latency"][batch]
        assert stats["iters"] == 5
        assert 0 < stats["min_ms"] <= stats["p50_ms"] <= stats["p90_ms"] <= stats["p99_ms"] <= stats["max_ms"]
        assert stats["throughput_ips"] == pytest.approx(int(batch) * 1000 / stats["mean_ms"])


def test_cuda_graphs_are_enabled_only_where_supported() -> None:
    class GraphRunner(NumpyRunner):
        supports_cuda_graphs = True
        use_cuda_graphs = False

    def zeros(x: np.ndarray) -> np.ndarray:
        return np.zeros((x.shape[0], 5), np.float32)

    graph_runner = GraphRunner(zeros, "tensorrt", device="cuda")
    assert enable_cuda_graphs(graph_runner, wanted=True) == (True, None)
    assert graph_runner.use_cuda_graphs is True
    plain = NumpyRunner(zeros, "onnxruntime", device="cuda")
    used, reason = enable_cuda_graphs(plain, wanted=True)
    assert not used and reason == "the onnxruntime runner does not support CUDA graphs"
    assert enable_cuda_graphs(GraphRunner(zeros, device="cuda"), wanted=False) == (False, "disabled")


def test_cpu_runners_use_the_monotonic_clock() -> None:
    assert isinstance(choose_timer(NumpyRunner(lambda x: x)), PerfCounterTimer)


def test_cuda_events_are_recorded_on_the_runners_own_stream(monkeypatch: pytest.MonkeyPatch) -> None:
    """The events bracket the call on the stream the runner queues its work on (TensorRT's own
    stream), not torch's default stream; the timer's name says it times the whole call."""
    import types

    import benchmarks.latency as latency

    log: list[tuple[str, object]] = []

    class FakeEvent:
        def __init__(self, enable_timing: bool) -> None:
            assert enable_timing
            self.stream: object = "unrecorded"

        def record(self, stream: object = None) -> None:
            self.stream = stream
            log.append(("record", stream))

        def synchronize(self) -> None:
            log.append(("synchronize", None))

        def elapsed_time(self, end: FakeEvent) -> float:
            return 2.5

    class FakeExternalStream:
        def __init__(self, handle: int) -> None:
            self.handle = handle

    fake_cuda = types.SimpleNamespace(Event=FakeEvent, ExternalStream=FakeExternalStream)
    monkeypatch.setitem(sys.modules, "torch", types.SimpleNamespace(cuda=fake_cuda))
    monkeypatch.setattr(latency, "cuda_events_available", lambda: True)

    class StreamRunner(NumpyRunner):
        stream_handle = 77

    timer = choose_timer(StreamRunner(lambda x: x, device="cuda"))
    assert timer.name == "cuda_event_call"
    assert timer.measure(lambda: log.append(("call", None)), lambda: log.append(("sync", None))) == 2.5
    assert [entry[0] for entry in log] == ["sync", "record", "call", "record", "synchronize"]
    streams = [entry[1] for entry in log if entry[0] == "record"]
    assert all(isinstance(s, FakeExternalStream) and s.handle == 77 for s in streams)


def test_parse_batch_sizes() -> None:
    assert parse_batch_sizes("1,8,32") == (1, 8, 32)
    assert parse_batch_sizes("4, 4,1") == (4, 1)
    for bad in ("", "a,b", "0,1", "-2"):
        with pytest.raises(UsageError, match="--batch-sizes"):
            parse_batch_sizes(bad)


def test_bench_reports_captured_shapes_and_graph_fallbacks() -> None:
    clock = FakeClock()

    class GraphRunner(TimedRunner):
        supports_cuda_graphs = True
        use_cuda_graphs = False
        cuda_graph_shapes = ((1, *TINY_INPUT_SHAPE),)
        cuda_graph_error = "batch shape (8, 3, 8, 8): capture failed"

    def fake_timer(runner: Runner) -> PerfCounterTimer:
        return PerfCounterTimer(clock)

    target = Target("tensorrt/fp16", "fp16", lambda: GraphRunner(clock, [1.0], device="cuda"))
    result = benchmark_runners([target], batch_sizes=(1,), warmup=1, iters=2, timer_factory=fake_timer)
    graphs = result["results"]["tensorrt/fp16"]["cuda_graphs"]
    assert graphs["used"] is True
    assert graphs["shapes"] == [[1, *TINY_INPUT_SHAPE]]
    assert graphs["reason"] == "fell back to eager: batch shape (8, 3, 8, 8): capture failed"


# Each busy loop ends by itself after this many seconds, should the test die before it stops them.
HOG_SECONDS = 10


def test_a_cpu_hog_marks_a_real_measurement_noisy(tmp_path: Path) -> None:
    """Two busy-loop processes on this 2-core machine take the cores the ONNX Runtime session times
    its calls on. Whether the CV or p99/p50 leave their thresholds depends on the scheduler; that
    other processes held well over OTHER_CPU_SHARE_LIMIT of the CPUs' time during the measurement
    does not (two loops on two cores hold about two thirds of it), and that alone makes the
    measurement `noisy`. Only `noisy` is asserted: on a shared machine a quiet run cannot be
    promised `stable`."""
    path = export_tiny_onnx(tiny_module(), tmp_path / "student.onnx")
    loop = f"import time\nend = time.monotonic() + {HOG_SECONDS}\nwhile time.monotonic() < end:\n    pass\n"
    hogs = [subprocess.Popen([sys.executable, "-c", loop]) for _ in range(2)]
    try:
        time.sleep(0.2)  # let both loops take their cores
        result = benchmark_runners([onnx_target(path)], batch_sizes=(1,), seconds=0.5, threads=1)
        again = onnx_target(path, key="onnxruntime/again")
        same = compare_targets(onnx_target(path), again, (1,), seconds=0.5)
    finally:
        for hog in hogs:
            hog.kill()
            hog.wait()
    entry = result["results"]["onnxruntime/fp32"]
    stats = entry["latency"]["1"]
    assert stats["iters"] >= MIN_JUDGED_ITERS
    assert stats["cpu_usage"]["other_processes_share"] > OTHER_CPU_SHARE_LIMIT
    assert stats["verdict"] == "noisy"
    assert "other processes used" in stats["noisy_because"]
    assert entry["threads"]["intra_op"] == 1
    assert set(entry["machine_state"]) == {"cpu", "nvidia_gpus", "jetson"}
    # The paired comparison cancels load that slows both alike, and says there was load to cancel.
    # Other flags may join it: on a VM the hypervisor can steal time too (seen in a CI run).
    flags = same["batches"]["1"]["machine_flags"]
    assert any(flag.startswith("other processes used") for flag in flags), flags
    assert same["machine_state"]["cpu"]
