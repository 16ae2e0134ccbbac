"""reviewkd.sibling_packages: another project's `deploy` (or `export`, `benchmarks`) is named at import."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

from reviewkd.sibling_packages import SIBLING_PACKAGES, foreign_sibling_packages
from tests.helpers import REPO_ROOT


def test_this_checkout_imports_its_own_packages() -> None:
    assert foreign_sibling_packages() == []


def _import_reviewkd(path_first: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(path_first), str(REPO_ROOT)])}
    return subprocess.run(
        [sys.executable, "-c", "import reviewkd"],
        cwd=path_first,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_a_foreign_package_of_the_same_name_is_named_at_import(tmp_path: Path) -> None:
    (tmp_path / "deploy").mkdir()
    (tmp_path / "deploy" / "__init__.py").write_text('"""Another project\'s deploy."""\n')
    (tmp_path / "benchmarks.py").write_text("")  # a plain module shadows a package too
    result = _import_reviewkd(tmp_path)
    assert result.returncode != 0
    message = result.stderr.strip().splitlines()[-1]
    assert message.startswith("ImportError: reviewkd: `deploy` resolves to ")
    assert str(tmp_path / "deploy") in message and str(tmp_path / "benchmarks.py") in message
    assert "`export`" not in message  # reviewkd's own export is found
    assert "virtual environment of its own" in message


def test_the_checked_names_are_the_installed_top_level_packages() -> None:
    pyproject = (REPO_ROOT / "pyproject.toml").read_text()
    for name in SIBLING_PACKAGES:
        assert f'"{name}*"' in pyproject, name


def _installed_copy(site: Path) -> None:
    """A wheel's layout in `site`: the four packages and a dist-info whose RECORD lists them."""
    files = {
        "reviewkd/__init__.py": b"",
        "reviewkd/sibling_packages.py": (REPO_ROOT / "reviewkd" / "sibling_packages.py").read_bytes(),
        "export/__init__.py": b"",
        "deploy/__init__.py": b'"""reviewkd\'s deploy."""\n',
        "deploy/manifest.py": b"MANIFEST_NAME = 'manifest.json'\n",
        "benchmarks/__init__.py": b"",
    }
    record = []
    for relpath, data in files.items():
        (site / relpath).parent.mkdir(parents=True, exist_ok=True)
        (site / relpath).write_bytes(data)
        digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
        record.append(f"{relpath},sha256={digest},{len(data)}")
    info = site / "reviewkd-0.1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: reviewkd\nVersion: 0.1.0\n")
    (info / "RECORD").write_text("\n".join([*record, "reviewkd-0.1.0.dist-info/RECORD,,"]) + "\n")


def _problems(site: Path) -> list[str]:
    code = "import json, reviewkd.sibling_packages as s; print(json.dumps(s.foreign_sibling_packages()))"
    result = subprocess.run(
        [sys.executable, "-c", code],
        cwd=site,
        env={**os.environ, "PYTHONPATH": str(site)},
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    return list(json.loads(result.stdout))


def test_files_another_install_overwrote_or_removed_are_named(tmp_path: Path) -> None:
    site = tmp_path / "site-packages"
    _installed_copy(site)
    assert _problems(site) == []
    # What pip does when another project with a `deploy` package installs into the same folder...
    (site / "deploy" / "__init__.py").write_text('"""Another project\'s deploy."""\n')
    assert _problems(site) == [f"another install changed deploy/__init__.py in {site.resolve()}"]
    # ... and when it is uninstalled again: its files go, ours with them.
    (site / "deploy" / "__init__.py").unlink()
    (site / "deploy" / "manifest.py").write_text("# edited\n")
    assert _problems(site) == [
        f"another install changed deploy/manifest.py in {site.resolve()}",
        f"another uninstall removed deploy/__init__.py from {site.resolve()}",
    ]
