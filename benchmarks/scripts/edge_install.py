"""The edge install against the full environment: size on disk, `reviewkd predict` cold start and RSS.

    PYTHONPATH=. .venv/bin/python -m benchmarks.scripts.edge_install [--repeats 7] [--work DIR]
        [--baseline-commit ce4fe23]

It builds a fresh virtual environment with `pip install .` of this checkout (the torch-free core),
makes a run with the full environment (`reviewkd export --model cifar_resnet20` of random weights
on 16x16 digits, fp32 ONNX), and times `reviewkd predict RUN IMAGE` as new processes, alternating
the environments call by call so that load from other processes hits all of them alike:

- edge: the edge environment's own `reviewkd` console script;
- full: this interpreter (the full environment, torch installed) on this checkout;
- before: this interpreter on the checkout at --baseline-commit (git archive), the code before the
  edge work, whose every command imported torch.

Wall time is measured around each process, and its peak RSS is its own ru_maxrss (os.wait4), both
by a small timer process that imports nothing heavy.
Sizes are `du` of the environments: the edge venv's packages without pip and setuptools (venv
tooling), the whole edge venv, and the full environment (sys.prefix). It prints a Markdown table
and writes the numbers to WORK/edge_install.json.

This script drives the command line of both environments; nothing imports it.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[2]
PACKAGE_SOURCES = ("reviewkd", "export", "deploy", "benchmarks", "pyproject.toml", "README.md")
# Installed by `python -m venv` itself, not by `pip install .`.
VENV_TOOLING = ("pip", "setuptools", "pkg_resources", "_distutils_hack", "distutils-precedence.pth")
SIZE = 16


def _env(pythonpath: Path | None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    if pythonpath is not None:
        env["PYTHONPATH"] = str(pythonpath)
    return env


def _du(path: Path) -> int:
    """Bytes on disk under `path` (du -sb), symlinks not followed."""
    return int(
        subprocess.run(["du", "-sb", str(path)], capture_output=True, text=True, check=True).stdout.split()[0]
    )


def build_edge_venv(work: Path) -> Path:
    """A fresh venv with `pip install .` of this checkout's packages."""
    source = work / "source"
    shutil.rmtree(source, ignore_errors=True)
    source.mkdir(parents=True)
    for name in PACKAGE_SOURCES:
        origin = REPO / name
        if origin.is_dir():
            shutil.copytree(origin, source / name, ignore=shutil.ignore_patterns("__pycache__", "scripts"))
        else:
            shutil.copyfile(origin, source / name)
    venv = work / "venv-edge"
    shutil.rmtree(venv, ignore_errors=True)
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "install", "--quiet", str(source)], check=True)
    return venv


def make_run(work: Path) -> tuple[Path, Path]:
    """A run exported by the full environment, and one validation image of it."""
    import torch
    from PIL import Image
    from safetensors.torch import save_file
    from sklearn.datasets import load_digits

    from reviewkd.models import create_model

    digits = load_digits()
    data = work / "digits"
    for split, picks in (("train", range(0, 200)), ("val", range(200, 240))):
        for index in picks:
            folder = data / split / str(digits.target[index])
            folder.mkdir(parents=True, exist_ok=True)
            grey = (digits.images[index] * (255.0 / 16.0)).astype(np.uint8)
            Image.fromarray(grey).convert("RGB").resize((SIZE, SIZE)).save(folder / f"{index}.png")
    torch.manual_seed(0)
    weights = work / "weights.safetensors"
    save_file(create_model("cifar_resnet20", 10).state_dict(), str(weights))
    run = work / "run"
    shutil.rmtree(run, ignore_errors=True)
    subprocess.run(
        [sys.executable, "-m", "reviewkd.app.cli", "export", "--model", "cifar_resnet20",
         "--weights", str(weights), "--input-shape", f"3,{SIZE},{SIZE}", "--out", str(run),
         "--data", str(data), "--formats", "onnx", "--check-samples", "40"],
        cwd=REPO, env=_env(REPO), check=True, capture_output=True,
    )  # fmt: skip
    return run, next((data / "val").rglob("*.png"))


def baseline_checkout(work: Path, commit: str) -> Path:
    """The repository at `commit`, unpacked (git archive) for the 'before' measurement."""
    target = work / f"checkout-{commit}"
    if not target.is_dir():
        target.mkdir(parents=True)
        archive = subprocess.run(["git", "-C", str(REPO), "archive", commit], capture_output=True, check=True)
        subprocess.run(["tar", "-x", "-C", str(target)], input=archive.stdout, check=True)
    return target


# Runs in a fresh interpreter that imports nothing heavy: a child forked from this process (which
# has loaded torch to make the run) would report this process's resident set as its own peak.
_TIMER = """
import json, os, subprocess, sys, time
started = time.perf_counter()
process = subprocess.Popen(sys.argv[1:], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
_, status, usage = os.wait4(process.pid, 0)
wall = time.perf_counter() - started
code = os.waitstatus_to_exitcode(status)
print(json.dumps({"wall": wall, "maxrss_kb": usage.ru_maxrss, "code": code,
                  "stderr": process.stderr.read().decode()[-2000:]}))
"""


def time_process(argv: list[str], cwd: Path, env: dict[str, str]) -> tuple[float, float]:
    """Run one process to completion; return (wall seconds, its own peak RSS in MB)."""
    timer = [sys.executable, "-S", "-c", _TIMER, *argv]
    out = subprocess.run(timer, cwd=cwd, env=env, capture_output=True, text=True, check=True)
    result = json.loads(out.stdout)
    if result["code"] != 0:
        raise RuntimeError(f"{' '.join(argv)} exited {result['code']}: {result['stderr']}")
    return float(result["wall"]), result["maxrss_kb"] / 1024.0  # Linux reports kilobytes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--work", type=Path, default=None, help="working folder (default: a temporary one)")
    parser.add_argument("--baseline-commit", default="ce4fe23", help="the code before the edge work")
    args = parser.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="edge-install-"))
    work.mkdir(parents=True, exist_ok=True)

    venv = build_edge_venv(work)
    run, image = make_run(work)
    before = baseline_checkout(work, args.baseline_commit)
    predict = ["predict", str(run), str(image)]
    commands = {
        "edge (pip install .)": ([str(venv / "bin" / "reviewkd"), *predict], _env(None)),
        "full env, this checkout": ([sys.executable, "-m", "reviewkd.app.cli", *predict], _env(REPO)),
        f"full env, before ({args.baseline_commit})": (
            [sys.executable, "-m", "reviewkd.app.cli", *predict],
            _env(before),
        ),
    }
    for argv, env in commands.values():  # warm the page cache once; the timed calls are all alike
        time_process(argv, work, env)
    samples: dict[str, list[tuple[float, float]]] = {name: [] for name in commands}
    for _ in range(args.repeats):
        for name, (argv, env) in commands.items():
            samples[name].append(time_process(argv, work, env))

    site = venv / "lib" / f"python{sys.version_info.major}.{sys.version_info.minor}" / "site-packages"
    tooling = sum(_du(site / name) for name in VENV_TOOLING if (site / name).exists())
    tooling += sum(_du(p) for p in site.glob("*.dist-info") if p.name.split("-")[0] in ("pip", "setuptools"))
    sizes = {
        "edge: packages of pip install .": _du(site) - tooling,
        "edge: whole venv (with pip, setuptools)": _du(venv),
        f"full env ({sys.prefix})": _du(Path(sys.prefix)),
    }
    results: dict[str, Any] = {
        "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                    "load_average": os.getloadavg(), "python": platform.python_version()},
        "sizes_mb": {k: round(v / 1e6, 1) for k, v in sizes.items()},
        "predict": {
            name: {
                "wall_s_median": round(statistics.median(w for w, _ in rows), 3),
                "wall_s_min": round(min(w for w, _ in rows), 3),
                "peak_rss_mb_median": round(statistics.median(r for _, r in rows), 1),
                "repeats": len(rows),
            }
            for name, rows in samples.items()
        },
        "edge_packages": subprocess.run(
            [str(venv / "bin" / "python"), "-m", "pip", "list", "--format", "freeze"],
            capture_output=True, text=True, check=True,
        ).stdout.split(),
    }  # fmt: skip
    (work / "edge_install.json").write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    print("| environment | `reviewkd predict` wall, median (min) | peak RSS, median |")
    print("|---|---|---|")
    for name, row in results["predict"].items():
        wall = f"{row['wall_s_median']:.2f} s ({row['wall_s_min']:.2f} s)"
        print(f"| {name} | {wall} | {row['peak_rss_mb_median']:.0f} MB |")
    print()
    print("| size on disk | MB |")
    print("|---|---|")
    for name, megabytes in results["sizes_mb"].items():
        print(f"| {name} | {megabytes:,.0f} |")
    print(f"\nload average {results['machine']['load_average']}; numbers in {work / 'edge_install.json'}")


if __name__ == "__main__":
    main()
