"""Errors every layer raises; the CLI maps each to its exit code (docs/METHOD.md section 8)."""


class ReviewKDError(Exception):
    """Base class: a failure the user can act on, reported as one line without a traceback."""

    exit_code = 2


class UsageError(ReviewKDError):
    """Bad input: a missing or corrupt file, an unknown option value, an impossible request."""

    exit_code = 2


class GateFailedError(ReviewKDError):
    """A validation gate (accuracy, parity) failed."""

    exit_code = 1


class MissingDependencyError(ReviewKDError):
    """An optional dependency (TensorRT, a CUDA GPU) is missing for what was asked."""

    exit_code = 3
