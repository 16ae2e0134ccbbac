"""Per-batch-shape CUDA graph bookkeeping shared by the GPU runners (TensorRT, torch on CUDA).

Pure Python: it decides when to warm up, capture and replay; the runners supply the CUDA calls.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable
from typing import Any, Generic, TypeVar

GraphT = TypeVar("GraphT")
ResultT = TypeVar("ResultT")


class CudaGraphCache(Generic[GraphT]):
    """One captured CUDA graph per batch shape: warm-up, then capture, then replay.

    The first call at a shape runs eagerly, which performs the lazy set-up (kernel selection,
    library handles, workspace allocation) that must not happen inside a capture. The second
    call captures a graph and replays it at once, so that call's result already comes from the
    graph. Later calls replay it. A capture that fails, or whose first replay fails, never
    reaches the caller: the graph is released, the reason is kept in `errors`, and that shape
    runs eagerly from then on. A failure of a later replay is a real error and propagates.

    Args:
        release: frees one graph and whatever it holds (static buffers, execution context).
    """

    WARM = "warm"  # ran eagerly once; the next call captures
    CAPTURED = "captured"
    FAILED = "failed"  # capture failed; eager from now on

    def __init__(self, release: Callable[[GraphT], None]) -> None:
        self._release = release
        self._states: dict[Hashable, str] = {}
        self._graphs: dict[Hashable, GraphT] = {}
        self.errors: dict[Hashable, str] = {}

    def state(self, key: Hashable) -> str | None:
        """WARM, CAPTURED or FAILED for a shape seen before; None for a new one."""
        return self._states.get(key)

    @property
    def captured(self) -> list[Hashable]:
        """The shapes that replay a captured graph, in capture order."""
        return list(self._graphs)

    @property
    def error(self) -> str | None:
        """Why capture failed, one "shape: reason" per failed shape, or None if none failed."""
        if not self.errors:
            return None
        return "; ".join(f"batch shape {key}: {why}" for key, why in self.errors.items())

    def run(
        self,
        key: Hashable,
        eager: Callable[[], ResultT],
        capture: Callable[[], GraphT],
        replay: Callable[[GraphT], ResultT],
    ) -> ResultT:
        """Return this call's result for shape `key` by the path its state calls for.

        Args:
            key: the batch shape (anything hashable that tells graphs apart).
            eager: runs the model the normal way.
            capture: records a graph whose replay computes the model on the static input.
            replay: copies this call's input in, replays `graph` and returns the copied-out result.
        """
        state = self._states.get(key)
        if state == self.CAPTURED:
            return replay(self._graphs[key])
        if state is None:
            result = eager()
            # Only a warm-up that ran counts: after an error the next call at this shape warms up again.
            self._states[key] = self.WARM
            return result
        if state == self.FAILED:
            return eager()
        graph: GraphT | None = None
        try:
            graph = capture()
            result = replay(graph)
        except Exception as exc:
            self._states[key] = self.FAILED
            self.errors[key] = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
            if graph is not None:
                self._release(graph)
            return eager()
        self._graphs[key] = graph
        self._states[key] = self.CAPTURED
        return result

    def clear(self) -> None:
        """Release every graph; the next call at any shape starts again with a warm-up."""
        graphs = list(self._graphs.values())
        self._graphs.clear()
        self._states.clear()
        for graph in graphs:
            self._release(graph)


class CudaGraphReporting:
    """What a runner with a `CudaGraphCache` in `_graphs` tells the benchmark about its graphs."""

    _graphs: CudaGraphCache[Any]

    @property
    def cuda_graph_shapes(self) -> list[Hashable]:
        """The batch shapes whose calls replay a captured CUDA graph."""
        return self._graphs.captured

    @property
    def cuda_graph_error(self) -> str | None:
        """Why a CUDA graph could not be captured (those shapes ran without one), or None."""
        return self._graphs.error
