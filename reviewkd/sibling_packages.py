"""reviewkd installs four top-level packages: reviewkd, export, deploy and benchmarks.

The last three are generic names that another project may use too (README, "Layout"). The ways
that breaks, all checked here when `reviewkd` is imported, so the error names its cause instead
of surfacing later as a missing submodule deep in the code:

- Python finds another package of that name first: a folder or a plain module (`deploy.py`) in the
  current directory, which `python -m` and `python -c` put first on sys.path, or elsewhere on
  sys.path (PYTHONPATH, another site-packages);
- another project installed into the same site-packages wrote files over reviewkd's (pip merges
  folders of the same name without a warning) or, uninstalled, took them away: the files' sizes are
  checked against the installed wheel's RECORD (a stat per file: hashing every file would cost a
  serving device's cold start more than the whole check is worth);
- reviewkd was installed over another project's package of the same name: pip overwrote the files
  both have, and the other project's own files stay beside reviewkd's. Seen two ways: a file in the
  folder that reviewkd's RECORD does not list, and another distribution installed in the same
  folder whose top_level.txt names the package. A project that shipped only files reviewkd also
  ships, from a wheel without top_level.txt (setuptools writes one; flit, hatchling and poetry do
  not), leaves no trace but its RECORD: reading every distribution's RECORD took 110 ms in the
  edge install, a fifth of its cold-start budget, so that one case goes unseen (README, "Layout").

The installed files are read straight from the dist-info folders beside the packages, not through
importlib.metadata, whose import alone cost more than 0.1 s of every command's start in the edge
install (benchmarks/RESULTS.md, issue 22). An editable install or a checkout has no RECORD beside
its packages and nothing to overwrite. Nothing here imports the packages it checks. Run as the
`reviewkd` command, a clash is the command's one-line error (exit 2); imported as a library, it is
an ImportError.
"""

from __future__ import annotations

import csv
import importlib.util
import os
import sys
from pathlib import Path

SIBLING_PACKAGES = ("export", "deploy", "benchmarks")
DISTRIBUTION = "reviewkd"
# What `reviewkd` exits with on a clash: a broken installation is bad input (docs/METHOD.md section 8).
CLASH_EXIT_CODE = 2
_FRESH_VENV = "install reviewkd into a virtual environment of its own (python -m venv, then pip install)"


def _shadowed(home: Path) -> list[str]:
    """A sibling package Python would load from elsewhere than beside `reviewkd`, with the cure."""
    problems = []
    working_dir = Path.cwd().resolve()
    for name in SIBLING_PACKAGES:
        spec = importlib.util.find_spec(name)
        if spec is None:
            problems.append(f"`{name}` is not installed; {_FRESH_VENV}")
            continue
        locations = list(spec.submodule_search_locations or [])
        found = Path(locations[0]) if locations else Path(spec.origin or "?")
        if locations and found.resolve().parent == home:
            continue
        where = f"`{name}` resolves to {found}, not to reviewkd's {home / name}"
        if found.resolve().parent == working_dir:
            problems.append(
                f"{where}: your own {found.name} in the current directory, which `python -m` and"
                " `python -c` put first on sys.path; run from another directory or rename it"
            )
        else:
            problems.append(f"{where}: remove its folder from PYTHONPATH (or sys.path), or {_FRESH_VENV}")
    return problems


def _record(home: Path) -> tuple[Path, dict[str, int | None]] | None:
    """reviewkd's dist-info folder beside the packages in `home` and {file: size} of the
    sibling-package files its RECORD lists, when the copy being imported is a wheel install; None
    for an editable install or a checkout (no RECORD there lists reviewkd/__init__.py)."""
    for info in sorted(home.glob(f"{DISTRIBUTION}-*.dist-info")):
        try:
            rows = list(csv.reader((info / "RECORD").read_text(encoding="utf-8").splitlines()))
        except (OSError, UnicodeDecodeError, csv.Error):
            continue
        paths = {row[0]: row for row in rows if row}
        if f"{DISTRIBUTION}/__init__.py" not in paths:
            continue
        sizes = {}
        for path, row in paths.items():
            if path.split("/", 1)[0] in SIBLING_PACKAGES:
                size = row[2] if len(row) > 2 else ""
                sizes[path] = int(size) if size.isdigit() else None
        return info, sizes
    return None


def _overwritten(home: Path, recorded: dict[str, int | None]) -> list[str]:
    """Files of the sibling packages that differ from the installed wheel's RECORD, or are gone."""
    changed, missing = [], []
    for relpath, size in recorded.items():
        if size is None:
            continue
        path = home / relpath
        if not path.is_file():
            missing.append(relpath)
        elif path.stat().st_size != size:
            changed.append(relpath)
    problems = []
    if changed:
        problems.append(f"another install changed {', '.join(changed)} in {home}; {_FRESH_VENV}")
    if missing:
        problems.append(f"another uninstall removed {', '.join(missing)} from {home}; {_FRESH_VENV}")
    return problems


def _foreign_files(home: Path, recorded: dict[str, int | None]) -> list[str]:
    """Files in the sibling packages' folders that reviewkd's RECORD does not list (bytecode aside):
    left there by a project installed before reviewkd, whose files of the same names pip overwrote."""
    foreign = []
    for name in SIBLING_PACKAGES:
        for folder, subfolders, files in os.walk(home / name):
            subfolders[:] = [s for s in subfolders if s != "__pycache__"]
            relative = Path(folder).relative_to(home)
            foreign += [(relative / f).as_posix() for f in files if (relative / f).as_posix() not in recorded]
    if not foreign:
        return []
    return [
        f"{', '.join(sorted(foreign))} in {home} are not reviewkd's: another project's package of the same"
        f" name was installed there first, and pip overwrote the files both have; {_FRESH_VENV}"
    ]


def _claimed_by_others(home: Path, own: Path) -> list[str]:
    """Other distributions installed in `home` whose top_level.txt names a sibling package."""
    problems = []
    for info in sorted([*home.glob("*.dist-info"), *home.glob("*.egg-info")]):
        if info == own:
            continue
        try:
            top_level = set((info / "top_level.txt").read_text(encoding="utf-8").split())
        except (OSError, UnicodeDecodeError):
            continue
        name = info.name.split("-", 1)[0]
        for package in sorted(top_level.intersection(SIBLING_PACKAGES)):
            problems.append(
                f"the installed project {name} also installs `{package}`, into the folder reviewkd's"
                f" shares: pip overwrote the files both have; {_FRESH_VENV}"
            )
    return problems


def foreign_sibling_packages() -> list[str]:
    """One line per problem, each with its cure: a sibling package found elsewhere than beside
    `reviewkd`; its installed files changed, removed, or mixed with another project's; another
    installed project that installs a package of the same name."""
    home = Path(__file__).resolve().parent.parent
    problems = _shadowed(home)
    installed = _record(home)
    if installed is not None:
        info, recorded = installed
        problems += _overwritten(home, recorded) + _foreign_files(home, recorded)
        problems += _claimed_by_others(home, info)
    return problems


def _running_as_the_command() -> bool:
    """Whether this process is the `reviewkd` command: its console script, or `python -m reviewkd.app.cli`."""
    if Path(sys.argv[0]).name == DISTRIBUTION:
        return True
    argv = list(getattr(sys, "orig_argv", ()))
    return "-m" in argv[:-1] and argv[argv.index("-m") + 1] == "reviewkd.app.cli"


def check_sibling_packages() -> None:
    """Stop on any clash of reviewkd's top-level packages with another project's, naming each.

    Run as the `reviewkd` command: one line `reviewkd: error: ...` on stderr and exit 2, as the
    command reports any bad input (the command's own error handling cannot run: it imports the
    packages that clash). Imported as a library: ImportError.
    """
    problems = foreign_sibling_packages()
    if not problems:
        return
    message = "reviewkd: " + ". ".join(problems)
    if _running_as_the_command():
        print(f"reviewkd: error: {message.removeprefix('reviewkd: ')}", file=sys.stderr)
        raise SystemExit(CLASH_EXIT_CODE)
    raise ImportError(message)
