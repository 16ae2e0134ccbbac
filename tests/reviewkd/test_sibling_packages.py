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

FRESH = "install reviewkd into a virtual environment of its own (python -m venv, then pip install)"


def test_this_checkout_imports_its_own_packages() -> None:
    assert foreign_sibling_packages() == []


def _run(code: list[str], cwd: Path, path_first: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(path_first), str(REPO_ROOT)])}
    return subprocess.run(
        [sys.executable, *code], cwd=cwd, env=env, capture_output=True, text=True, timeout=120, check=False
    )


def _foreign_deploy(folder: Path) -> Path:
    """Another project's `deploy` package, and a plain `benchmarks.py` (a module shadows a package too)."""
    (folder / "deploy").mkdir(parents=True)
    (folder / "deploy" / "__init__.py").write_text('"""Another project\'s deploy."""\n')
    (folder / "benchmarks.py").write_text("")
    return folder


def test_a_foreign_package_on_the_path_is_named_at_import(tmp_path: Path) -> None:
    elsewhere = _foreign_deploy(tmp_path / "other_project")
    result = _run(["-c", "import reviewkd"], cwd=tmp_path, path_first=elsewhere)
    assert result.returncode != 0
    message = result.stderr.strip().splitlines()[-1]
    assert message.startswith("ImportError: reviewkd: `deploy` resolves to ")
    assert str(elsewhere / "deploy") in message and str(elsewhere / "benchmarks.py") in message
    assert "`export`" not in message  # reviewkd's own export is found
    assert "remove its folder from PYTHONPATH" in message and "virtual environment of its own" in message


def test_your_own_folder_in_the_working_directory_gets_advice_that_cures_it(tmp_path: Path) -> None:
    # A fresh virtual environment would not help: Python puts the current directory first.
    _foreign_deploy(tmp_path)
    result = _run(["-c", "import reviewkd"], cwd=tmp_path, path_first=tmp_path)
    message = result.stderr.strip().splitlines()[-1]
    assert f"`deploy` resolves to {tmp_path / 'deploy'}" in message
    assert "your own deploy in the current directory" in message
    assert "run from another directory or rename it" in message
    assert "virtual environment" not in message


def test_the_command_reports_a_clash_in_one_line(tmp_path: Path) -> None:
    _foreign_deploy(tmp_path)
    script = tmp_path / "bin" / "reviewkd"  # what pip writes for the console script
    script.parent.mkdir()
    script.write_text("import sys\nfrom reviewkd.app.cli import main\nsys.exit(main())\n")
    for code in ([str(script), "predict", "RUN", "x.png"], ["-m", "reviewkd.app.cli", "validate", "RUN"]):
        result = _run(code, cwd=tmp_path, path_first=tmp_path)
        assert result.returncode == 2, result.stderr
        assert result.stderr.count("\n") == 1, result.stderr
        assert result.stderr.startswith("reviewkd: error: `deploy` resolves to ")
        assert "Traceback" not in result.stderr


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
    assert _problems(site) == [f"another install changed deploy/__init__.py in {site.resolve()}; {FRESH}"]
    # ... and when it is uninstalled again: its files go, ours with them.
    (site / "deploy" / "__init__.py").unlink()
    (site / "deploy" / "manifest.py").write_text("# edited\n")
    assert _problems(site) == [
        f"another install changed deploy/manifest.py in {site.resolve()}; {FRESH}",
        f"another uninstall removed deploy/__init__.py from {site.resolve()}; {FRESH}",
    ]


def test_a_project_installed_before_reviewkd_is_named(tmp_path: Path) -> None:
    site = tmp_path / "site-packages"
    _installed_copy(site)
    # Another project with a `deploy` package was there first: pip overwrote the file both have
    # (deploy/manifest.py, sizes now reviewkd's) and left its other files beside reviewkd's.
    (site / "deploy" / "server.py").write_text("# another project's\n")
    (site / "deploy" / "__pycache__").mkdir()
    (site / "deploy" / "__pycache__" / "manifest.cpython-311.pyc").write_bytes(b"bytecode is not a clash")
    other = site / "webdeploy-2.0.dist-info"
    other.mkdir()
    (other / "METADATA").write_text("Metadata-Version: 2.1\nName: webdeploy\nVersion: 2.0\n")
    (other / "top_level.txt").write_text("deploy\n")
    (other / "RECORD").write_text("deploy/__init__.py,,\ndeploy/manifest.py,,\ndeploy/server.py,,\n")
    assert _problems(site) == [
        f"deploy/server.py in {site.resolve()} are not reviewkd's: another project's package of the same"
        f" name was installed there first, and pip overwrote the files both have; {FRESH}",
        "the installed project webdeploy also installs `deploy`, into the folder reviewkd's shares:"
        f" pip overwrote the files both have; {FRESH}",
    ]
