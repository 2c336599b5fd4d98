"""Candidate generation: FAISS element hits -> unique candidate items; ANN recall; index kinds by size."""

from __future__ import annotations

import pytest
import torch

from setemb.index import SetIndex, default_index_params
from setemb.index.candidates import add_elements, candidate_items, new_element_index
from setemb.similarity import score
from tests.setemb.index.sets import D, K, clustered, recall_at_10, sets


def test_candidate_items_are_unique_ascending_and_padded() -> None:
    db = sets(6)  # [6, K, D]; every element is its own top hit
    index = new_element_index("flat", D, nlist=1, hnsw_m=1, ef_construction=1)
    add_elements(index, db.numpy())
    q = torch.stack([db[4], torch.cat([db[3, :2], db[0, :2]])])  # [2, K, D]: one set; halves of sets 3 and 0
    items, valid = candidate_items(index, q, candidates=1, num_elements=K)
    assert items.shape == valid.shape == (2, 2)
    assert items[0, 0] == 4 and valid[0].tolist() == [True, False]  # K hits on one item -> one candidate, padded
    assert items[1].tolist() == [0, 3] and valid[1].all()  # deduplicated, ascending (the tie rule)
    items, valid = candidate_items(index, q, candidates=6 * K, num_elements=K)  # every element a hit
    assert items.tolist() == [list(range(6))] * 2 and valid.all()


@pytest.mark.parametrize("kind", ["ivf", "hnsw"])
def test_ann_recall_on_clustered_data(kind: str) -> None:
    db, queries = clustered(3000, 40, seed=3)
    index = SetIndex(32, K, kind=kind, nlist=32, nprobe=6, hnsw_m=16, ef_search=64, candidates_per_element=32)
    index.add(db)  # implicit training on a sample of the first block (IVF)
    _, ids = index.search(queries, k=10)
    _, exact = score(queries, db, topk=10)
    assert recall_at_10(ids, exact) >= 0.95


def test_default_index_params_by_size() -> None:
    assert default_index_params(10_000, 4) == {"kind": "flat"}
    big = default_index_params(1_000_000, 4)
    assert big["kind"] == "ivf" and big["nlist"] == 2048 and big["nprobe"] == 64
