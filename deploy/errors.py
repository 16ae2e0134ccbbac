"""Errors every layer raises; the CLI maps each to its exit code (docs/METHOD.md section 8)."""

from __future__ import annotations


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


class OutputError(UsageError):
    """An output cannot be written: a read-only folder, a full disk, a file where a folder belongs.

    `salvage` holds what could not be saved (a measurement as JSON), for the command to print
    so that the work is not lost.
    """

    def __init__(self, message: str, salvage: str | None = None) -> None:
        super().__init__(message)
        self.salvage = salvage

    @classmethod
    def from_os_error(
        cls, target: object, exc: OSError, *, aliases: tuple[object, ...] = (), salvage: str | None = None
    ) -> OutputError:
        """One line naming `target`, and the path the system complained about when it is another one
        (not `target` itself nor one of its `aliases`, such as the temporary file written for it)."""
        reason = exc.strerror or type(exc).__name__
        same = {str(target), *(str(a) for a in aliases)}
        if exc.filename is not None and str(exc.filename) not in same:
            reason = f"{exc.filename}: {reason}"
        return cls(f"{target}: cannot write it ({reason})", salvage)


def printable(text: str) -> str:
    """`text` with every character a terminal would act on (line breaks, escape codes, other
    control and unpaired surrogate characters) shown as its Python escape, so that a file name
    or class name can neither start a new line nor move the cursor where it is printed."""
    return "".join(ch if ch.isprintable() else repr(ch)[1:-1] for ch in text)


TRAIN_EXTRA_HINT = "pip install 'reviewkd[train]'"
# The core requires no ONNX Runtime (its CPU and GPU distributions cannot be installed together):
# each install target's extra brings one (deploy/install_targets.py).
RUNTIME_MISSING = (
    "no ONNX Runtime is installed; install the one for this machine: pip install 'reviewkd[cpu]',"
    " 'reviewkd[cuda12]' or 'reviewkd[cuda13]' (a Jetson: NVIDIA's onnxruntime-gpu wheel), or run"
    " `reviewkd doctor`"
)
