"""stages/report.py: the CLI wiring (help, the missing-store error line, a gallery without features or relevance)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from pipeline.reporting import GALLERY_HTML
from stages.report import app
from tests.pipeline.test_reporting import build_tiny

runner = CliRunner()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return build_tiny(tmp_path_factory.mktemp("report"))


# ------------------------------------------------------------------------------------------------ CLI
def test_cli_help_and_missing_store(tmp_path: Path) -> None:
    assert runner.invoke(app, ["--help"]).exit_code == 0
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump({"seed": 0}))
    result = runner.invoke(app, ["--params", str(params), "--embeddings", str(tmp_path / "none.zarr"), "--out",
                                 str(tmp_path / "r"), "--quiet"])  # fmt: skip
    assert result.exit_code == 1
    assert "none.zarr" in result.stderr and "dvc repro embed" in result.stderr


def test_cli_writes_the_gallery_without_features_or_relevance(tiny: dict[str, Path], tmp_path: Path) -> None:
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump({"seed": 0}))
    shapes = tiny["shapes"]
    args = ["--params", str(params), "--embeddings", str(tiny["embeddings"]), "--dataset-json",
            str(shapes / "dataset.json"), "--image-root", str(shapes / "images"),
            "--out", str(tmp_path / "r")]  # fmt: skip
    result = runner.invoke(app, [*args, "--quiet"])
    assert result.exit_code == 0, result.output
    html = (tmp_path / "r" / GALLERY_HTML).read_text()
    assert 'class="tile relevant"' not in html and 'id="attention"' not in html  # nothing to mark / no grid known
    assert html.count('class="tile ') == 50
    assert not (tmp_path / "r" / "attention").exists()
