"""The runner contract every backend follows (Polygraphy-style: one `infer(batch) -> logits`)."""

from __future__ import annotations

import abc
from types import TracebackType

import numpy as np

from deploy.errors import UsageError


class Runner(abc.ABC):
    """A loaded model that maps a float32 (N, C, H, W) batch to float32 (N, num_classes) logits.

    Subclasses set the attributes below in their constructor and implement `_infer` and
    `close`. Callers use `infer`, which checks the batch first, and the context-manager form
    so that device memory is released.
    """

    backend: str  # "torch", "onnxruntime" or "tensorrt"
    precision: str  # "fp32", "fp16", "int8", ...
    device: str  # "cpu" or "cuda"
    input_shape: tuple[int, int, int]  # (C, H, W) the model expects
    max_batch: int | None = None  # the largest batch the model accepts; None: any
    min_batch: int = 1
    output_width: int | None = None  # logits per image, where the model file fixes it

    @property
    def name(self) -> str:
        """The report key of this runner: "<backend>/<precision>"."""
        return f"{self.backend}/{self.precision}"

    def check_input(self, images: np.ndarray) -> None:
        """Raise UsageError, saying what was expected, if `images` cannot be fed to the model."""
        if not isinstance(images, np.ndarray):
            raise UsageError(f"{self.name}: expected a numpy array, got {type(images).__name__}")
        if images.dtype != np.float32:
            raise UsageError(f"{self.name}: expected float32 images, got {images.dtype}")
        expected = "(N, " + ", ".join(str(d) for d in self.input_shape) + ")"
        if images.ndim != 4 or tuple(images.shape[1:]) != tuple(self.input_shape):
            raise UsageError(f"{self.name}: expected a batch of shape {expected}, got {images.shape}")
        batch = images.shape[0]
        if batch < self.min_batch or (self.max_batch is not None and batch > self.max_batch):
            upper = self.max_batch if self.max_batch is not None else "any"
            raise UsageError(
                f"{self.name}: batch {batch} outside the model's range {self.min_batch}..{upper}"
            )

    def infer(self, images: np.ndarray) -> np.ndarray:
        """Check `images` and return the logits as a float32 numpy array (N, num_classes)."""
        self.check_input(images)
        return self._infer(np.ascontiguousarray(images))

    @abc.abstractmethod
    def _infer(self, images: np.ndarray) -> np.ndarray:
        """Run the model on an already checked, contiguous batch."""

    def infer_outputs(self, images: np.ndarray) -> dict[str, np.ndarray]:
        """Check `images` and return every output of the model by name, as the file types them (a
        detection file's four outputs, deploy.detection.outputs)."""
        self.check_input(images)
        return self._infer_outputs(np.ascontiguousarray(images))

    def _infer_outputs(self, images: np.ndarray) -> dict[str, np.ndarray]:
        """Run the model on a checked batch and return all its outputs; runners that serve only a
        classifier's logits say so."""
        raise UsageError(f"{self.name}: this runner returns a classifier's logits only, not named outputs")

    def synchronize(self) -> None:  # noqa: B027 - a no-op default that GPU runners override
        """Wait for queued device work; a no-op on the CPU. Timers call it around `infer`."""

    @abc.abstractmethod
    def close(self) -> None:
        """Release the session, engine and device buffers. Safe to call twice."""

    def __enter__(self) -> Runner:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()
