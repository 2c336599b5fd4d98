"""pipeline/search.py and pipeline/indexing.py: each index kind gives the brute-force top-k; k beyond the database."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from pipeline.indexing import run_index
from pipeline.params import Params
from pipeline.search import run_search
from tests.stages.test_search import N_TEST, QUERY, brute_force, params_dict


@pytest.mark.parametrize("kind", ["flat", "ivf", "hnsw"])
def test_every_index_kind_returns_the_brute_force_top_k(built: dict, tmp_path: Path, kind: str) -> None:
    params = Params.model_validate(params_dict(built["root"], kind=kind))
    manifest = run_index(params, embeddings=built["root"] / "emb.zarr", model=built["root"] / "model",
                         out=tmp_path / "ix", modalities=["image"])  # fmt: skip
    assert manifest["indexes"]["image"]["kind"] == kind and not (tmp_path / "ix" / "text").exists()
    result = run_search(params, query=QUERY, k=N_TEST, index=tmp_path / "ix", encoder=built["encoder"])
    ids, scores = brute_force(built, built["encoder"].encode_text([QUERY]), "image", N_TEST)
    assert [r["id"] for r in result.results] == ids
    torch.testing.assert_close(torch.tensor([r["score"] for r in result.results]), scores, atol=1e-5, rtol=1e-5)


def test_k_larger_than_the_database_returns_every_item(built: dict) -> None:
    result = run_search(built["params"], query=QUERY, k=50, encoder=built["encoder"])  # paths.* defaults
    assert sorted(r["id"] for r in result.results) == sorted(built["split"].image_ids)
    assert [r["rank"] for r in result.results] == list(range(1, N_TEST + 1))
