"""Exact re-ranking: with every item a candidate, SetIndex equals brute-force `similarity.score`; storage; ties."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from setemb.index import SetIndex
from setemb.similarity import score
from tests.setemb.index.sets import D, K, sets


@pytest.mark.parametrize("similarity", ["smooth_chamfer", "chamfer", "max_similarity", "mean_similarity",
                                        "pair_assignment"])  # fmt: skip
def test_full_coverage_equals_brute_force(similarity: str) -> None:
    db, queries = sets(300), sets(23, k=3, seed=1)  # L = 3 != K
    index = SetIndex(D, K, similarity=similarity, candidates_per_element=300 * K, storage_dtype="float32",
                     query_block_size=7)  # fmt: skip
    index.add(db)
    scores, ids = index.search(queries, k=10)
    ref_scores, ref_ids = score(queries, db, similarity, topk=10)
    assert torch.equal(ids, ref_ids)
    torch.testing.assert_close(scores, ref_scores, rtol=1e-5, atol=1e-5)


@settings(max_examples=10, deadline=None)
@given(n=st.integers(1, 40), q=st.integers(1, 9), L=st.integers(1, 5), k=st.integers(1, 12), seed=st.integers(0, 99))
def test_full_coverage_property_sets_BLD(n: int, q: int, L: int, k: int, seed: int) -> None:
    db, queries = sets(n, seed=seed), sets(q, k=L, seed=seed + 1)
    index = SetIndex(D, K, candidates_per_element=n * K, storage_dtype="float32", query_block_size=4)
    index.add(db)
    scores, ids = index.search(queries, k=k)
    kk = min(k, n)
    ref_scores, ref_ids = score(queries, db, topk=kk, alpha=16.0)
    assert torch.equal(ids[:, :kk], ref_ids)
    torch.testing.assert_close(scores[:, :kk], ref_scores, rtol=1e-5, atol=1e-5)
    assert (ids[:, kk:] == -1).all() and torch.isneginf(scores[:, kk:]).all()  # fewer items than k: padded


def test_float16_storage_matches_brute_force_on_float16_database() -> None:
    db, queries = sets(200), sets(10, seed=1)
    index = SetIndex(D, K, candidates_per_element=200 * K)  # float16 default
    index.add(db)
    scores, ids = index.search(queries, k=5)
    ref_scores, ref_ids = score(queries, db.half().float(), topk=5)
    assert torch.equal(ids, ref_ids)
    torch.testing.assert_close(scores, ref_scores, rtol=1e-5, atol=1e-5)


def test_ties_rank_earlier_item_first_and_custom_ids() -> None:
    base = sets(5)
    db = torch.cat([base, base])  # positions i and i + 5 are identical sets
    index = SetIndex(D, K, candidates_per_element=40, storage_dtype="float32")
    index.add(db, ids=np.arange(100, 110))
    _, ids = index.search(base[:2], k=2)
    assert ids.tolist() == [[100, 105], [101, 106]]


def test_set_vectors_rereanks_from_given_array() -> None:
    db, queries = sets(100), sets(6, seed=2)
    index = SetIndex(D, K, candidates_per_element=400)
    index.add(db)
    index.set_vectors(db.numpy())  # float32 source instead of float16 copies
    assert torch.equal(index.search(queries, k=5)[1], score(queries, db, topk=5)[1])
    with pytest.raises(ValueError, match=r"expected 100 sets"):
        index.set_vectors(db.numpy()[:10])
