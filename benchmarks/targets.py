"""What validate and bench measure: named formats opened on demand, with their outcome.

A `Target` pairs a report key ("<backend>/<precision>") with a function that opens its
runner. Opening lazily lets one harness decide, uniformly for every backend, whether a format
is "skipped" (its runtime or GPU is missing here: the opener raised MissingDependencyError)
or "failed" (anything else went wrong), instead of each caller guessing.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np

from deploy.errors import MissingDependencyError, UsageError
from deploy.formats import format_keys
from deploy.runners.base import Runner
from deploy.status import Status


@dataclass(frozen=True)
class Target:
    """One format to measure.

    key: the report key, "<backend>/<precision>" (unique among the targets of one run).
    precision: the precision the gates look up ("fp32", "fp16", "int8", ...).
    opener: returns a ready runner; raise MissingDependencyError when the format cannot run on
        this machine (no TensorRT, no GPU) and anything else when it is broken.
    file: the artifact's path relative to the run directory (None: not a file of the run).
    size_bytes: the artifact's size, for the report.
    sha256: the artifact's hash, so that the report can tell results of an older file apart.
    """

    key: str
    precision: str
    opener: Callable[[], Runner]
    file: str | None = None
    size_bytes: int | None = None
    sha256: str | None = None

    @property
    def backend(self) -> str:
        """The backend part of the key."""
        return self.key.split("/", 1)[0]

    def describe(self) -> dict[str, object]:
        """Return the fields every result entry repeats about the target."""
        return {
            "backend": self.backend,
            "precision": self.precision,
            "file": self.file,
            "size_bytes": self.size_bytes,
            "sha256": self.sha256,
        }


def check_unique(targets: Sequence[Target]) -> None:
    """Raise UsageError if two targets share a report key (their results would overwrite)."""
    seen: set[str] = set()
    for target in targets:
        if target.key in seen:
            raise UsageError(f"two formats share the report key {target.key!r}; give each a distinct key")
        seen.add(target.key)


def error_reason(exc: BaseException) -> str:
    """Return a one-line reason for a failure, naming the exception type where it helps."""
    message = " ".join(str(exc).split())
    if isinstance(exc, UsageError | MissingDependencyError):
        return message
    return f"{type(exc).__name__}: {message}"


class Opened(NamedTuple):
    """A target's runner (None unless status is OK), and why not."""

    runner: Runner | None
    status: Status
    reason: str | None
    bad_input: bool = False  # the file is missing, tampered with or malformed (UsageError)


def open_target(target: Target) -> Opened:
    """Open a target's runner.

    A missing runtime or GPU is "skipped"; any other exception is "failed", and a UsageError
    (a file missing, tampered with or malformed) is also flagged as bad input. The harness must
    keep measuring the other formats whatever one of them raises, hence the broad catch.
    """
    try:
        runner = target.opener()
    except MissingDependencyError as exc:
        return Opened(None, Status.SKIPPED, error_reason(exc))
    except UsageError as exc:
        return Opened(None, Status.FAILED, error_reason(exc), bad_input=True)
    except Exception as exc:
        return Opened(None, Status.FAILED, error_reason(exc))
    return Opened(runner, Status.OK, None)


def infer_in_range(runner: Runner, images: np.ndarray) -> np.ndarray:
    """Run `images` through a runner whose batch range may not cover their count.

    Engines built with a batch profile reject batches outside it; validation batches are split
    into chunks of at most `max_batch`, and a short chunk below `min_batch` is padded by
    repeating its last image, the padding's logits being dropped.
    """
    upper = runner.max_batch if runner.max_batch is not None else images.shape[0]
    outputs = []
    for start in range(0, images.shape[0], max(1, upper)):
        chunk = images[start : start + upper]
        count = chunk.shape[0]
        if count < runner.min_batch:
            pad = np.repeat(chunk[-1:], runner.min_batch - count, axis=0)
            chunk = np.concatenate([chunk, pad], axis=0)
        outputs.append(np.asarray(runner.infer(chunk))[:count])
    return np.concatenate(outputs, axis=0)


def artifact_formats(manifest: Mapping[str, Any]) -> dict[str, tuple[str, dict[str, Any]]]:
    """Return {report key: (relative path, manifest entry)} for every model file of a manifest
    that takes float32 NCHW batches, the runner contract's input, keyed as
    `deploy.formats.format_keys` names them (predict's --backend takes the same keys).
    Files with another input (export's uint8 NHWC variant) are left out: export checks them on
    their own input.
    """
    artifacts = manifest.get("artifacts", {})
    return {key: (relpath, artifacts[relpath]) for key, relpath in format_keys(artifacts).items()}
