"""The edge install against the full environment: size on disk, `reviewkd predict` cold start and RSS.

    PYTHONPATH=. .venv/bin/python -m benchmarks.scripts.edge_install [--repeats 7] [--work DIR]
        [--edge-baseline-commit b8a553c] [--baseline-commit ce4fe23]

It builds a fresh virtual environment with `pip install '.[cpu]'` of this checkout (the torch-free core;
pip resolves today's releases of its dependencies, as a new user's install would), makes a run with
the full environment (`reviewkd export --model cifar_resnet20` of random weights on 16x16 digits,
fp32 ONNX), and times `reviewkd predict RUN IMAGE` as new processes, alternating the environments
call by call so that load from other processes hits all of them alike:

- edge: the edge environment's own `reviewkd` console script;
- edge, COMMIT (with --edge-baseline-commit): a second fresh `pip install '.[cpu]'` venv of the checkout at
  COMMIT (git archive), the same dependency releases, to compare code with code on the edge;
- full: this interpreter (the full environment, torch installed) on this checkout;
- before (with --baseline-commit): this interpreter on the checkout at that commit, e.g. ce4fe23,
  the code before the edge work, whose every command imported torch.

Each edge environment's predict is also run once under `python -X importtime`: the JSON records the
slowest imports, and whether onnx, ml_dtypes or torch were imported at all; and the versions of the
packages that decide the import time. What else ran on the machine meanwhile (load averages at the
start and the end, the busiest other processes) goes into the JSON too: on a shared machine a
timing means little without it.

Wall time is measured around each process, its CPU time (user + system) and peak RSS are its own
ru_utime + ru_stime and ru_maxrss (os.wait4): on a loaded machine the wall time waits for the CPU,
while the CPU time is close to what the process costs an idle one. All
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
from PIL import Image

from deploy.optional import optional_import

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


# The install target of a CPU-only device: the torch-free core with ONNX Runtime.
EDGE_EXTRA = "cpu"
# Modules whose presence in a serving process's imports is a cold-start regression.
HEAVY_IMPORTS = ("torch", "torchvision", "onnx", "ml_dtypes", "onnxscript")
# Distributions whose releases decide predict's import time.
VERSIONED = ("numpy", "onnxruntime", "onnx", "ml_dtypes", "pillow", "pyyaml")


def build_edge_venv(work: Path, checkout: Path = REPO, name: str = "venv-edge") -> Path:
    """A fresh venv named `name` with `pip install '.[cpu]'` of `checkout`'s packages."""
    source = work / f"source-{name}"
    shutil.rmtree(source, ignore_errors=True)
    source.mkdir(parents=True)
    for package in PACKAGE_SOURCES:
        origin = checkout / package
        if origin.is_dir():
            shutil.copytree(origin, source / package, ignore=shutil.ignore_patterns("__pycache__", "scripts"))
        else:
            shutil.copyfile(origin, source / package)
    venv = work / name
    shutil.rmtree(venv, ignore_errors=True)
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    # The CPU target (README, "Install"); a checkout from before the install targets has no `cpu` extra,
    # which pip reports and skips: its core then holds onnxruntime itself.
    target = f"{source}[{EDGE_EXTRA}]"
    subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "install", "--quiet", target], check=True)
    return venv


def make_run(work: Path) -> tuple[Path, Path]:
    """A run exported by the full environment, and one validation image of it."""
    with optional_import("making the edge install's run"):
        import torch
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
print(json.dumps({"wall": wall, "cpu": usage.ru_utime + usage.ru_stime, "maxrss_kb": usage.ru_maxrss,
                  "code": code,
                  "stderr": process.stderr.read().decode()[-2000:]}))
"""


def import_profile(python: Path, argv: list[str], cwd: Path, runs: int = 5) -> dict[str, Any]:
    """Run `python -X importtime ARGV` `runs` times: per top-level import its median cumulative ms
    (the ten slowest), and which of HEAVY_IMPORTS were imported at all."""
    samples: dict[str, list[float]] = {}
    imported: set[str] = set()
    codes = set()
    for _ in range(runs):
        completed = subprocess.run(
            [str(python), "-X", "importtime", *argv], cwd=cwd, env=_env(None), capture_output=True, text=True
        )
        codes.add(completed.returncode)
        for line in completed.stderr.splitlines():
            # "import time: <self us> | <cumulative us> | <name>", the name indented two spaces a level
            fields = line.removeprefix("import time:").split("|")
            if not line.startswith("import time:") or len(fields) != 3 or not fields[1].strip().isdigit():
                continue
            module = fields[2][1:]
            imported.add(module.strip().split(".")[0])
            if not module.startswith(" "):
                samples.setdefault(module, []).append(int(fields[1]) / 1000.0)
    medians = {name: statistics.median(values) for name, values in samples.items()}
    slowest = sorted(medians.items(), key=lambda item: item[1], reverse=True)[:10]
    return {
        "exit_codes": sorted(codes),
        "runs": runs,
        "slowest_top_level_ms_median": {name: round(ms, 1) for name, ms in slowest},
        "heavy_imported": sorted(set(HEAVY_IMPORTS) & imported),
    }


def versions(python: Path) -> dict[str, str | None]:
    """The installed versions of VERSIONED in the environment of `python`."""
    script = (
        "import importlib.metadata as m, json, sys\n"
        "def v(name):\n"
        "    try:\n        return m.version(name)\n"
        "    except m.PackageNotFoundError:\n        return None\n"
        "print(json.dumps({name: v(name) for name in sys.argv[1:]}))"
    )
    argv = [str(python), "-c", script, *VERSIONED]
    return dict(json.loads(subprocess.run(argv, env=_env(None), capture_output=True, text=True).stdout))


def machine_activity() -> dict[str, Any]:
    """The load averages and the five busiest processes (by CPU share since they started) right now."""
    listing = subprocess.run(
        ["ps", "-eo", "pcpu,etime,args", "--sort=-pcpu", "--no-headers"], capture_output=True, text=True
    ).stdout.splitlines()
    busiest = [" ".join(line.split())[:160] for line in listing if line.strip()][:5]
    return {"load_average": os.getloadavg(), "busiest_processes": busiest}


def time_process(argv: list[str], cwd: Path, env: dict[str, str]) -> tuple[float, float, float]:
    """Run one process to completion; return (wall seconds, its own peak RSS in MB, its CPU seconds)."""
    timer = [sys.executable, "-S", "-c", _TIMER, *argv]
    out = subprocess.run(timer, cwd=cwd, env=env, capture_output=True, text=True, check=True)
    result = json.loads(out.stdout)
    if result["code"] != 0:
        raise RuntimeError(f"{' '.join(argv)} exited {result['code']}: {result['stderr']}")
    return float(result["wall"]), result["maxrss_kb"] / 1024.0, float(result["cpu"])  # RSS in kB on Linux


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--work", type=Path, default=None, help="working folder (default: a temporary one)")
    parser.add_argument(
        "--edge-baseline-commit",
        default=None,
        help="also time a fresh `pip install '.[cpu]'` venv of the checkout at this commit (older edge code)",
    )
    parser.add_argument(
        "--baseline-commit", default=None, help="also time the full environment on the code at this commit"
    )
    args = parser.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="edge-install-"))
    work.mkdir(parents=True, exist_ok=True)

    activity_start = machine_activity()
    venv = build_edge_venv(work)
    edge_venvs = {"edge (pip install '.[cpu]')": venv}
    if args.edge_baseline_commit:
        checkout = baseline_checkout(work, args.edge_baseline_commit)
        edge_venvs[f"edge, before ({args.edge_baseline_commit})"] = build_edge_venv(
            work, checkout, f"venv-edge-{args.edge_baseline_commit}"
        )
    run, image = make_run(work)
    predict = ["predict", str(run), str(image)]
    commands = {name: ([str(v / "bin" / "reviewkd"), *predict], _env(None)) for name, v in edge_venvs.items()}
    commands["full env, this checkout"] = ([sys.executable, "-m", "reviewkd.app.cli", *predict], _env(REPO))
    if args.baseline_commit:
        before = baseline_checkout(work, args.baseline_commit)
        commands[f"full env, before ({args.baseline_commit})"] = (
            [sys.executable, "-m", "reviewkd.app.cli", *predict],
            _env(before),
        )
    for argv, env in commands.values():  # warm the page cache once; the timed calls are all alike
        time_process(argv, work, env)
    samples: dict[str, list[tuple[float, float, float]]] = {name: [] for name in commands}
    for _ in range(args.repeats):
        for name, (argv, env) in commands.items():
            samples[name].append(time_process(argv, work, env))
    activity_end = machine_activity()
    imports = {
        name: import_profile(v / "bin" / "python", ["-m", "reviewkd.app.cli", *predict], work)
        for name, v in edge_venvs.items()
    }
    package_versions = {name: versions(v / "bin" / "python") for name, v in edge_venvs.items()}
    package_versions["full env"] = versions(Path(sys.executable))

    site = venv / "lib" / f"python{sys.version_info.major}.{sys.version_info.minor}" / "site-packages"
    tooling = sum(_du(site / name) for name in VENV_TOOLING if (site / name).exists())
    tooling += sum(_du(p) for p in site.glob("*.dist-info") if p.name.split("-")[0] in ("pip", "setuptools"))
    sizes = {
        "edge: packages of pip install '.[cpu]'": _du(site) - tooling,
        "edge: whole venv (with pip, setuptools)": _du(venv),
        f"full env ({sys.prefix})": _du(Path(sys.prefix)),
    }
    results: dict[str, Any] = {
        "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                    "python": platform.python_version()},
        "activity": {"start": activity_start, "end": activity_end},
        "versions": package_versions,
        "imports": imports,
        "sizes_mb": {k: round(v / 1e6, 1) for k, v in sizes.items()},
        "predict": {
            name: {
                "wall_s_median": round(statistics.median(w for w, _, _ in rows), 3),
                "wall_s_min": round(min(w for w, _, _ in rows), 3),
                "cpu_s_median": round(statistics.median(c for _, _, c in rows), 3),
                "peak_rss_mb_median": round(statistics.median(r for _, r, _ in rows), 1),
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
    print("| environment | `reviewkd predict` wall, median (min) | CPU, median | peak RSS, median |")
    print("|---|---|---|---|")
    for name, row in results["predict"].items():
        wall = f"{row['wall_s_median']:.2f} s ({row['wall_s_min']:.2f} s)"
        print(f"| {name} | {wall} | {row['cpu_s_median']:.2f} s | {row['peak_rss_mb_median']:.0f} MB |")
    print()
    print("| size on disk | MB |")
    print("|---|---|")
    for name, megabytes in results["sizes_mb"].items():
        print(f"| {name} | {megabytes:,.0f} |")
    print()
    for name, profile in imports.items():
        top = list(profile["slowest_top_level_ms_median"].items())[:5]
        slowest = ", ".join(f"{module} {ms:.0f} ms" for module, ms in top)
        heavy = ", ".join(profile["heavy_imported"]) or "none"
        print(f"{name}: heavy imports {heavy}; slowest: {slowest}")
    for name, found in package_versions.items():
        print(f"{name}: " + ", ".join(f"{k} {v}" for k, v in found.items() if v))
    print(f"\nload average: start {activity_start['load_average']}, end {activity_end['load_average']}")
    print(f"numbers in {work / 'edge_install.json'}")


if __name__ == "__main__":
    main()
