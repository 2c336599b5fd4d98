"""pipeline/study_run.py: real study runs on the tiny extracted shapes dataset (new variants reuse the cached model,
a cell killed between two variants evaluates only what is missing)."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest

from pipeline.params import load_params
from pipeline.study import read_record, runs_that_trained
from pipeline.study_grid import QUIET_LOGGERS, StudySettings
from pipeline.study_readme import BEGIN, END
from pipeline.study_run import run_study
from tests.pipeline.test_profiles import tiny_dataset


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """params.yaml of the tiny dataset shared with test_profiles (generated and extracted once per session)."""
    return tiny_dataset(tmp_path_factory.getbasetemp() / "tiny_study_data")


@pytest.fixture(autouse=True)
def _restore_quieted_loggers() -> Iterator[None]:
    """A cell run in-process sets ``QUIET_LOGGERS`` to WARNING; undo it so later tests' caplog sees INFO records."""
    levels = {name: logging.getLogger(name).level for name in QUIET_LOGGERS}
    yield
    for name, level in levels.items():
        logging.getLogger(name).setLevel(level)


def test_new_variants_reuse_the_model_and_a_killed_cell_resumes(tmp_path: Path, tiny: Path) -> None:
    params = load_params(tiny)
    settings = StudySettings(epochs=1, limit_batches=2, seeds=1)
    out, cache = tmp_path / "results.md", tmp_path / "cache"
    readme = tmp_path / "README.md"
    readme.write_text(f"{BEGIN}\nby hand\n{END}\n")
    summary = run_study(params, grids=["smoke"], settings=settings, cache=cache, out=out, workers=0, readme=readme)
    assert summary["ran"] == 2
    assert readme.read_text() == f"{BEGIN}\nby hand\n{END}\n"  # only a full study (every grid) rewrites it
    (run,) = runs_that_trained(cache, [read_record(d)["fingerprint"] for d in cache.iterdir() if d.is_dir()])
    assert len(run["trained"]) == 2 and run["wall_seconds"] > 0 and run["grids"] == ["smoke"]
    assert f"for {len(run['trained'])} cells (from the cache's run log" in out.read_text()
    dive_dir = next(d for d in cache.iterdir() if d.is_dir() and "smoke:dive:seed0" in read_record(d)["labels"])
    model_stamp = (dive_dir / "model" / "model.pt").stat().st_mtime_ns
    train = read_record(dive_dir)["train"]
    # the element ablation is the same model with 8 more evaluations: no retraining
    summary = run_study(params, grids=["elements"], settings=settings, cache=cache, out=out, workers=0)
    record = read_record(dive_dir)
    assert summary == {**summary, "cells": 1, "ran": 1, "cached": 0}
    assert record["train"] == train and (dive_dir / "model" / "model.pt").stat().st_mtime_ns == model_stamp
    # K = 2: "all but 0" is "only 1", so 1 + 2 + 2 distinct evaluations serve the 9 rows
    assert len(record["variants"]) == 5
    report = out.read_text()
    only_1 = next(line for line in report.splitlines() if line.startswith("| image: only 1 |"))
    assert (
        only_1.split("|")[3]
        == next(line for line in report.splitlines() if "| image: all but 0 |" in line).split("|")[3]
    )
    # a kill between two variants: the next run evaluates only what is missing
    lost = next(k for k, v in record["variants"].items() if v["name"] == "text_only_1")
    del record["variants"][lost]
    (dive_dir / "metrics.json").write_text(json.dumps(record))
    summary = run_study(params, grids=["elements"], settings=settings, cache=cache, out=out, workers=0)
    again = read_record(dive_dir)
    assert summary["ran"] == 1 and lost in again["variants"] and again["train"] == train
    assert again["variants"][lost]["metrics"] == json.loads((dive_dir / "eval" / f"{lost}.json").read_text())


def test_plateau_grid_records_the_validation_curve_and_the_study_quotes_it(tmp_path: Path, tiny: Path) -> None:
    """A tiny ``--grid plateau`` (2 systems x 2 seeds x 3 epochs of 2 batches): per-epoch val RSUM in every record,
    the curve PNG and table in its report, docs/plateau.json; a later study run names that run as its epochs' source."""
    params = load_params(tiny)
    settings = StudySettings(epochs=1, limit_batches=2, seeds=2, plateau_epochs=3, epochs_source="a test")
    out, cache = tmp_path / "docs" / "plateau.md", tmp_path / "cache"
    summary = run_study(params, grids=["plateau"], settings=settings, cache=cache, out=out, workers=0)
    assert summary["ran"] == 4 and not summary["failed"]
    records = [read_record(d) for d in cache.iterdir() if d.is_dir()]  # beside them: the run log
    assert all(len(r["train"]["val_rsum"]) == 3 and r["params"]["train"]["optim"]["epochs"] == 3 for r in records)
    plateau = json.loads((tmp_path / "docs" / "plateau.json").read_text())
    (run,) = runs_that_trained(cache, [r["fingerprint"] for r in records])
    assert plateau["git"] == run["sha"] and plateau["date"] == run["started"].replace("T", " ")[:16] + " UTC"
    assert sorted(plateau["systems"]) == ["dive", "vsepp"] and 1 <= plateau["recommended_epochs"] <= 3
    assert all(len(s["mean"]) == 3 and s["seeds"] == 2 for s in plateau["systems"].values())
    report = out.read_text()
    assert "## Validation curve and plateau epoch" in report and "## Verdict" not in report
    assert (tmp_path / "docs" / "plateau" / "val_rsum_curve.png").stat().st_size > 1000
    assert "![validation RSUM per epoch](plateau/val_rsum_curve.png)" in report
    # the study beside it quotes the curve and says whether its epochs match
    results = tmp_path / "docs" / "results.md"
    run_study(params, grids=["elements"], settings=replace(settings, seeds=1), cache=cache, out=results, workers=0)
    text = results.read_text()
    assert "## Training length" in text and "Epochs per cell: **1** (a test)" in text
    assert "measured by `python -m stages.study`" in text


def test_a_store_extracted_otherwise_is_refused_not_silently_reused(tmp_path: Path, tiny: Path) -> None:
    """The study reuses the complete store at paths.features only when its backbones and test-time transform are
    the ones params.yaml names, i.e. when it carries the fingerprint params and data give (issue #10 part 4: a resize
    study must not train on centre-cropped features)."""
    from pipeline.feature_cache import extraction_mismatch
    from pipeline.params import ParamsError
    from pipeline.study_grid import ensure_features
    from setemb.feature_store import FeatureStore

    params = load_params(tiny)
    features = Path(params.paths.features)
    assert ensure_features(params, features) == features  # the tiny store: center_crop, as params say
    attrs = dict(FeatureStore.open(features).attrs)
    assert extraction_mismatch(params.extract, attrs) == []
    resize = params.model_copy(update={"extract": params.extract.model_copy(update={"image_transform": "resize"})})
    assert extraction_mismatch(resize.extract, attrs) == ["image_transform: store center_crop, params resize"]
    legacy = {k: v for k, v in attrs.items() if k != "extract"}  # a store from before the param: center_crop
    assert extraction_mismatch(params.extract, legacy) == []
    with pytest.raises(ParamsError, match=r"does not match params.yaml \(image_transform: store center_crop"):
        ensure_features(resize, features)
    # same backbones and transform, other stored values (cache dtype): the fingerprint tells, as in run_extract
    other_dtype = "float32" if params.extract.dtype == "float16" else "float16"
    other = params.model_copy(update={"extract": params.extract.model_copy(update={"dtype": other_dtype})})
    with pytest.raises(ParamsError, match=r"\(fingerprint: store \w+, params and data \w+\)"):
        ensure_features(other, features)
    with pytest.raises(ParamsError, match="image_transform: store center_crop, params resize"):
        run_study(resize, grids=["smoke"], settings=StudySettings(epochs=1, limit_batches=2, seeds=1),
                  cache=tmp_path / "cache", out=tmp_path / "results.md", workers=0)  # fmt: skip
    assert not (tmp_path / "results.md").exists()
