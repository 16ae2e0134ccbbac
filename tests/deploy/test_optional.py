"""deploy.optional: a missing optional dependency is exit 3 naming the install; anything else propagates."""

from __future__ import annotations

import sys

import pytest

from deploy.errors import RUNTIME_MISSING, MissingDependencyError
from deploy.optional import installed, optional_import, optional_module, require_installed


def test_a_missing_optional_dependency_names_action_and_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "torch", None)  # how Python marks a module it cannot import
    with pytest.raises(MissingDependencyError) as caught, optional_import("training"):
        import torch  # noqa: F401
    assert caught.value.exit_code == 3
    assert str(caught.value) == (
        "training needs torch, which this installation lacks; install the training extra:"
        " pip install 'reviewkd[train]'"
    )


def test_a_missing_onnx_runtime_names_each_install_target(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    with pytest.raises(MissingDependencyError) as caught, optional_import("ONNX Runtime"):
        import onnxruntime  # noqa: F401
    assert str(caught.value) == RUNTIME_MISSING


def test_a_missing_module_that_is_no_optional_dependency_propagates(monkeypatch: pytest.MonkeyPatch) -> None:
    # A core module missing is a broken installation, not an extra to install: the traceback stays.
    monkeypatch.setitem(sys.modules, "yaml", None)
    with pytest.raises(ModuleNotFoundError), optional_import("reading a config"):
        import yaml  # noqa: F401


def test_probes_answer_without_raising(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "pynvml", None)
    assert optional_module("pynvml") is None
    assert optional_module("json") is sys.modules["json"]
    assert not installed("pynvml") and installed("numpy")
    with pytest.raises(MissingDependencyError) as caught:
        require_installed("pynvml", "the GPU probe")
    assert str(caught.value).startswith("the GPU probe needs pynvml, which this installation lacks")
    require_installed("numpy", "anything")
