"""pipeline/study_grid.py: the grids (paper cells, what each ablates, the quick sizes, dedupe of the shared DivE
model) and one real cell on the tiny extracted shapes dataset (PCME variants patch the model config, not weights)."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest

from pipeline.params import load_params
from pipeline.study import Cell, CellJob, execute, plan
from pipeline.study_grid import (
    DEFAULT,
    GRIDS,
    QUICK,
    QUIET_LOGGERS,
    StudySettings,
    build_grid,
    run_cell,
    study_base,
)
from tests.pipeline.test_profiles import tiny_dataset

REPO = Path(__file__).resolve().parents[2]


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


# ------------------------------------------------------------------------------------------------------- grids
def _all_cells(settings) -> list[Cell]:
    base = study_base(load_params(REPO / "params.yaml"), settings)
    return [c for grid in GRIDS for c in build_grid(grid, base, settings)]


def test_default_grids_hold_the_paper_cells_and_share_the_dive_model(tmp_path: Path) -> None:
    cells = _all_cells(DEFAULT)
    S = DEFAULT.seeds
    assert S >= 3
    count = {g: sum(c.grid == g for c in cells) for g in GRIDS}
    # Table 3: the six (similarity, head) cells the paper reports, the only ones its claims compare
    assert count == {"main": 6 * S, "similarity_x_head": 6 * S, "k": 6 * S, "t": 6 * S, "alpha": 7 * S, "elements": S}
    for grid in GRIDS:  # every grid runs every seed, each label once per seed
        seeds = {}
        for c in cells:
            if c.grid == grid:
                seeds.setdefault(c.label, []).append(c.seed)
        assert all(sorted(v) == list(range(S)) for v in seeds.values()), grid
    for cell in cells:  # study settings applied everywhere
        assert (
            cell.params["train"]["ray"]["num_workers"] == 0
            and cell.params["train"]["optim"]["epochs"] == DEFAULT.epochs
        )
        assert cell.params["embed"] == {**cell.params["embed"], "splits": ["test"], "save_attention": False}
        assert cell.params["seed"] == cell.seed
    stamped, jobs = plan(cells, tmp_path, features=tmp_path / "f.zarr", features_digest="d", relevance=None)
    shared_labels = {("main", "dive"), ("k", "K=4"), ("t", "T=4"), ("alpha", "α=16"), ("elements", "dive"),
                     ("similarity_x_head", "smooth_chamfer × slot")}  # fmt: skip
    for seed in range(S):  # DivE of each seed is one model for main, SC x slot, K=4, T=4, alpha=16 and Table 5
        dive = {c.fingerprint for c in stamped if (c.grid, c.label) in shared_labels and c.seed == seed}
        assert len(dive) == 1
        shared = next(j for j in jobs if j.fingerprint in dive)
        assert [v.name for v in shared.variants][:2] == ["default", "image_only_0"] and len(shared.variants) == 17
    assert len(jobs) == S * (6 + 5 + 5 + 5 + 6)
    assert len({j.directory for j in jobs}) == len(jobs)


def test_grid_cells_change_exactly_what_they_ablate() -> None:
    cells = {(c.grid, c.label, c.seed): c for c in _all_cells(replace(DEFAULT, pairs=None))}
    dive = cells[("main", "dive", 0)].params
    assert cells[("main", "dive", 1)].params["seed"] == 1
    k3 = cells[("k", "K=3", 0)].params
    assert k3["train"]["model"]["num_embeddings"] == 3 and {**k3, "train": dive["train"]} == dive
    assert cells[("k", "K=3", 1)].params == {**k3, "seed": 1}  # the same ablation on the next seed
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
    assert len(jobs) == QUICK.seeds * (6 + 5 + 2 + 1 + 2)  # main: 6 systems (PCME++ included); every grid x seeds
    with pytest.raises(ValueError, match="unknown grid"):
        build_grid("nope", study_base(load_params(REPO / "params.yaml"), QUICK), QUICK)


# ---------------------------------------------------------------------------------------------- one real cell
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
    from setemb.embedding_store import EmbeddingStore

    job: CellJob = jobs[0]
    sampled = EmbeddingStore.open(Path(job.directory) / "embeddings.zarr")["test/image"].embeddings
    mu = EmbeddingStore.open(next(Path(job.directory).glob("embeddings-*.zarr")))["test/image"].embeddings
    assert sampled.shape[1] == 7 and mu.shape[1] == 1  # J samples vs the mean only, from the same weights
    assert (Path(job.directory) / "model" / "model.pt").read_bytes() == next(
        Path(job.directory).glob("model-*/model.pt")
    ).read_bytes()
