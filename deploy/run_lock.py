"""One writer per run directory: an exclusive, non-blocking lock on RUN/.lock.

Two `reviewkd distill --out SAME` processes would otherwise both train, both append every epoch
to metrics.jsonl and overwrite each other's checkpoints. Each writing command holds the lock while
it runs; a second one fails at once with "RUN is busy: another reviewkd <cmd> (pid N) is writing
it" (exit 2). The lock is an flock(2) on RUN/.lock, so the kernel drops it when its holder exits,
even after kill -9; the file itself stays (deleting it would let two processes lock two different
files). Within one process the lock is re-entrant: `reviewkd run` holds it and calls export,
validate, bench and report, which take it again.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import functools
import inspect
import os
import stat
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import ParamSpec, TypeVar

from deploy import run_layout
from deploy.errors import OutputError, UsageError
from deploy.fileio import check_no_link_leaves

LOCK_NAME = ".lock"

# Run directories this process holds (resolved path -> [file descriptor, depth]).
_held: dict[Path, list[int]] = {}

P = ParamSpec("P")
R = TypeVar("R")


class RunBusyError(UsageError):
    """Another process holds the run directory's lock."""


# Bytes of RUN/.lock read for the holder's description ("<pid> <command>" is far shorter).
_HOLDER_BYTES = 256


def _holder(lock_file: Path) -> str:
    """'reviewkd CMD (pid N)' as the holder wrote it, or a plain description if unreadable.

    Only a few bytes are read, and only digits and a plain command name are shown: the file is the
    run's, so it may hold anything, escape sequences for the terminal included.
    """
    try:
        with open(lock_file, "rb") as handle:
            text = handle.read(_HOLDER_BYTES).decode("ascii")
    except (OSError, UnicodeDecodeError):
        return "another reviewkd process"
    pid, _, command = text.strip().partition(" ")
    if not (pid.isascii() and pid.isdigit()) or not (command.isascii() and command.isalpha()):
        return "another reviewkd process"
    return f"another reviewkd {command} (pid {pid})"


@contextlib.contextmanager
def run_lock(run_dir: str | os.PathLike[str], command: str, *, create: bool = False) -> Iterator[None]:
    """Hold RUN/.lock exclusively while the block runs; RunBusyError (exit 2) if another process has it.

    create: make the run directory first (training and export write a new one). Without it, a
        missing directory is not locked: the command itself reports it.
    In a torchrun launch only rank 0 writes files, so only rank 0 locks.
    """
    run = Path(run_dir)
    if os.environ.get("RANK", "0") != "0" or (not create and not run.is_dir()):
        yield
        return
    created = not run.exists()
    try:
        run.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputError.from_os_error(run, exc) from exc
    key = run.resolve()
    if key in _held:
        _held[key][1] += 1
        try:
            yield
        finally:
            _held[key][1] -= 1
        return
    lock_file = run / LOCK_NAME  # as the user spelled the run, for the messages
    try:
        fd = _open_lock_file(key / LOCK_NAME, lock_file)
    except UsageError:
        if created:  # nothing was written: the run directory it just made goes again
            with contextlib.suppress(OSError):
                key.rmdir()
        raise
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise RunBusyError(f"{run} is busy: {_holder(lock_file)} is writing it") from None
    try:
        # Before the command's first write: nothing it writes can follow a link out of the run.
        check_no_link_leaves(key, run_layout.WRITTEN_ENTRIES)
        try:
            os.ftruncate(fd, 0)
            os.write(fd, f"{os.getpid()} {command}\n".encode())
        except OSError as exc:
            raise OutputError.from_os_error(lock_file, exc) from exc
        _held[key] = [fd, 1]
        yield
    except BaseException:
        # A command that fails before writing anything leaves no run directory behind that it made.
        if created and os.listdir(key) == [LOCK_NAME]:
            (key / LOCK_NAME).unlink()
            key.rmdir()
        raise
    finally:
        _held.pop(key, None)
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


def _open_lock_file(path: Path, lock_file: Path) -> int:
    """Open (or create) the lock file at `path` for writing, refusing anything but a regular file of
    its own; errors name it `lock_file`.

    The lock file is truncated and written, so opening it through a symbolic link (O_NOFOLLOW
    refuses one, dangling or not) or a hard link (a second name of another file) would overwrite
    that other file, maybe outside the run; a FIFO or a device is no lock file either. O_NONBLOCK
    keeps the open of a FIFO from waiting for a reader.
    """
    flags = os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
    try:
        fd = os.open(path, flags, 0o666)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise UsageError(
                f"{lock_file}: a symbolic link; the lock file is written, so reviewkd refuses to open it"
                " through a link (remove it: the next command makes a new one)"
            ) from exc
        raise OutputError.from_os_error(lock_file, exc, aliases=(path,)) from exc
    info = os.fstat(fd)
    if not stat.S_ISREG(info.st_mode) or info.st_nlink != 1:
        os.close(fd)
        what = "not a regular file" if not stat.S_ISREG(info.st_mode) else f"{info.st_nlink} hard links"
        raise UsageError(
            f"{lock_file}: {what}; the lock file is written, so reviewkd refuses anything but a regular"
            " file with one name (remove it: the next command makes a new one)"
        )
    return fd


def locks_run(
    command: str, *, run_arg: str = "run_dir", create: bool = False
) -> Callable[[Callable[P, R]], Callable[P, R]]:
    """Decorator: the function holds run_lock(<its argument `run_arg`>, command) while it runs."""

    def decorate(function: Callable[P, R]) -> Callable[P, R]:
        signature = inspect.signature(function)

        @functools.wraps(function)
        def locked(*args: P.args, **kwargs: P.kwargs) -> R:
            run_dir = signature.bind(*args, **kwargs).arguments[run_arg]
            with run_lock(run_dir, command, create=create):
                return function(*args, **kwargs)

        return locked

    return decorate
