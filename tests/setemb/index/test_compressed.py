"""setemb/index/compressed.py: the bounded row cache, exact scores and recall of IVF-SQ8 / IVF-PQ against brute force
on clustered sets, the proxy pre-rank, save/load, and its argument checks."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import zarr

from setemb.index.compressed import CompressedSetIndex, RowCache
from setemb.similarity import score

G, K, D = 1500, 4, 32


def _clustered(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Database [G, K, D] of noisy concept elements and 20 queries that re-noise random database sets."""
    rng = np.random.default_rng(seed)
    concepts = rng.normal(size=(300, D)).astype(np.float32)
    pick = rng.integers(0, 300, (G, K))
    database = concepts[pick] + 0.3 * rng.normal(size=(G, K, D)).astype(np.float32)
    source = rng.integers(0, G, 20)
    queries = concepts[pick[source]] + 0.3 * rng.normal(size=(20, K, D)).astype(np.float32)
    norm = lambda x: x / np.linalg.norm(x, axis=-1, keepdims=True)  # noqa: E731
    return norm(database).astype(np.float32), norm(queries).astype(np.float32)


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> tuple[zarr.Array, np.ndarray, np.ndarray]:
    database, queries = _clustered()
    path = tmp_path_factory.mktemp("compressed") / "sets.zarr"
    array = zarr.create_array(str(path), shape=database.shape, chunks=(16, K, D), dtype="float16", compressors=None)
    array[:] = database.astype(np.float16)
    return zarr.open_array(str(path), mode="r"), database, queries


def _exact(queries: np.ndarray, database: np.ndarray, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    return score(torch.from_numpy(queries), torch.from_numpy(database), "smooth_chamfer", topk=k, alpha=16.0)


def test_row_cache_returns_the_rows_and_stays_within_its_byte_bound(store) -> None:
    array, database, _ = store
    cache = RowCache(array, max_bytes=10 * K * D * 2)  # 10 float16 rows
    rows = np.array([3, 17, 400, 1499])
    np.testing.assert_array_equal(cache.get(rows), database[rows].astype(np.float16).astype(np.float32))
    assert (cache.hits, cache.misses) == (0, 4)
    cache.get(np.array([3, 17]))
    assert (cache.hits, cache.misses) == (2, 4)
    cache.get(np.arange(100, 130))
    assert cache.nbytes <= 10 * K * D * 2 and len(cache._rows) == 10
    off = RowCache(array, max_bytes=0)
    off.get(rows)
    assert off.nbytes == 0


CASES = [("ivf_sq8", {}, 64, 0.9), ("ivf_pq", {"pq_m": 8}, 64, 0.85), ("ivf_sq8", {}, 10**6, 1.0),
         ("ivf_pq", {"pq_m": 8}, 10**6, 1.0)]  # fmt: skip


@pytest.mark.parametrize(("kind", "extra", "rerank", "min_recall"), CASES)
def test_compressed_kinds_return_exact_scores_with_high_recall(store, kind, extra, rerank: int, min_recall: float):
    """All cells probed: with every candidate re-ranked the result is the brute-force top-10 (the exact re-rank
    from float16 recovers what the codes blur); the proxy pre-rank to 64 items keeps most of it on this hard,
    concept-sharing data."""
    array, database, queries = store
    index = CompressedSetIndex(D, K, kind=kind, nlist=16, nprobe=16, candidates_per_element=64, rerank=rerank,
                               similarity_kwargs={"alpha": 16.0}, **extra)  # fmt: skip
    index.add_from_store(array, block_size=500)
    assert len(index) == G and index.faiss_index.ntotal == G * K
    scores, rows = index.search(queries, k=10)
    exact_scores, exact_rows = _exact(queries, database, 10)
    recall = np.mean([len(set(r.tolist()) & set(e.tolist())) / 10 for r, e in zip(rows, exact_rows, strict=True)])
    assert recall >= min_recall
    # every returned score is the exact similarity of that row (float16 store: ~1e-3)
    for q in range(len(queries)):
        own, _ = _exact(queries[q : q + 1], database[rows[q].numpy()], 10)
        torch.testing.assert_close(scores[q].sort(descending=True).values, own[0], atol=3e-3, rtol=0)
    assert (scores[:, :-1] >= scores[:, 1:]).all()
    memory = index.memory_bytes()
    per_element = {"ivf_sq8": D, "ivf_pq": 8}[kind]
    assert memory["codes"] == G * K * per_element and memory["ids"] == G * K * 8


def test_rerank_budget_limits_the_rows_read_and_the_proxy_keeps_the_true_neighbour(store) -> None:
    array, database, queries = store
    index = CompressedSetIndex(D, K, nlist=16, nprobe=16, rerank=8, cache_bytes=0)
    index.add_from_store(array)
    _, rows = index.search(queries[:5], k=5)
    assert index.cache.misses == 5 * 8  # at most `rerank` rows read per query
    _, exact_rows = _exact(queries[:5], database, 1)
    assert all(int(e[0]) in set(r.tolist()) for r, e in zip(rows, exact_rows, strict=True))


def test_save_load_roundtrip_and_padding(store, tmp_path: Path) -> None:
    array, _, queries = store
    index = CompressedSetIndex(D, K, nlist=16, nprobe=4)
    index.add_from_store(array)
    path = Path(array.store.root) if hasattr(array.store, "root") else None
    index.save(tmp_path / "ix", store=path)
    loaded = CompressedSetIndex.load(tmp_path / "ix")
    a, b = index.search(queries, 7), loaded.search(queries, 7)
    torch.testing.assert_close(a[0], b[0]) and torch.testing.assert_close(a[1], b[1])
    small = CompressedSetIndex(D, K, nlist=2, nprobe=2)
    small.train(np.asarray(array[:10]))
    small.add(np.asarray(array[:3]))
    small.attach(array[:3])
    scores, rows = small.search(queries[:1], k=5)
    assert rows[0, 3:].tolist() == [-1, -1] and torch.isinf(scores[0, 3:]).all()


def test_argument_checks() -> None:
    with pytest.raises(ValueError, match="kind must be one of"):
        CompressedSetIndex(D, K, kind="ivf")
    with pytest.raises(ValueError, match="pq_m must divide"):
        CompressedSetIndex(D, K, kind="ivf_pq", pq_m=5)
    index = CompressedSetIndex(D, K, nlist=2)
    with pytest.raises(ValueError, match="train the index first"):
        index.add(np.zeros((2, K, D), np.float32))
    index.train(np.random.default_rng(0).normal(size=(10, K, D)))
    index.add(np.random.default_rng(1).normal(size=(3, K, D)))
    with pytest.raises(ValueError, match="no re-ranking store"):
        index.search(np.zeros((1, 2, D), np.float32))
    with pytest.raises(ValueError, match="expected \\[3, 4, 32\\]"):
        index.attach(np.zeros((2, K, D), np.float16))
