"""One writer per run directory: a second writing command fails at once, naming the holder."""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest

from deploy.errors import OutputError, UsageError
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


# --- the lock file is written: it must never be a way to write another file (issue 22 items 1, 9) ----


def _link_lock(run: Path, victim: Path, how: str) -> None:
    """Make RUN/.lock another name of `victim`: a symbolic link, a dangling one, or a hard link."""
    if how == "hard link":
        os.link(victim, run / LOCK_NAME)
    else:
        (run / LOCK_NAME).symlink_to(victim)


@pytest.mark.parametrize("how", ["symbolic link", "dangling symbolic link", "hard link"])
def test_the_lock_never_writes_through_a_link(how: str, tmp_path: Path) -> None:
    run = tmp_path / "run"
    run.mkdir()
    victim = tmp_path / "victim.txt"
    if how != "dangling symbolic link":
        victim.write_text("the victim's own words\n")
    _link_lock(run, victim, how)
    with pytest.raises(UsageError) as caught, run_lock(run, "validate"):
        pytest.fail("the lock was taken through a link")
    assert str(caught.value).startswith(f"{run / LOCK_NAME}: ")
    assert ("hard links" if how == "hard link" else "a symbolic link") in str(caught.value)
    if how == "dangling symbolic link":
        assert not victim.exists()
    else:
        assert victim.read_text() == "the victim's own words\n"


def test_the_lock_refuses_a_fifo(tmp_path: Path) -> None:
    os.mkfifo(tmp_path / LOCK_NAME)
    with pytest.raises(UsageError, match="not a regular file"), run_lock(tmp_path, "bench"):
        pytest.fail("a FIFO was taken as the lock file")


@pytest.mark.parametrize("step", ["creating", "writing"])
def test_a_full_disk_while_making_the_lock_names_the_lock_file(
    step: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_open, real_write = os.open, os.write

    def open_on_a_full_disk(path: str, flags: int, mode: int = 0o777) -> int:
        if str(path).endswith(LOCK_NAME):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        return real_open(path, flags, mode)

    def write_on_a_full_disk(fd: int, data: bytes) -> int:
        if os.readlink(f"/proc/self/fd/{fd}").endswith(LOCK_NAME):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_write(fd, data)

    if step == "creating":
        monkeypatch.setattr(os, "open", open_on_a_full_disk)
    else:
        monkeypatch.setattr(os, "write", write_on_a_full_disk)
    run = tmp_path / "new-run"
    with pytest.raises(OutputError) as caught, run_lock(run, "distill", create=True):
        pytest.fail("the lock was taken without its holder written")
    assert str(caught.value) == f"{run / LOCK_NAME}: cannot write it (No space left on device)"
    assert not run.exists()  # the run it had just made is gone again


def test_a_link_out_of_the_run_is_refused_before_the_first_write(tmp_path: Path) -> None:
    run, other = tmp_path / "run", tmp_path / "other"
    (other / "export").mkdir(parents=True)
    run.mkdir()
    (run / "export").symlink_to(other / "export")
    with pytest.raises(UsageError) as caught, run_lock(run, "export"):
        pytest.fail("a command ran with export/ leading into another run")
    assert str(caught.value).startswith(f"{run.resolve() / 'export'}: a symbolic link to {other / 'export'}")
    assert "outside the run directory" in str(caught.value)
    # Deeper down, dangling, or a file: refused alike. Inside the run, or outside the written names: fine.
    (run / "export").unlink()
    (run / "export").mkdir()
    for name, target in [
        ("export/student.onnx", other / "student.onnx"),
        ("report", tmp_path / "nowhere"),
        ("metrics.jsonl", other / "metrics.jsonl"),
    ]:
        (run / name).symlink_to(target)
        with pytest.raises(UsageError, match="outside the run directory"), run_lock(run, "report"):
            pytest.fail(f"a command ran with {name} leading out of the run")
        (run / name).unlink()
    (run / "export" / "student.onnx").symlink_to(run / "manifest.json")
    (run / "notes").symlink_to(other)
    with run_lock(run, "report"):
        pass


def test_the_holder_named_in_the_busy_message_is_only_digits_and_a_command_name(
    held_by_another_process: tuple[Path, subprocess.Popen[str]],
) -> None:
    run, _ = held_by_another_process
    # The holder's description comes from the run's own file: escape codes in it are not printed.
    (run / LOCK_NAME).write_text("1 distill\x1b[2J\nforged line\n")
    with pytest.raises(RunBusyError) as caught, run_lock(run, "export"):
        pass
    assert str(caught.value) == f"{run} is busy: another reviewkd process is writing it"


def test_a_link_named_with_a_line_break_is_named_on_one_line(tmp_path: Path) -> None:
    # Names inside a run are the run's own: the refusal quotes them rather than print a second line.
    run = tmp_path / "run"
    (run / "export").mkdir(parents=True)
    (run / "export" / "a\nforged line").symlink_to(tmp_path / "elsewhere\x1b[2J")
    with pytest.raises(UsageError) as caught, run_lock(run, "export"):
        pytest.fail("a command ran with a link out of the run")
    assert "\n" not in str(caught.value) and "\x1b" not in str(caught.value)
    assert "'" + str(run.resolve() / "export" / "a\\nforged line") + "'" in str(caught.value)
