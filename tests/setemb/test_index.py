"""SetIndex: FAISS element candidates + exact re-ranking equal brute force `similarity.score` where they must."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import zarr
from hypothesis import given, settings
from hypothesis import strategies as st

from setemb.index import SetIndex, default_index_params
from setemb.similarity import score

K, D = 4, 16


def _sets(n: int, k: int = K, d: int = D, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(n, k, d, generator=g), dim=-1)  # [n, k, d]


def _clustered(n: int, q: int, seed: int = 0, d: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    """Items take K of 8 concepts of one topic (n/20 topics); queries redraw the noise of random items' concepts."""
    g = torch.Generator().manual_seed(seed)
    topics = max(1, n // 20)
    concepts = F.normalize(
        torch.randn(topics, 1, d, generator=g) + 0.7 * torch.randn(topics, 8, d, generator=g), dim=-1
    )
    topic = torch.randint(0, topics, (n,), generator=g)
    choice = torch.rand(n, 8, generator=g).argsort(1)[:, :K]  # [n, K]
    centres = concepts[topic[:, None], choice]  # [n, K, d]
    db = F.normalize(centres + 0.5 * torch.randn(n, K, d, generator=g) / d**0.5, dim=-1)
    src = torch.randint(0, n, (q,), generator=g)
    queries = F.normalize(centres[src] + 0.5 * torch.randn(q, K, d, generator=g) / d**0.5, dim=-1)
    return db, queries


def _recall(found: torch.Tensor, exact: torch.Tensor) -> float:
    return float(np.mean([len(set(f.tolist()) & set(e.tolist())) for f, e in zip(found, exact, strict=True)])) / 10


@pytest.mark.parametrize("similarity", ["smooth_chamfer", "chamfer", "max_similarity", "mean_similarity",
                                        "pair_assignment"])  # fmt: skip
def test_full_coverage_equals_brute_force(similarity: str) -> None:
    db, queries = _sets(300), _sets(23, k=3, seed=1)  # L = 3 != K
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
    db, queries = _sets(n, seed=seed), _sets(q, k=L, seed=seed + 1)
    index = SetIndex(D, K, candidates_per_element=n * K, storage_dtype="float32", query_block_size=4)
    index.add(db)
    scores, ids = index.search(queries, k=k)
    kk = min(k, n)
    ref_scores, ref_ids = score(queries, db, topk=kk, alpha=16.0)
    assert torch.equal(ids[:, :kk], ref_ids)
    torch.testing.assert_close(scores[:, :kk], ref_scores, rtol=1e-5, atol=1e-5)
    assert (ids[:, kk:] == -1).all() and torch.isneginf(scores[:, kk:]).all()  # fewer items than k: padded


def test_float16_storage_matches_brute_force_on_float16_database() -> None:
    db, queries = _sets(200), _sets(10, seed=1)
    index = SetIndex(D, K, candidates_per_element=200 * K)  # float16 default
    index.add(db)
    scores, ids = index.search(queries, k=5)
    ref_scores, ref_ids = score(queries, db.half().float(), topk=5)
    assert torch.equal(ids, ref_ids)
    torch.testing.assert_close(scores, ref_scores, rtol=1e-5, atol=1e-5)


def test_ties_rank_earlier_item_first_and_custom_ids() -> None:
    base = _sets(5)
    db = torch.cat([base, base])  # positions i and i + 5 are identical sets
    index = SetIndex(D, K, candidates_per_element=40, storage_dtype="float32")
    index.add(db, ids=np.arange(100, 110))
    _, ids = index.search(base[:2], k=2)
    assert ids.tolist() == [[100, 105], [101, 106]]


@pytest.mark.parametrize("kind", ["flat", "ivf", "hnsw"])
def test_incremental_add_equals_full_build(kind: str) -> None:
    db, queries = _clustered(600, 20)
    kw = dict(kind=kind, nlist=16, nprobe=4, candidates_per_element=16, storage_dtype="float32")
    full, incremental = SetIndex(32, K, **kw), SetIndex(32, K, **kw)
    full.train(db)
    incremental.train(db)
    full.add(db)
    for start, stop in [(0, 1), (1, 250), (250, 600)]:
        incremental.add(db[start:stop])
    assert len(incremental) == 600
    s_full, i_full = full.search(queries, k=10)
    s_inc, i_inc = incremental.search(queries, k=10)
    if kind == "hnsw":  # graph differs with insertion batches; results must still agree on these easy queries
        assert _recall(i_inc, i_full) >= 0.95
    else:
        assert torch.equal(i_full, i_inc) and torch.equal(s_full, s_inc)


@pytest.mark.parametrize("kind", ["flat", "ivf", "hnsw"])
@pytest.mark.parametrize("mmap", [True, False])
def test_save_load_round_trip(tmp_path, kind: str, mmap: bool) -> None:
    db, queries = _clustered(400, 15)
    index = SetIndex(32, K, kind=kind, nlist=8, nprobe=3, candidates_per_element=12, ef_search=20)
    index.add(db[:300], ids=np.arange(300) * 7)
    index.save(tmp_path / "idx")
    loaded = SetIndex.load(tmp_path / "idx", mmap=mmap)
    assert loaded.config == index.config and loaded.nprobe == 3 and loaded.candidates_per_element == 12
    for a, b in zip(index.search(queries, k=10), loaded.search(queries, k=10), strict=True):
        assert torch.equal(a, b)
    index.add(db[300:])  # adding after load continues positions and ids
    loaded.add(db[300:])
    for a, b in zip(index.search(queries, k=10), loaded.search(queries, k=10), strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("kind", ["ivf", "hnsw"])
def test_ann_recall_on_clustered_data(kind: str) -> None:
    db, queries = _clustered(3000, 40, seed=3)
    index = SetIndex(32, K, kind=kind, nlist=32, nprobe=6, hnsw_m=16, ef_search=64, candidates_per_element=32)
    index.add(db)  # implicit training on a sample of the first block (IVF)
    _, ids = index.search(queries, k=10)
    _, exact = score(queries, db, topk=10)
    assert _recall(ids, exact) >= 0.95


@pytest.mark.parametrize("keep_on_disk", [False, True])
def test_add_from_store_equals_add_from_memory(tmp_path, keep_on_disk: bool) -> None:
    db, queries = _clustered(500, 12)
    group = zarr.open_group(str(tmp_path / "emb.zarr"), mode="w")
    array = group.create_array("embeddings", shape=(500, K, 32), chunks=(64, K, 32), dtype="float32")
    array[:] = db.numpy()
    kw = dict(kind="ivf", nlist=16, nprobe=4, candidates_per_element=16, storage_dtype="float32")
    memory, streamed, by_path = SetIndex(32, K, **kw), SetIndex(32, K, **kw), SetIndex(32, K, **kw)
    for index in (memory, streamed, by_path):
        index.train(db)
    memory.add(db)
    streamed.add_from_store(array, block_size=37, keep_on_disk=keep_on_disk)
    by_path.add_from_store(tmp_path / "emb.zarr", block_size=200, keep_on_disk=keep_on_disk)
    expected = memory.search(queries, k=10)
    for index in (streamed, by_path):
        got = index.search(queries, k=10)
        assert torch.equal(got[0], expected[0]) and torch.equal(got[1], expected[1])
    if keep_on_disk:
        assert streamed.vectors.segments[0][0] is array  # re-ranked from the store, not copied


def test_set_vectors_rereanks_from_given_array() -> None:
    db, queries = _sets(100), _sets(6, seed=2)
    index = SetIndex(D, K, candidates_per_element=400)
    index.add(db)
    index.set_vectors(db.numpy())  # float32 source instead of float16 copies
    assert torch.equal(index.search(queries, k=5)[1], score(queries, db, topk=5)[1])
    with pytest.raises(ValueError, match=r"expected 100 sets"):
        index.set_vectors(db.numpy()[:10])


def test_shape_and_config_errors() -> None:
    index = SetIndex(D, K)
    with pytest.raises(ValueError, match=rf"expected \[n, K, D\] = \[n, {K}, {D}\], got shape \(3, 5, {D}\)"):
        index.add(_sets(3, k=5))
    with pytest.raises(ValueError, match=r"got shape \(3, 4, 8\)"):
        index.add(_sets(3, d=8))
    with pytest.raises(ValueError, match=r"got shape \(3, 16\)"):
        index.add(torch.zeros(3, D))
    with pytest.raises(ValueError, match=r"ids: expected shape \(3,\)"):
        index.add(_sets(3), ids=[1, 2])
    index.add(_sets(3))
    with pytest.raises(ValueError, match=rf"queries: expected \[Q, L, {D}\], got shape \(2, 4, 8\)"):
        index.search(_sets(2, d=8))
    with pytest.raises(ValueError, match="k must be >= 1"):
        index.search(_sets(2), k=0)
    with pytest.raises(ValueError, match="kind must be one of"):
        SetIndex(D, K, kind="lsh")
    with pytest.raises(ValueError, match="unknown similarity"):
        SetIndex(D, K, similarity="cosine_soup")
    with pytest.raises(ValueError, match="nlist"):
        SetIndex(D, K, kind="ivf", nlist=64).train(_sets(3))


def test_default_index_params_by_size() -> None:
    assert default_index_params(10_000, 4) == {"kind": "flat"}
    big = default_index_params(1_000_000, 4)
    assert big["kind"] == "ivf" and big["nlist"] == 2048 and big["nprobe"] == 64
