"""stages/study.py + pipeline/study.py: the grids, cell fingerprints and dedupe, the verdict rules, and real runs on
the tiny extracted shapes dataset (Ray tasks, cached reruns, new variants without retraining, resume after a kill)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from typer.testing import CliRunner

from pipeline.params import Params, load_params
from pipeline.study import (
    Cell,
    CellJob,
    Row,
    Variant,
    cell_fingerprint,
    compare,
    execute,
    plan,
    read_record,
    seed_noise,
    verdict,
)
from stages.study import DEFAULT, GRIDS, QUICK, StudySettings, app, build_grid, run_cell, run_study, study_base
from tests.stages.test_profiles import tiny_dataset

REPO = Path(__file__).resolve().parents[2]
runner = CliRunner()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """params.yaml of the tiny dataset shared with test_profiles (generated and extracted once per session)."""
    return tiny_dataset(tmp_path_factory.getbasetemp() / "tiny_study_data")


# ------------------------------------------------------------------------------------------------------- grids
def _all_cells(settings) -> list[Cell]:
    base = study_base(load_params(REPO / "params.yaml"), settings)
    return [c for grid in GRIDS for c in build_grid(grid, base, settings)]


def test_default_grids_hold_the_paper_cells_and_share_the_dive_model(tmp_path: Path) -> None:
    cells = _all_cells(DEFAULT)
    count = {g: sum(c.grid == g for c in cells) for g in GRIDS}
    assert count == {"main": 6 * DEFAULT.seeds, "similarity_x_head": 12, "k": 6, "t": 6, "alpha": 7, "elements": 1}
    for cell in cells:  # study settings applied everywhere
        assert (
            cell.params["train"]["ray"]["num_workers"] == 0
            and cell.params["train"]["optim"]["epochs"] == DEFAULT.epochs
        )
        assert cell.params["embed"] == {**cell.params["embed"], "splits": ["test"], "save_attention": False}
    stamped, jobs = plan(cells, tmp_path, features=tmp_path / "f.zarr", features_digest="d", relevance=None)
    # DivE seed 0 is one model for main, smooth_chamfer x slot, K=4, T=4, alpha=16 and the element ablation
    dive = {
        c.fingerprint
        for c in stamped
        if (c.grid, c.label, c.seed)
        in {
            ("main", "dive", 0),
            ("k", "K=4", 0),
            ("t", "T=4", 0),
            ("alpha", "α=16", 0),
            ("elements", "dive", 0),
            ("similarity_x_head", "smooth_chamfer × slot", 0),
        }
    }
    assert len(dive) == 1
    assert len(jobs) == 12 + 11 + 5 + 5 + 6
    shared = next(j for j in jobs if j.fingerprint in dive)
    assert [v.name for v in shared.variants][:2] == ["default", "image_only_0"] and len(shared.variants) == 17
    assert len({j.directory for j in jobs}) == len(jobs)


def test_grid_cells_change_exactly_what_they_ablate() -> None:
    cells = {(c.grid, c.label, c.seed): c for c in _all_cells(DEFAULT)}
    dive = cells[("main", "dive", 0)].params
    assert cells[("main", "dive", 1)].params["seed"] == 1
    k3 = cells[("k", "K=3", 0)].params
    assert k3["train"]["model"]["num_embeddings"] == 3 and {**k3, "train": dive["train"]} == dive
    assert cells[("t", "T=2", 0)].params["train"]["model"]["head_kwargs"]["num_iterations"] == 2
    assert cells[("alpha", "α=1", 0)].params["train"]["loss"]["kwargs"]["similarity_kwargs"] == {"alpha": 1.0}
    pienet = cells[("similarity_x_head", "max_similarity × pienet", 0)].params["train"]
    assert pienet["model"]["head"] == "pienet" and pienet["model"]["head_kwargs"] == {}
    assert (
        pienet["loss"]["kwargs"]["similarity"] == "max_similarity" and pienet["loss"]["kwargs"]["diversity"] == "dive"
    )
    pcme = cells[("main", "pcme", 0)]
    assert [v.name for v in pcme.variants] == ["default", "mean_samples", "mu_only"]
    assert pcme.variants[2].model == {"head_kwargs": {"sample_in_eval": False}}
    element_names = [v.name for v in cells[("elements", "dive", 0)].variants]
    assert element_names[:5] == ["all", "image_only_0", "image_only_1", "image_only_2", "image_only_3"]
    assert "image_drop_3" in element_names and "text_drop_0" in element_names and len(element_names) == 17


def test_quick_grids_are_smaller() -> None:
    cells = _all_cells(QUICK)
    assert all(c.params["train"]["limit_batches"] == QUICK.limit_batches for c in cells)
    _, jobs = plan(cells, "/tmp/unused", features="/tmp/f.zarr", features_digest="d", relevance=None)
    assert len(jobs) == 12 + 5 + 2 + 1 + 2  # main: 6 systems (PCME++ included) x 2 seeds
    with pytest.raises(ValueError, match="unknown grid"):
        build_grid("nope", study_base(load_params(REPO / "params.yaml"), QUICK), QUICK)


def test_fingerprint_ignores_neutral_settings_only() -> None:
    params = Params().model_dump(mode="json")
    fp = cell_fingerprint(params, "d")
    neutral = json.loads(json.dumps(params))
    neutral["train"]["ray"].update(address="auto", max_failures=5)
    neutral["evaluate"]["image_elements"] = [0]  # evaluation is a variant, not the cell
    assert cell_fingerprint(neutral, "d") == fp
    for change in ({"seed": 1}, {"train": {**params["train"], "images_per_batch": 7}}):
        assert cell_fingerprint({**params, **change}, "d") != fp
    assert cell_fingerprint(params, "other features") != fp
    assert Variant("a", {"image_elements": [0]}).key == Variant("b", {"image_elements": [0]}).key != Variant().key


# ----------------------------------------------------------------------------------------------------- verdict
def _row(grid: str, label: str, rsum: float, seed: int = 0, variant: str = "default", x=None, **tags) -> Row:
    return Row(grid, label, variant, seed, x, tags, {"rsum": rsum})


def test_compare_and_seed_noise() -> None:
    assert compare(10.0, 5.0, 2.0) == "holds" and compare(5.0, 10.0, 2.0) == "does not hold"
    assert compare(6.0, 5.0, 2.0) == "inconclusive" and compare(5.1, 5.0, None) == "holds"
    rows = [
        _row("main", "dive", 100.0),
        _row("main", "dive", 104.0, seed=1),
        _row("main", "vsepp", 90.0),
        _row("main", "vsepp", 92.0, seed=1),
        _row("main", "pcme", 80.0),
    ]
    assert math.isclose(seed_noise(rows), math.sqrt((8.0 + 2.0) / 2))  # pooled over labels with 2 seeds
    assert seed_noise(rows[:1]) is None


def test_tied_rows_are_flagged_and_left_out_of_the_verdict() -> None:
    rows = [_row("main", "dive", 300.0), _row("main", "vsepp", 250.0), _row("main", "pcme", 600.0)]
    rows[2].metrics["distinct_scores"] = 1.0 / 80000  # a saturated scorer: every pair tied
    claims = {c.claim.split(" (")[0]: c for c in verdict(rows, None)}
    assert claims["DivE retrieves better than every compared system"].status == "holds"
    assert "pcme" not in claims["DivE retrieves better than every compared system"].evidence


def test_verdict_follows_the_numbers() -> None:
    rows = [
        _row("main", "dive", 300.0),
        _row("main", "dive", 302.0, seed=1),
        _row("main", "vsepp", 250.0),
        _row("main", "vsepp", 252.0, seed=1),
        _row("main", "pvse", 310.0),
        _row("main", "pvse", 312.0, seed=1),
    ]
    rows += [_row("k", f"K={k}", v, x=k) for k, v in {1: 200.0, 2: 290.0, 4: 300.0, 6: 301.0}.items()]
    rows += [
        _row("similarity_x_head", "a", 300.0, similarity="smooth_chamfer", head="slot"),
        _row("similarity_x_head", "b", 250.0, similarity="max_similarity", head="slot"),
    ]
    claims = {c.claim.split(" (")[0]: c for c in verdict(rows, seed_noise(rows))}
    assert claims["DivE retrieves better than every compared system"].status == "does not hold"  # PVSE +10 > σ
    assert "pvse 311.0" in claims["DivE retrieves better than every compared system"].evidence
    assert claims["a set of embeddings beats a single vector"].status == "holds"
    assert claims["K = 4 is the best K"].status == "inconclusive"  # K=6 ahead by 1.0 < σ = 1.41
    assert claims["K = 4 beats K = 1"].status == "holds"
    assert claims["SPM + smooth-Chamfer beats max_similarity × slot"].status == "holds"
    assert all(c.evidence for c in claims.values())


# ---------------------------------------------------------------------------------------------- real runs
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


def test_new_variants_reuse_the_model_and_a_killed_cell_resumes(tmp_path: Path, tiny: Path) -> None:
    params = load_params(tiny)
    settings = StudySettings(epochs=1, limit_batches=2, seeds=1)
    out, cache = tmp_path / "results.md", tmp_path / "cache"
    summary = run_study(params, grids=["smoke"], settings=settings, cache=cache, out=out, workers=0)
    assert summary["ran"] == 2
    dive_dir = next(d for d in cache.iterdir() if "smoke:dive:seed0" in read_record(d)["labels"])
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
        only_1.split("|")[2]
        == next(line for line in report.splitlines() if "| image: all but 0 |" in line).split("|")[2]
    )
    # a kill between two variants: the next run evaluates only what is missing
    lost = next(k for k, v in record["variants"].items() if v["name"] == "text_only_1")
    del record["variants"][lost]
    (dive_dir / "metrics.json").write_text(json.dumps(record))
    summary = run_study(params, grids=["elements"], settings=settings, cache=cache, out=out, workers=0)
    again = read_record(dive_dir)
    assert summary["ran"] == 1 and lost in again["variants"] and again["train"] == train
    assert again["variants"][lost]["metrics"] == json.loads((dive_dir / "eval" / f"{lost}.json").read_text())


def test_pcme_variants_patch_the_model_not_the_weights(tmp_path: Path, tiny: Path) -> None:
    settings = StudySettings(epochs=1, limit_batches=2, seeds=1)
    base = study_base(load_params(tiny), settings)
    pcme = next(c for c in build_grid("main", base, settings) if c.label == "pcme")
    _, jobs = plan(
        [pcme], tmp_path, features=base["paths"]["features"], features_digest="d", relevance=base["paths"]["relevance"]
    )
    (outcome,) = execute(jobs, run_cell, workers=0)
    assert outcome.error is None and not outcome.cached
    variants = {v["name"]: v for v in outcome.record["variants"].values()}
    assert set(variants) == {"default", "mean_samples", "mu_only"}
    assert variants["default"]["metrics"]["info"]["similarity"] == "match_probability"
    assert variants["mean_samples"]["metrics"]["info"]["similarity"] == "mean_similarity"
    from setemb.store import EmbeddingStore

    job: CellJob = jobs[0]
    sampled = EmbeddingStore.open(Path(job.directory) / "embeddings.zarr")["test/image"].embeddings
    mu = EmbeddingStore.open(next(Path(job.directory).glob("embeddings-*.zarr")))["test/image"].embeddings
    assert sampled.shape[1] == 7 and mu.shape[1] == 1  # J samples vs the mean only, from the same weights
    assert (Path(job.directory) / "model" / "model.pt").read_bytes() == next(
        Path(job.directory).glob("model-*/model.pt")
    ).read_bytes()
