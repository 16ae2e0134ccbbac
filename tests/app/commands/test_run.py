"""`reviewkd run` end to end on a tiny digits config, its resume logic, and a failing stage."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from reviewkd.app.cli import build_parser, main
from reviewkd.app.pipeline import PIPELINE_FILE, STAGES
from tests.helpers import REPO_ROOT

TINY = [
    "--threads", "1", "--bench-seconds", "0.05", "--batch-sizes", "1,4",
    "train.epochs=3", "teacher.epochs=1", "train.threads=1", "teacher.arch=cifar_resnet20",
    "data.subset=null", "teacher.full_data=false",
]  # fmt: skip


def _stage_lines(output: str) -> dict[str, str]:
    return dict(re.findall(r"^== (\w+)(.*)$", output, flags=re.MULTILINE))


@pytest.mark.slow
def test_pipeline_runs_every_stage_then_resume_skips_and_reruns_what_changed(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run = tmp_path / "run"
    assert main(["run", "--out", str(run), *TINY]) == 0
    first = capsys.readouterr().out
    assert list(_stage_lines(first)) == list(STAGES)
    for name in ("report.json", "report.md", "report.html", "validate.json", "bench.json"):
        assert (run / "report" / name).is_file(), name
    assert "onnxruntime/int8" in first and "torch/fp32" in first  # the final table
    manifest = json.loads((run / "manifest.json").read_text())
    assert manifest["baselines"]["ce"]["top1"] is not None
    assert (run / "teacher" / "teacher.safetensors").is_file()
    report = json.loads((run / "report" / "report.json").read_text())
    assert report["onnxruntime/fp32"]["status"] == "ok"

    assert main(["run", "--out", str(run), "--resume", *TINY]) == 0
    second = _stage_lines(capsys.readouterr().out)
    assert all("skipped" in second[name] for name in STAGES), second

    fp16 = run / "export" / "student.fp16.onnx"
    with open(fp16, "ab") as handle:
        handle.write(b"\0")  # a damaged output: its stage runs again and restores it
    (run / "report" / "bench.json").unlink()  # a missing output: bench and the report built on it rerun
    assert main(["run", "--out", str(run), "--resume", *TINY]) == 0
    third = _stage_lines(capsys.readouterr().out)
    assert all("skipped" in third[name] for name in ("distill", "baseline")), third
    assert all("skipped" not in third[name] for name in ("export", "bench", "report")), third
    from deploy.manifest import read_manifest, verify_artifact

    verify_artifact(run, read_manifest(run), "export/student.fp16.onnx")


def test_a_run_directory_is_not_overwritten_without_resume(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / PIPELINE_FILE).write_text("{}")
    assert main(["run", "--out", str(tmp_path), *TINY]) == 2
    assert "pass --resume" in capsys.readouterr().err


def test_failing_stage_stops_the_run_names_it_and_keeps_earlier_outputs(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    import reviewkd.app.pipeline
    from deploy.errors import UsageError

    def broken_export(*_args: object, **_kwargs: object) -> None:
        raise UsageError("export/student.onnx: cannot write")

    monkeypatch.setattr(reviewkd.app.pipeline, "export_run", broken_export)
    run = tmp_path / "run"
    assert main(["run", "--out", str(run), "--no-baseline", *TINY]) == 2
    err = capsys.readouterr().err
    assert "stage 'export' failed: export/student.onnx: cannot write" in err
    assert (run / "student.safetensors").is_file()
    assert list(json.loads((run / PIPELINE_FILE).read_text())) == ["distill"]
    assert not (run / "report").exists()


def test_every_reviewkd_command_the_readme_shows_exists() -> None:
    readme = (REPO_ROOT / "README.md").read_text()
    subcommands = build_parser()._subparsers._group_actions[0].choices  # type: ignore[union-attr]
    shown = re.findall(r"^\s*(?:\$ )?reviewkd ([a-z][a-z-]*)", readme, flags=re.MULTILINE)
    assert shown, "the README shows no reviewkd command"
    assert set(shown) <= set(subcommands), set(shown) - set(subcommands)
    assert set(subcommands) <= set(shown), f"undocumented commands: {set(subcommands) - set(shown)}"
    makefile = (REPO_ROOT / "Makefile").read_text()
    for target in ("demo", "test"):
        assert f"make {target}" in readme and re.search(rf"^{target}:", makefile, flags=re.MULTILINE)
