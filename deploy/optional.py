"""Optional dependencies: the one way to import one inside a function, and the error that names the
install when it is missing (MissingDependencyError, exit 3).

Every other import sits at the top of its module. A function-local import is for an optional
dependency only, and is written inside `with optional_import(action):`, which turns the
ModuleNotFoundError of a module listed in INSTALL_HINTS into one line naming what to install. The
import statement itself stays, rather than a `require("torch")` that returns a module: mypy then
still checks every call into the imported module. Where an optional module's absence is an answer
rather than an error (a probe falling back to the next way of asking), `optional_module` returns it
or None.

A project module that imports an optional dependency at its top (the training stack imports torch),
or is listed in ADAPTERS, counts as one: the edge install's commands import it only when they run
it, so that they start, and work, without torch. tests/test_import_rules.py checks both rules over
the four packages.
"""

from __future__ import annotations

import importlib
import importlib.util
from collections.abc import Iterator
from contextlib import contextmanager
from types import ModuleType

from deploy.errors import RUNTIME_MISSING, TRAIN_EXTRA_HINT, MissingDependencyError
from deploy.install_targets import GPU_INSTALL_HINT

_TRAIN = f"install the training extra: {TRAIN_EXTRA_HINT}"
_GPU = f"install it with {GPU_INSTALL_HINT}"

# Top-level name of each optional dependency -> how to install it.
INSTALL_HINTS: dict[str, str] = {
    **dict.fromkeys(("torch", "torchvision", "onnxscript", "safetensors", "sklearn", "tqdm"), _TRAIN),
    "timm": "install it: pip install timm",
    "onnxruntime": RUNTIME_MISSING,
    "tensorrt": _GPU,
    "cuda": _GPU,
    "pynvml": "install it: pip install nvidia-ml-py",
    "matplotlib": "install the plots extra: pip install 'reviewkd[plots]'",
    "pycocotools": "install the detection extra: pip install 'reviewkd[detection]'",
    "tritonclient": "install it: pip install 'tritonclient[grpc]'",
}

# Project modules that drive an optional dependency and import it inside their functions (so that
# their pure logic is tested without it) -> that dependency: importing one counts as importing it. At
# the top of deploy.runners, the TensorRT runner's own imports (the GPU probe, `reviewkd doctor`'s
# diagnosis and importlib.metadata) would slow the cold start of `reviewkd predict` on an ONNX file.
ADAPTERS: dict[str, str] = {"deploy.runners.tensorrt_runner": "tensorrt"}


def missing_dependency(module: str, action: str) -> MissingDependencyError:
    """The error for `action`, which needs the optional dependency `module` (a dotted name is fine)."""
    top = module.split(".")[0]
    if top == "onnxruntime":
        return MissingDependencyError(RUNTIME_MISSING)  # says all there is to do, whatever the action
    return MissingDependencyError(
        f"{action} needs {top}, which this installation lacks; {INSTALL_HINTS[top]}"
    )


@contextmanager
def optional_import(action: str) -> Iterator[None]:
    """Wrap the function-local import of an optional dependency (or of a project module that imports
    one at its top): when one listed in INSTALL_HINTS is missing, raise MissingDependencyError naming
    `action` and the install. Any other missing module is a broken installation and propagates."""
    try:
        yield
    except ModuleNotFoundError as exc:
        top = (exc.name or "").split(".")[0]
        if top not in INSTALL_HINTS:
            raise
        raise missing_dependency(top, action) from None


def optional_module(name: str) -> ModuleType | None:
    """The optional module `name` imported, or None when it (or a module it needs) is not installed."""
    try:
        return importlib.import_module(name)
    except ImportError:
        return None


def installed(module: str) -> bool:
    """Whether `module` can be imported here, found without importing it (torch takes seconds)."""
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def require_installed(module: str, action: str) -> None:
    """Raise the missing-dependency error unless `module` is installed; `action` needs it. For a check
    made before the work starts, when the import itself happens later or in another process."""
    if not installed(module):
        raise missing_dependency(module, action)
