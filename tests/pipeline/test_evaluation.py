"""pipeline/evaluation.py: run_evaluate's protocols against the dense reference on a synthetic store (no Ray)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pipeline.evaluation import run_evaluate
from pipeline.params import load_params
from setemb.embedding_store import EmbeddingStore
from setemb.metrics import five_fold_1k, recall_at_k
from tests.stages.test_embed_evaluate import dense_sims, synthetic_store
from tests.stages.test_train import CPI, write_params


def test_auto_protocol_runs_five_fold_and_full_like_the_dense_reference(tmp_path: Path) -> None:
    path, text = synthetic_store(tmp_path / "e.zarr", n_images=20)
    params = load_params(write_params(tmp_path / "p.yaml"))
    params = params.model_copy(update={"evaluate": params.evaluate.model_copy(update={"split": "test"})})
    results = run_evaluate(
        params, embeddings=path, metrics=tmp_path / "m.json", plots=tmp_path / "plots", fold_images=4
    )
    assert results["info"]["protocol"] == "five_fold_1k+full" and results["info"]["similarity_source"] == "embeddings"
    image = EmbeddingStore.open(path)["test/image"].embeddings
    sims = dense_sims(image, text, "smooth_chamfer", {"alpha": 8.0})  # [20, 40]
    full, folds = recall_at_k(sims, CPI), five_fold_1k(sims, CPI, n_folds=5, fold_images=4)
    assert {k: results["full"][k] for k in full} == pytest.approx(full)
    assert {k: results["five_fold_1k"][k] for k in folds} == pytest.approx(folds)
    assert folds != full  # the two protocols really differ here
    assert json.loads((tmp_path / "m.json").read_text())["five_fold_1k"] == pytest.approx(results["five_fold_1k"])
