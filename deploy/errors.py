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


TRAIN_EXTRA_HINT = "pip install 'reviewkd[train]'"


def torch_installed() -> bool:
    """Whether torch can be imported here, found without importing it (that takes seconds)."""
    import importlib.util

    try:
        return importlib.util.find_spec("torch") is not None
    except (ImportError, ValueError):
        return False


def require_torch(action: str) -> None:
    """Raise MissingDependencyError naming the install when torch is not installed; `action` needs it."""
    if not torch_installed():
        raise MissingDependencyError(
            f"{action} needs PyTorch, which this installation lacks (the edge install serves, validates and"
            f" benchmarks exported files without it); install the training extra: {TRAIN_EXTRA_HINT}"
        )
