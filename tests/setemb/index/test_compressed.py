"""setemb/index/compressed.py: the bounded row cache, exact scores and recall of IVF-SQ8 / IVF-PQ against brute force
on clustered sets, the proxy pre-rank, save/load, and its argument checks."""

from __future__ import annotations

import shutil
from pathlib import Path

import faiss
import numpy as np
import pytest
import torch
import zarr

from setemb.index.compressed import CompressedSetIndex, RerankStoreError, RowCache
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


# ------------------------------------------------------------------------------------ memory, store reference, shards
def _float32_store(path: Path, sets: np.ndarray) -> zarr.Array:
    """``sets`` as a float32 zarr array chunked like the embedding store (the layout the index re-ranks from)."""
    array = zarr.create_array(str(path), shape=sets.shape, chunks=(256, *sets.shape[1:]), dtype="float32",
                              overwrite=True)  # fmt: skip
    array[:] = sets
    return zarr.open_array(str(path), mode="r")


def _numpy_bytes(obj: object, seen: set[int] | None = None) -> int:
    """Bytes of the numpy arrays reachable from ``obj``'s attributes (one level into dicts, lists and objects)."""
    seen = set() if seen is None else seen
    if id(obj) in seen:
        return 0
    seen.add(id(obj))
    if isinstance(obj, np.ndarray):
        return obj.nbytes
    if isinstance(obj, dict):
        return sum(_numpy_bytes(v, seen) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(_numpy_bytes(v, seen) for v in obj)
    if hasattr(obj, "__dict__") and not isinstance(obj, (zarr.Array, type)):
        return sum(_numpy_bytes(v, seen) for v in vars(obj).values())
    return 0


@pytest.mark.parametrize(("kind", "extra", "code_bytes"), [("ivf_sq8", {}, 128), ("ivf_pq", {"pq_m": 16}, 16)])
def test_resident_memory_is_codes_not_float_copies_of_the_database(tmp_path: Path, kind, extra, code_bytes) -> None:
    """4,000 sets x 4 x 128: the float16 copy of the store would be 4.1 MB. What the index holds -- everything faiss
    serialises (codes, ids, quantizers) plus the numpy arrays it references plus its bounded cache -- is the codes
    (SQ8: D bytes, PQ: m bytes per element, + 8-byte ids), never a float copy, before and after a save/load."""
    G4, K4, D4 = 4000, 4, 128
    rng = np.random.default_rng(3)
    sets = rng.normal(size=(G4, K4, D4)).astype(np.float32)
    sets /= np.linalg.norm(sets, axis=-1, keepdims=True)
    array = _float32_store(tmp_path / "store.zarr", sets)
    float16_bytes = G4 * K4 * D4 * 2
    cache = 64 * K4 * D4 * 4  # 64 float32 rows
    bound = {"ivf_sq8": 0.6, "ivf_pq": 0.2}[kind]  # SQ8: 1 byte per dim (float16: 2); PQ: 16 of 256 bytes + codebooks
    index = CompressedSetIndex(D4, K4, kind=kind, nlist=32, nprobe=8, rerank=16, cache_bytes=cache, **extra)
    index.add_from_store(array)
    index.save(tmp_path / "ix", store=tmp_path / "store.zarr")
    for held in (index, CompressedSetIndex.load(tmp_path / "ix")):
        held.search(sets[:30] + 0.05 * rng.normal(size=(30, K4, D4)).astype(np.float32), k=10)
        memory = held.memory_bytes()
        assert memory["codes"] == G4 * K4 * code_bytes and memory["ids"] == G4 * K4 * 8
        faiss_bytes = faiss.serialize_index(held.faiss_index).nbytes  # all faiss holds, quantizers included
        assert faiss_bytes <= memory["codes"] + memory["ids"] + memory["coarse"] + 4096
        assert 0 < held.cache.nbytes <= cache
        arrays = _numpy_bytes(held)  # the cached rows and small bookkeeping, nothing database-sized
        assert arrays <= held.cache.nbytes + 16 * 1024
        resident = faiss_bytes + arrays
        assert resident < bound * float16_bytes, (resident, float16_bytes)
    assert sum(f.stat().st_size for f in (tmp_path / "ix").iterdir()) < bound * float16_bytes  # no vectors on disk


def test_load_resolves_a_relative_store_and_refuses_a_missing_or_changed_one(store, tmp_path, monkeypatch) -> None:
    array, database, queries = store
    root = tmp_path / "repo"
    copy = _float32_store(root / "emb.zarr", database)
    index = CompressedSetIndex(D, K, nlist=8, nprobe=8)
    index.add_from_store(copy)
    index.save(root / "index" / "image", store="../../emb.zarr")  # relative to the index directory
    expected = index.search(queries, 5)
    monkeypatch.chdir(tmp_path)  # the working directory plays no part
    moved = tmp_path / "moved"
    root.rename(moved)  # index and store move together
    loaded = CompressedSetIndex.load(moved / "index" / "image")
    torch.testing.assert_close(loaded.search(queries, 5), expected)

    rows = zarr.open_array(str(moved / "emb.zarr"), mode="r+")
    rows[:] = -database  # same shape and dtype, other vectors (a re-embedded store)
    with pytest.raises(RerankStoreError, match=r"emb\.zarr, which holds other vectors .* when the index was built"):
        CompressedSetIndex.load(moved / "index" / "image")
    _float32_store(moved / "emb.zarr", database[:-1])  # one set fewer
    with pytest.raises(RerankStoreError, match=r"is \[1499, 4, 32\] float32 but was \[1500, 4, 32\] float32"):
        CompressedSetIndex.open_store(moved / "index" / "image")
    shutil.rmtree(moved / "emb.zarr")
    with pytest.raises(RerankStoreError, match=r"re-ranks from .*moved/emb\.zarr, which is missing") as e:
        CompressedSetIndex.load(moved / "index" / "image")
    assert "\n" not in str(e.value)


@pytest.mark.parametrize(("kind", "extra"), [("ivf_sq8", {}), ("ivf_pq", {"pq_m": 8})])
def test_a_shard_holds_the_full_index_codes_for_its_rows(store, kind, extra) -> None:
    """Shard [lo, hi): its element hits are the full index's hits inside those rows, with the same approximate
    cosines (same quantizers, codes copied); search results are global rows, scored exactly from the same store."""
    array, database, queries = store
    full = CompressedSetIndex(D, K, kind=kind, nlist=16, nprobe=16, candidates_per_element=G * K, rerank=G, **extra)
    full.add_from_store(array)
    lo, hi = 400, 900
    part = full.shard(lo, hi)
    assert len(part) == hi - lo and part.faiss_index.ntotal == (hi - lo) * K
    q = queries[:3].reshape(-1, D)
    full.faiss_index.nprobe = part.faiss_index.nprobe = 4  # the same 4 of 16 cells for both
    full_cos, full_ids = full.faiss_index.search(q, G * K)
    part_cos, part_ids = part.faiss_index.search(q, (hi - lo) * K)
    for e in range(len(q)):
        inside = (full_ids[e] >= lo * K) & (full_ids[e] < hi * K)
        found = part_ids[e] >= 0
        assert 0 < found.sum() < (hi - lo) * K  # some, not all: the element search is approximate
        assert dict(zip(part_ids[e][found].tolist(), part_cos[e][found].tolist(), strict=True)) == pytest.approx(
            dict(zip(full_ids[e][inside].tolist(), full_cos[e][inside].tolist(), strict=True)), abs=1e-6
        )
    scores, rows = part.search(queries, k=5)
    assert ((rows >= lo) & (rows < hi)).all()
    exact, exact_rows = _exact(queries, database[lo:hi], 5)
    torch.testing.assert_close(rows, exact_rows + lo)
    torch.testing.assert_close(scores, exact, atol=3e-3, rtol=0)  # float16 store
    np.testing.assert_array_equal(part.sets([lo + 3, lo]), np.asarray(array[[lo + 3, lo]], dtype=np.float32))
    with pytest.raises(ValueError, match="fixed row range"):
        part.add(database[:1])
    with pytest.raises(ValueError, match="not inside"):
        part.shard(0, 10)


def test_at_least_k_items_are_reranked_and_pq_training_needs_enough_elements(store) -> None:
    array, _, queries = store
    index = CompressedSetIndex(D, K, nlist=4, nprobe=4, rerank=2)
    index.add_from_store(array)
    scores, rows = index.search(queries[:2], k=6)
    assert (rows >= 0).all() and torch.isfinite(scores).all()
    small = CompressedSetIndex(D, K, kind="ivf_pq", nlist=1, pq_m=8, pq_bits=8)
    with pytest.raises(ValueError, match="pq_bits=8 trains 256 centroids .* needs at least that many elements, got 40"):
        small.train(np.asarray(array[:10]))
