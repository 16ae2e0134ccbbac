"""What `reviewkd export` costs at this commit against a baseline commit, in one run (issue 23, item 3).

    REVIEWKD_SHARED=../shared .venv/bin/python -m benchmarks.scripts.export_cost [--baseline afd1928]

It runs issue 23's command, the pretrained CIFAR-10 ResNet-56 exported to the four ONNX files,

    reviewkd export --model cifar_resnet56 --weights resnet56-4bfd9763.th --input-shape 3,32,32
        --data ../shared/data/cifar10 --out DIR

once with this tree's code and once with the baseline's (extracted with `git archive` into a
temporary folder), both on the same Python environment with PYTHONPATH pointing at the tree, in
alternating order (this tree first, then ABBA for more repeats) so that load from other jobs falls
on both. Each export is a child process timed by its own resource usage (os.wait4): user and
system CPU seconds, peak RSS, and wall time. The script then prints a Markdown report: the costs,
the ratio of CPU time (this tree over baseline), each commit's verdict table (the check lines the
export printed), and the top-1 drop of each int8 file against its own fp32 file on all 10,000
CIFAR-10 test images (paired 95% interval, deploy.paired_stats), which neither export's own
check need have used in full. `export_speed.py` is a different benchmark: inference latency.

This script drives the export stage, so unlike the rest of benchmarks/ it imports export; nothing
imports it.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from benchmarks.scripts.export_speed import CIFAR, WEIGHTS, load_split
from deploy.paired_stats import compare_predictions, describe_drop
from export.check import run_onnx

REPO = Path(__file__).resolve().parents[2]
DEFAULT_BASELINE = "afd1928"
INT8_FILES = ("export/student.int8.onnx", "export/student.int8.trt.onnx")
# A check line of the export's log: "  export/student.int8.onnx: ok (gate max_top1_drop ok: ...)".
# The [project.scripts] entry (tomllib is not in every Python the project supports).
SCRIPT_LINE = re.compile(r'^reviewkd = "([\w.]+:\w+)"$', re.MULTILINE)
CHECK_LINE = re.compile(r"^\s+(export/\S+\.onnx): (\w+) \((.*)\)$")


@dataclass(frozen=True)
class Cost:
    """One export's cost and what it printed."""

    label: str
    user_s: float
    sys_s: float
    wall_s: float
    peak_rss_mb: float
    returncode: int
    checks: list[tuple[str, str, str]]  # (file, status, reason)
    out: Path

    @property
    def cpu_s(self) -> float:
        """User plus system CPU seconds."""
        return self.user_s + self.sys_s


def entry_point(tree: Path) -> str:
    """The `reviewkd` console script's "module:function" in the tree's pyproject.toml."""
    found = SCRIPT_LINE.search((tree / "pyproject.toml").read_text())
    if found is None:
        raise SystemExit(f"{tree / 'pyproject.toml'}: no reviewkd console script")
    return found.group(1)


def extract(commit: str, folder: Path) -> Path:
    """The files of `commit` of this repository, written to `folder` (git archive: no worktree)."""
    folder.mkdir(parents=True, exist_ok=True)
    archive = subprocess.run(["git", "-C", str(REPO), "archive", commit], check=True, capture_output=True)
    subprocess.run(["tar", "-x", "-C", str(folder)], input=archive.stdout, check=True)
    return folder


def run_export(label: str, tree: Path, out: Path) -> Cost:
    """Run the issue's export with `tree`'s code in a child process and measure it."""
    module, function = entry_point(tree).split(":")
    command = [
        sys.executable,
        "-c",
        f"import sys; from {module} import {function}; sys.exit({function}())",
        "export",
        "--model",
        "cifar_resnet56",
        "--weights",
        str(WEIGHTS / "resnet56-4bfd9763.th"),
        "--input-shape",
        "3,32,32",
        "--data",
        str(CIFAR),
        "--out",
        str(out),
    ]
    env = {**os.environ, "PYTHONPATH": str(tree)}
    log = out.with_suffix(".log")
    start = time.perf_counter()
    with open(log, "w") as handle:
        child = subprocess.Popen(command, cwd=tree, env=env, stdout=handle, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(child.pid, 0)
    wall = time.perf_counter() - start
    checks = [m.groups() for m in map(CHECK_LINE.match, log.read_text().splitlines()) if m]
    return Cost(
        label,
        usage.ru_utime,
        usage.ru_stime,
        wall,
        usage.ru_maxrss / 1024,  # KiB on Linux
        os.waitstatus_to_exitcode(status),
        [(str(f), str(s), str(r)) for f, s, r in checks],
        out,
    )


def test_set_drops(run: Path) -> dict[str, str]:
    """Each int8 file's top-1 drop against the run's fp32 file on all 10,000 CIFAR-10 test images."""
    images, labels = load_split("test", 1000)
    batches = [images[i : i + 500] for i in range(0, len(images), 500)]
    fp32 = run_onnx(run / "export/student.onnx", batches).argmax(1)
    drops = {}
    for rel in INT8_FILES:
        if (run / rel).is_file():
            int8 = run_onnx(run / rel, batches).argmax(1)
            drops[rel] = describe_drop(compare_predictions(labels, fp32, int8))
    return drops


def main() -> None:
    """Run both exports, alternating, and print the report."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--baseline", default=DEFAULT_BASELINE, help="the commit to compare with")
    parser.add_argument("--repeats", type=int, default=1, help="exports per commit (ABBA order)")
    args = parser.parse_args()
    head = subprocess.run(
        ["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], check=True, capture_output=True, text=True
    ).stdout.strip()
    dirty = subprocess.run(
        ["git", "-C", str(REPO), "status", "--porcelain", "--untracked-files=no"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    with tempfile.TemporaryDirectory(prefix="reviewkd-export-cost-") as tmp:
        work = Path(tmp)
        current = head + ("+" if dirty else "")  # "+": uncommitted changes measured
        trees = {current: REPO, args.baseline: extract(args.baseline, work / "baseline")}
        order = list(trees)  # this tree first: a broken export shows before the baseline's long one
        costs: list[Cost] = []
        load_before = os.getloadavg()
        for repeat in range(args.repeats):
            for label in order if repeat % 2 == 0 else order[::-1]:
                out = work / f"{label.strip('+')}-{repeat}"
                costs.append(run_export(label, trees[label], out))
                if costs[-1].returncode not in (0, 1):  # 1: a gate failed, which the report shows
                    last = (out.with_suffix(".log").read_text().strip().splitlines() or [""])[-1]
                    raise SystemExit(f"{label}: export exited {costs[-1].returncode}: {last}")
                print(f"{label}: {costs[-1].cpu_s:.0f} s CPU, {costs[-1].wall_s:.0f} s wall", flush=True)
        load_after = os.getloadavg()
        drops = {label: test_set_drops(next(c.out for c in costs if c.label == label)) for label in order}
    print(f"\nload average (1 min) before/after: {load_before[0]:.1f} / {load_after[0]:.1f}\n")
    print("| commit | user s | sys s | CPU s | wall s | peak RSS MB | exit |")
    print("|---|---|---|---|---|---|---|")
    for cost in costs:
        print(
            f"| {cost.label} | {cost.user_s:.0f} | {cost.sys_s:.1f} | {cost.cpu_s:.0f} | {cost.wall_s:.0f} |"
            f" {cost.peak_rss_mb:.0f} | {cost.returncode} |"
        )
    mean_cpu = {label: sum(c.cpu_s for c in costs if c.label == label) / args.repeats for label in order}
    print(f"\nCPU time ratio {order[0]} / {order[1]}: {mean_cpu[order[0]] / mean_cpu[order[1]]:.3f}")
    for label in order:
        print(f"\nverdicts at {label}:\n\n| file | status | reason |\n|---|---|---|")
        cost = next(c for c in costs if c.label == label)
        for file, status, reason in cost.checks:
            print(f"| {file} | {status} | {reason} |")
        print(f"\ntest-set drops at {label} (int8 file against its fp32 file, all 10,000 test images):\n")
        for file, text in drops[label].items():
            print(f"- {file}: {text}")


if __name__ == "__main__":
    main()
