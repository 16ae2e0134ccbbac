"""One writer per run directory: a second writing command fails at once, naming the holder."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest

from deploy.run_lock import LOCK_NAME, RunBusyError, locks_run, run_lock
from tests.helpers import REPO_ROOT

HOLDER = textwrap.dedent(
    """
    import sys, time
    from deploy.run_lock import run_lock
    with run_lock(sys.argv[1], sys.argv[2], create=True):
        print("held", flush=True)
        time.sleep(120)
    """
)


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(REPO_ROOT)}


@pytest.fixture
def held_by_another_process(tmp_path: Path) -> Iterator[tuple[Path, subprocess.Popen[str]]]:
    """A separate process holding RUN's lock as `reviewkd distill` (killed with -9 afterwards)."""
    run = tmp_path / "run"
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(run), "distill"],
        stdout=subprocess.PIPE,
        text=True,
        env=_env(),
        cwd=REPO_ROOT,
    )
    assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
    yield run, holder
    holder.kill()
    holder.wait()


def test_a_second_writer_is_refused_naming_the_holder(
    held_by_another_process: tuple[Path, subprocess.Popen[str]],
) -> None:
    run, holder = held_by_another_process
    with pytest.raises(RunBusyError) as caught, run_lock(run, "export"):
        pass
    assert str(caught.value) == f"{run} is busy: another reviewkd distill (pid {holder.pid}) is writing it"


def test_distill_into_a_busy_run_exits_2_before_any_work(
    held_by_another_process: tuple[Path, subprocess.Popen[str]],
) -> None:
    run, holder = held_by_another_process
    before = sorted(p.name for p in run.iterdir())
    done = subprocess.run(
        [sys.executable, "-m", "reviewkd.app.cli", "distill", "--out", str(run), "train.epochs=1"],
        capture_output=True,
        text=True,
        env=_env(),
        cwd=REPO_ROOT,
        timeout=300,
    )
    assert done.returncode == 2, done.stderr
    assert done.stderr.strip() == (
        f"reviewkd distill: error: {run} is busy: another reviewkd distill (pid {holder.pid}) is writing it"
    )
    assert sorted(p.name for p in run.iterdir()) == before == [LOCK_NAME]


def test_the_lock_is_free_again_after_its_holder_is_killed(
    held_by_another_process: tuple[Path, subprocess.Popen[str]],
) -> None:
    run, holder = held_by_another_process
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    with run_lock(run, "validate"):
        assert (run / LOCK_NAME).read_text() == f"{os.getpid()} validate\n"


def test_the_lock_is_reentrant_within_a_process(tmp_path: Path) -> None:
    @locks_run("export")
    def export_run(run_dir: Path) -> str:
        return (run_dir / LOCK_NAME).read_text()

    with run_lock(tmp_path, "run"):
        assert export_run(tmp_path) == f"{os.getpid()} run\n"
    # Released: another process can take it now.
    taken = subprocess.run(
        [sys.executable, "-c", HOLDER.replace("time.sleep(120)", "pass"), str(tmp_path), "bench"],
        capture_output=True,
        text=True,
        env=_env(),
        cwd=REPO_ROOT,
        timeout=60,
    )
    assert taken.returncode == 0 and taken.stdout.strip() == "held", taken.stderr


def test_a_missing_run_is_not_created_by_a_reading_stage(tmp_path: Path) -> None:
    with run_lock(tmp_path / "absent", "validate"):
        pass
    assert not (tmp_path / "absent").exists()
