"""stages/study.py: the command runs a grid on Ray tasks, prints its summary, and a rerun skips the cached cells."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from stages.study import app
from tests.pipeline.test_profiles import tiny_dataset

runner = CliRunner()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """params.yaml of the tiny dataset shared with test_profiles (generated and extracted once per session)."""
    return tiny_dataset(tmp_path_factory.getbasetemp() / "tiny_study_data")


@pytest.mark.ray
def test_study_cli_runs_a_grid_on_ray_tasks_and_a_rerun_skips_cached_cells(tmp_path: Path, tiny: Path) -> None:
    out, cache = tmp_path / "docs" / "results.md", tmp_path / "cache"
    args = [
        "--grid",
        "smoke",
        "--workers",
        "2",
        "--epochs",
        "1",
        "--params",
        str(tiny),
        "--cache",
        str(cache),
        "--out",
        str(out),
        "--quiet",
    ]
    first = runner.invoke(app, args)
    assert first.exit_code == 0, first.output
    assert "2 cells: 2 ran, 0 cached, 0 failed" in first.stdout
    text = out.read_text()
    assert "| dive | 1 |" in text and "| vsepp | 1 |" in text and "| 442.6 | 493.2 |" in text
    assert "2 Ray workers" in text and "## Verdict" in text
    records = sorted(cache.glob("*/metrics.json"))
    assert len(records) == 2
    stamps = [p.stat().st_mtime_ns for p in records]
    for path in records:
        record = json.loads(path.read_text())
        assert record["train"]["epochs"] == 1 and len(record["variants"]) == 1
        assert next(iter(record["variants"].values()))["distinct_scores"] > 0.5  # a working scorer
        assert not (path.parent / "training").exists() and (path.parent / "model" / "model.pt").is_file()
    out.unlink()
    again = runner.invoke(app, args)
    assert again.exit_code == 0 and "2 cells: 0 ran, 2 cached, 0 failed" in again.stdout
    assert [p.stat().st_mtime_ns for p in records] == stamps and "| dive | 1 |" in out.read_text()
