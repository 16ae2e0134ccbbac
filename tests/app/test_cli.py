"""The command line's own contract: Ctrl-C at any moment is one line and exit 130, never a traceback."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from tests.helpers import REPO_ROOT

# Sends a real SIGINT to itself when the named module starts to import, then runs the CLI as
# `python -m reviewkd.app.cli` would: a Ctrl-C that lands during start-up, deterministically.
INTERRUPT_AT_IMPORT = textwrap.dedent(
    """
    import importlib.abc, os, runpy, signal, sys

    MODULE = sys.argv[1]

    class InterruptAt(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name == MODULE:
                sys.meta_path.remove(self)
                os.kill(os.getpid(), signal.SIGINT)
            return None

    sys.meta_path.insert(0, InterruptAt())
    sys.argv = ["reviewkd", *sys.argv[2:]]
    runpy.run_module("reviewkd.app.cli", run_name="__main__")
    """
)


@pytest.mark.parametrize(
    ("module", "argv", "who"),
    [
        ("yaml", ["teacher", "--out", "{tmp}/run"], "reviewkd"),  # while the parser imports the command
        ("torch", ["distill", "--out", "{tmp}/run"], "reviewkd distill"),  # the command's first import
    ],
)
def test_ctrl_c_during_start_up_is_one_line_and_exit_130(
    tmp_path: Path, module: str, argv: list[str], who: str
) -> None:
    done = subprocess.run(
        [sys.executable, "-c", INTERRUPT_AT_IMPORT, module, *(a.format(tmp=tmp_path) for a in argv)],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(REPO_ROOT)},
        cwd=REPO_ROOT,
        timeout=300,
        # As from a terminal: a test run started in the background by a script inherits SIGINT
        # ignored, and Python then never turns the signal into KeyboardInterrupt.
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    assert done.returncode == 130, done.stderr
    assert done.stderr == f"{who}: interrupted\n"
    assert not (tmp_path / "run").exists()


def test_no_onnx_runtime_is_exit_3_naming_each_target(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The core requires no ONNX Runtime (its CPU and GPU builds cannot share an environment): a command
    that needs one, where none is installed, names the install per target instead of a traceback."""
    from reviewkd.app.cli import main
    from tests.helpers import make_run, write_image

    run, _ = make_run(tmp_path)
    image = write_image(tmp_path / "cat.png", (16, 16))
    with pytest.MonkeyPatch.context() as patch:
        patch.setitem(sys.modules, "onnxruntime", None)  # import fails as for an absent package
        code = main(["predict", str(run), str(image)])
    err = capsys.readouterr().err
    assert code == 3
    assert err.startswith("reviewkd predict: error: no ONNX Runtime is installed") and err.count("\n") == 1
    assert all(f"reviewkd[{extra}]" in err for extra in ("cpu", "cuda12", "cuda13"))
