"""benchmarks.trt_breakdown: the per-iteration event loop and its summary on a fake engine whose GPU
and host clocks move by scripted amounts, and bench's TensorRT entries (no TensorRT or GPU here)."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from benchmarks import trt_breakdown
from benchmarks.latency import PerfCounterTimer, benchmark_runners
from benchmarks.machine_state import is_unknown
from benchmarks.targets import Target
from benchmarks.trt_breakdown import (
    IterationTimes,
    phase_text,
    run_breakdown,
    summarize_breakdown,
    time_iteration,
)
from tests.helpers import NumpyRunner


class FakeEngineOps:
    """A stream on a fake GPU clock: each copy or enqueue moves it by the next scripted milliseconds;
    the host clock (ns) moves by the enqueue call's own time, and by the rest of the latency at wait()."""

    def __init__(self, phases_ms: list[tuple[float, float, float, float]]) -> None:
        self.phases = phases_ms  # (h2d, compute, d2h, enqueue) per iteration, cycling
        self.iteration = 0
        self.gpu_ms = 0.0
        self.host_ns = 0
        self.events: dict[int, float] = {}
        self.calls: list[str] = []

    def _phase(self) -> tuple[float, float, float, float]:
        return self.phases[self.iteration % len(self.phases)]

    def clock(self) -> int:
        return self.host_ns

    def record(self, slot: int) -> None:
        self.calls.append(f"record{slot}")
        self.events[slot] = self.gpu_ms

    def copy_inputs(self) -> None:
        self.calls.append("copy_inputs")
        self.gpu_ms += self._phase()[0]

    def enqueue(self) -> None:
        self.calls.append("enqueue")
        self.gpu_ms += self._phase()[1]
        self.host_ns += round(self._phase()[3] * 1e6)

    def copy_outputs(self) -> None:
        self.calls.append("copy_outputs")
        self.gpu_ms += self._phase()[2]

    def wait(self) -> None:
        self.calls.append("wait")
        h2d, compute, d2h, enqueue = self._phase()
        self.host_ns += round((h2d + compute + d2h - enqueue) * 1e6)
        self.iteration += 1

    def elapsed_ms(self, start: int, end: int) -> float:
        return self.events[end] - self.events[start]


def test_one_iteration_records_four_events_around_the_copies_and_times_the_enqueue() -> None:
    ops = FakeEngineOps([(0.25, 2.0, 0.125, 0.05)])
    times = time_iteration(ops, ops.clock)
    assert ops.calls == [
        "record0",
        "copy_inputs",
        "record1",
        "enqueue",
        "record2",
        "copy_outputs",
        "record3",
        "wait",
    ]
    assert times == IterationTimes(h2d_ms=0.25, compute_ms=2.0, d2h_ms=0.125, enqueue_ms=pytest.approx(0.05))
    assert times.latency_ms == 2.375


def test_the_breakdown_summarises_each_phase_and_the_throughput() -> None:
    # 40 iterations alternating two phase sets; warm-up iterations are not counted.
    ops = FakeEngineOps([(0.5, 2.0, 0.5, 0.1), (0.5, 4.0, 0.5, 0.1)])
    graph = {"used": True, "reason": None}
    summary = run_breakdown(ops, 8, warmup=4, iters=40, cuda_graph=graph, clock=ops.clock)
    assert ops.iteration == 44 and summary["iters"] == 40 and summary["batch_size"] == 8
    assert summary["h2d_ms"]["p50_ms"] == 0.5 and summary["d2h_ms"]["max_ms"] == 0.5
    assert summary["compute_ms"]["mean_ms"] == pytest.approx(3.0)
    assert summary["compute_ms"]["p50_ci_ms"][0] <= 3.0 <= summary["compute_ms"]["p50_ci_ms"][1]
    assert summary["latency_ms"]["min_ms"] == 3.0 and summary["latency_ms"]["max_ms"] == 5.0
    assert summary["enqueue_ms"]["p50_ms"] == pytest.approx(0.1)
    # Wall time: 20 x 3 ms + 20 x 5 ms = 160 ms for 40 x 8 images.
    assert summary["wall_seconds"] == pytest.approx(0.16)
    assert summary["throughput_ips"] == pytest.approx(320 / 0.16)
    assert summary["queries_per_second"] == pytest.approx(40 / 0.16)
    assert summary["gpu_compute_share"] == pytest.approx(120 / 160)
    assert summary["cuda_graph"] == graph
    # Compute alternating 2 and 4 ms: the latency's CV is about 0.25, so noisy.
    assert summary["verdict"] == "noisy" and "CV" in summary["noisy_because"]
    line = phase_text(summary)
    assert line.startswith(
        "H2D p50 0.500 ms, GPU compute p50 3.000 ms, D2H p50 0.500 ms, latency p50 4.000 ms"
    )
    assert "2000.0 images/s; CUDA graph; noisy" in line


def test_a_steady_engine_is_stable_and_says_when_no_graph_ran() -> None:
    ops = FakeEngineOps([(0.2, 1.0, 0.1, 0.05)])
    summary = run_breakdown(
        ops, 1, warmup=0, iters=50, cuda_graph={"used": False, "reason": "disabled"}, clock=ops.clock
    )
    assert summary["verdict"] == "stable" and summary["latency_ms"]["cv"] == pytest.approx(0.0, abs=1e-12)
    assert "no CUDA graph (disabled)" in phase_text(summary)


def test_a_breakdown_needs_iterations_and_time() -> None:
    with pytest.raises(ValueError, match="at least one iteration"):
        summarize_breakdown([], 1, 1.0, {"used": False, "reason": None})
    with pytest.raises(ValueError, match="positive wall time"):
        summarize_breakdown([IterationTimes(1.0, 1.0, 1.0, 0.1)], 1, 0.0, {"used": False, "reason": None})
    with pytest.raises(ValueError, match="at least one timed iteration"):
        run_breakdown(FakeEngineOps([(1.0, 1.0, 1.0, 0.1)]), 1, warmup=0, iters=0, cuda_graph={})


class FakeTensorRTRunner(NumpyRunner):
    """A "tensorrt" runner on the CPU clock, with an engine object the breakdown is handed."""

    engine = object()


def test_bench_gives_a_tensorrt_entry_its_breakdown_or_why_not(monkeypatch: pytest.MonkeyPatch) -> None:
    handed: list[Any] = []

    def fake_breakdown(engine: Any, batch_size: int, **kwargs: Any) -> dict[str, Any]:
        handed.append((engine, batch_size, kwargs))
        return {"batch_size": batch_size}

    monkeypatch.setattr("benchmarks.latency.tensorrt_breakdown", fake_breakdown)
    runner = FakeTensorRTRunner(
        lambda x: np.zeros((x.shape[0], 5), np.float32), "tensorrt", "fp16", device="cuda"
    )
    target = Target("tensorrt/fp16", "fp16", lambda: runner)
    timer = PerfCounterTimer()
    result = benchmark_runners(
        [target], batch_sizes=(1, 2), warmup=0, iters=3, cuda_graphs=False, timer_factory=lambda r: timer
    )
    entry = result["results"]["tensorrt/fp16"]
    assert entry["trt_breakdown"] == {"1": {"batch_size": 1}, "2": {"batch_size": 2}}
    assert handed[0] == (FakeTensorRTRunner.engine, 1, {"warmup": 0, "iters": 3, "cuda_graph": False})

    # Without cuda-python the breakdown is unknown, with the reason, and the latency still stands.
    monkeypatch.undo()
    monkeypatch.setattr(trt_breakdown, "import_cudart", lambda: None)
    result = benchmark_runners([target], batch_sizes=(1,), warmup=0, iters=3, timer_factory=lambda r: timer)
    entry = result["results"]["tensorrt/fp16"]
    assert (
        is_unknown(entry["trt_breakdown"]["1"]) and "cuda-bindings" in entry["trt_breakdown"]["1"]["unknown"]
    )
    assert entry["latency"]["1"]["iters"] == 3


def test_bench_gives_other_runners_no_breakdown() -> None:
    runner = NumpyRunner(lambda x: np.zeros((x.shape[0], 5), np.float32))
    result = benchmark_runners(
        [Target("onnxruntime/fp32", "fp32", lambda: runner)], batch_sizes=(1,), iters=3
    )
    assert "trt_breakdown" not in result["results"]["onnxruntime/fp32"]
