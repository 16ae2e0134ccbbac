"""reviewkd installs four top-level packages: reviewkd, export, deploy and benchmarks.

The last three are generic names that another project may use too (README, "Layout"). Two ways
that breaks, both checked here when `reviewkd` is imported, so the error names its cause instead
of surfacing later as a missing submodule deep in the code:

- Python finds another project's package of that name first (earlier on sys.path, or a plain
  module such as `deploy.py`);
- another project installed into the same site-packages wrote files over reviewkd's (pip merges
  folders of the same name without a warning) or, uninstalled, took them away. The files' sizes
  are checked against the installed wheel's RECORD (a stat per file: hashing every file would cost
  a serving device's cold start more than the whole check is worth); an editable install or a
  checkout has no such record, and nothing to overwrite.

Nothing here imports the packages it checks.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
from pathlib import Path

SIBLING_PACKAGES = ("export", "deploy", "benchmarks")
DISTRIBUTION = "reviewkd"


def _shadowed(home: Path) -> list[str]:
    problems = []
    for name in SIBLING_PACKAGES:
        spec = importlib.util.find_spec(name)
        if spec is None:
            problems.append(f"`{name}` is not installed")
            continue
        locations = list(spec.submodule_search_locations or [])
        found = Path(locations[0]) if locations else Path(spec.origin or "?")
        if not locations or found.resolve().parent != home:
            problems.append(f"`{name}` resolves to {found}, not to reviewkd's {home / name}")
    return problems


def _overwritten(home: Path) -> list[str]:
    """Files of the sibling packages that differ from the installed wheel's RECORD, or are gone."""
    try:
        distribution = importlib.metadata.distribution(DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError:
        return []
    own_init = Path(str(distribution.locate_file("reviewkd/__init__.py")))
    if not own_init.is_file() or own_init.resolve().parent.parent != home:
        return []  # an editable install, or a wheel that is not the copy being imported
    changed, missing = [], []
    for file in distribution.files or ():
        if file.size is None or file.parts[0] not in SIBLING_PACKAGES:
            continue
        path = Path(str(distribution.locate_file(file)))
        if not path.is_file():
            missing.append(str(file))
        elif path.stat().st_size != file.size:
            changed.append(str(file))
    problems = []
    if changed:
        problems.append(f"another install changed {', '.join(changed)} in {home}")
    if missing:
        problems.append(f"another uninstall removed {', '.join(missing)} from {home}")
    return problems


def foreign_sibling_packages() -> list[str]:
    """One line per problem: a sibling package found elsewhere than beside `reviewkd`, or its
    installed files changed or removed by another project."""
    home = Path(__file__).resolve().parent.parent
    return _shadowed(home) + _overwritten(home)


def check_sibling_packages() -> None:
    """Raise ImportError naming every clash of reviewkd's top-level packages with another project's."""
    problems = foreign_sibling_packages()
    if problems:
        raise ImportError(
            "reviewkd: " + "; ".join(problems) + ". Another project's package of the same name clashes "
            "with reviewkd's; install reviewkd into a virtual environment of its own (README, Layout)."
        )
