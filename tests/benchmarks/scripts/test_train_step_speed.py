"""benchmarks/scripts/train_step_speed.py: its RESULTS.md section and its table."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

from benchmarks.scripts.train_step_speed import SECTION_TITLE, Options, table, update_results_md


def test_results_section_is_replaced_in_place(tmp_path: Path) -> None:
    path = tmp_path / "RESULTS.md"
    update_results_md(path, f"{SECTION_TITLE}\n\nfirst\n")
    assert path.read_text().startswith("# Benchmark results\n")
    path.write_text(path.read_text() + "\n## Someone else's section\n\ntheirs\n")
    update_results_md(path, f"{SECTION_TITLE}\n\nsecond\n")
    text = path.read_text()
    assert "first" not in text and "second" in text
    assert text.count(SECTION_TITLE) == 1 and "## Someone else's section\n\ntheirs\n" in text


def test_table_has_one_row_per_contender_with_numbers_right_aligned() -> None:
    stats = {
        "median_ms": 12.34,
        "iqr_ms": 0.5,
        "images_per_s": 2593.2,
        "ratio_to_official": 0.74,
        "paired_ratio_median": 0.75,
        "cpu_median_ms": 20.0,
        "cpu_ratio_to_official": 0.8,
    }
    results = {
        "pairs": {
            "a->b": {
                "official": {**stats, "options": None},
                "ours": {**stats, "options": asdict(Options(channels_last=True))},
            }
        }
    }
    lines = table(results).splitlines()
    assert len(lines) == 4
    assert [cell.strip() for cell in lines[0].strip("|").split("|")][:3] == ["pair", "step", "options"]
    separators = [cell.strip() for cell in lines[1].strip("|").split("|")]
    assert all(cell.startswith(":") for cell in separators[:3]) and all(
        cell.endswith(":") for cell in separators[3:]
    )
    assert "reference (fp32, NCHW, no_grad)" in lines[2] and "channels_last" in lines[3]
    assert [cell.strip() for cell in lines[3].strip("|").split("|")][3:6] == ["12.3", "0.5", "2593.2"]
