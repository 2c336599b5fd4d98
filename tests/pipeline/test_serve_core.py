"""pipeline/serve_core.py without Ray or HTTP: shard bounds, the exact shard merge against the unsharded index (float
and compressed kinds), element matches against a naive loop, and the checks of untrusted input (text, k, sets,
uploads)."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from pipeline.serve_core import (
    ServeError,
    ShardSearcher,
    check_k,
    check_sets,
    check_text,
    decode_upload,
    element_matches,
    merge_topk,
    shard_bounds,
)
from setemb.index import SetIndex
from setemb.index.compressed import CompressedSetIndex
from setemb.similarity import score


@given(n=st.integers(1, 500), s=st.integers(1, 20))
def test_shard_bounds_cover_the_rows_in_order_with_even_sizes(n: int, s: int) -> None:
    if s > n:
        with pytest.raises(ValueError, match="non-empty shards"):
            shard_bounds(n, s)
        return
    bounds = shard_bounds(n, s)
    assert bounds[0][0] == 0 and bounds[-1][1] == n and len(bounds) == s
    assert all(a[1] == b[0] for a, b in zip(bounds, bounds[1:], strict=False))
    sizes = [hi - lo for lo, hi in bounds]
    assert min(sizes) >= 1 and max(sizes) - min(sizes) <= 1


def _saved_index(tmp_path: Path, G: int, K: int, Dm: int, seed: int, candidates: int) -> tuple[Path, np.ndarray]:
    rng = np.random.default_rng(seed)
    sets = rng.normal(size=(G, K, Dm)).astype(np.float32)
    sets /= np.linalg.norm(sets, axis=-1, keepdims=True)
    index = SetIndex(Dm, K, storage_dtype="float32", candidates_per_element=candidates)
    index.add(sets)
    index.save(tmp_path / "image")
    return tmp_path, sets


@settings(max_examples=12, deadline=None)
@given(G=st.integers(4, 40), shards=st.integers(1, 4), k=st.integers(1, 12), L=st.integers(1, 3),
       seed=st.integers(0, 99))  # fmt: skip
def test_merged_shards_equal_the_unsharded_index(tmp_path_factory, G: int, shards: int, k: int, L: int,
                                                 seed: int) -> None:  # fmt: skip
    shards = min(shards, G)
    root, _ = _saved_index(tmp_path_factory.mktemp("ix"), G, 3, 8, seed, candidates=64)  # C*L >= G: exhaustive
    query = np.random.default_rng(seed + 1).normal(size=(1, L, 8)).astype(np.float32)
    parts = [ShardSearcher(root, "image", s, shards) for s in range(shards)]
    assert [p.info()["rows"] for p in parts] == [list(b) for b in shard_bounds(G, shards)]
    merged = merge_topk([p.search(query, k)[0] for p in parts], k)
    scores, rows = SetIndex.load(root / "image").search(query, k=k)
    expected = [r for r in rows[0].tolist() if r >= 0]
    assert [h["row"] for h in merged] == expected
    np.testing.assert_allclose([h["score"] for h in merged], scores[0][: len(expected)].numpy(), rtol=1e-6, atol=1e-6)


def test_shards_with_few_candidates_never_rank_worse_than_the_unsharded_index(tmp_path: Path) -> None:
    """C = 2: each shard's candidates contain the unsharded candidates in its rows, so each merged score >= the
    unsharded score at the same rank."""
    root, _ = _saved_index(tmp_path, 300, 4, 8, 0, candidates=2)
    query = np.random.default_rng(5).normal(size=(1, 3, 8)).astype(np.float32)
    parts = [ShardSearcher(root, "image", s, 4) for s in range(4)]
    merged = [h["score"] for h in merge_topk([p.search(query, 10)[0] for p in parts], 10)]
    scores, _ = SetIndex.load(root / "image").search(query, k=10)
    base = [s for s in scores[0].tolist() if np.isfinite(s)]
    assert len(merged) >= len(base)
    assert all(m >= b - 1e-6 for m, b in zip(merged, base, strict=False))


def test_merge_breaks_ties_by_the_lower_row() -> None:
    hits = [[{"row": 7, "score": 0.5}, {"row": 8, "score": 0.1}], [{"row": 2, "score": 0.5}, {"row": 3, "score": 0.4}]]
    assert [h["row"] for h in merge_topk(hits, 3)] == [2, 7, 3]


def test_element_matches_pick_the_best_result_element_per_query_element() -> None:
    rng = np.random.default_rng(0)
    q, g = rng.normal(size=(3, 6)), rng.normal(size=(4, 6)) * 3.0
    out = element_matches(q, g)
    for i, match in enumerate(out["matches"]):
        cos = [float(q[i] @ g[k] / np.linalg.norm(q[i]) / np.linalg.norm(g[k])) for k in range(4)]
        assert match["result_element"] == int(np.argmax(cos)) and match["cosine"] == pytest.approx(max(cos), abs=1e-6)
    assert out["best"]["cosine"] == max(m["cosine"] for m in out["matches"])


def test_text_k_and_set_checks() -> None:
    assert check_text("  a red circle ") == "a red circle"
    for bad, status in (("", 422), ("   ", 422), (None, 422), (3, 422), ("x" * 1001, 413)):
        with pytest.raises(ServeError) as e:
            check_text(bad)
        assert e.value.status == status
    assert check_k(5) == 5
    for bad in (0, 101, True, 2.0, "3"):
        with pytest.raises(ServeError, match="k must be"):
            check_k(bad)
    assert check_sets([[1.0, 0.0], [0.0, 1.0]], 2).shape == (1, 2, 2)
    for bad in ([], [[1.0, 2.0, 3.0]], [[float("nan"), 1.0]], [[0.0, 0.0]], [["a", "b"]], [[1.0], [1.0, 2.0]]):
        with pytest.raises(ServeError):
            check_sets(bad, 2)


def _encoded(image: Image.Image, fmt: str) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt)
    return buffer.getvalue()


def test_decode_upload_accepts_images_and_refuses_bad_ones() -> None:
    photo = Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 30, 3), dtype=np.uint8))
    jpeg = _encoded(photo, "JPEG")
    decoded = decode_upload(jpeg)
    assert decoded.mode == "RGB" and decoded.size == (30, 40)
    assert decode_upload(_encoded(photo.convert("L"), "PNG")).mode == "RGB"
    cases = {b"": 422, b"not an image at all": 415, jpeg[: len(jpeg) // 2]: 422,
             _encoded(Image.new("1", (5000, 5000)), "PNG"): 413}  # fmt: skip
    for data, status in cases.items():
        with pytest.raises(ServeError) as e:
            decode_upload(data, max_pixels=1_000_000)
        assert e.value.status == status, (data[:20], str(e.value))


def _saved_compressed(tmp_path: Path, kind: str, G: int, K: int, Dm: int, seed: int, exhaustive: bool) -> Path:
    """A compressed index over a float32 Zarr store of ``G`` sets, saved as ``<tmp>/image`` (the stage's layout:
    store referenced relative to the sub-index). ``exhaustive``: all cells, all elements, every set re-ranked."""
    rng = np.random.default_rng(seed)
    sets = rng.normal(size=(G, K, Dm)).astype(np.float32)
    sets /= np.linalg.norm(sets, axis=-1, keepdims=True)
    array = zarr.create_array(str(tmp_path / "emb.zarr"), shape=sets.shape, chunks=(16, K, Dm), dtype="float32")
    array[:] = sets
    search = dict(nprobe=4, candidates_per_element=G * K, rerank=G) if exhaustive else \
        dict(nprobe=1, candidates_per_element=4, rerank=4)  # fmt: skip
    extra = {"pq_m": 4, "pq_bits": 4} if kind == "ivf_pq" else {}
    index = CompressedSetIndex(Dm, K, kind=kind, nlist=4, **search, **extra)
    index.add_from_store(zarr.open_array(str(tmp_path / "emb.zarr"), mode="r"))
    index.save(tmp_path / "image", store="../emb.zarr")
    return tmp_path


@pytest.mark.parametrize("kind", ["ivf_sq8", "ivf_pq"])
@pytest.mark.parametrize("shards", [2, 3, 5])
def test_merged_compressed_shards_equal_the_unsharded_compressed_index(tmp_path: Path, kind: str, shards: int):
    """Exhaustive candidates and re-ranking: the merged top-k of S compressed shards is the unsharded top-k of the
    same kind (rows, exact scores), which is the brute-force top-k; matches are computed from the stored sets."""
    root = _saved_compressed(tmp_path, kind, G=60, K=3, Dm=8, seed=shards, exhaustive=True)
    parts = [ShardSearcher(root, "image", s, shards) for s in range(shards)]
    assert [p.info()["rows"] for p in parts] == [list(b) for b in shard_bounds(60, shards)]
    assert {p.info()["kind"] for p in parts} == {kind} and all(p.info()["resident_bytes"]["codes"] for p in parts)
    full = CompressedSetIndex.load(root / "image")
    stored = np.asarray(zarr.open_array(str(root / "emb.zarr"), mode="r")[:])
    for L, k in ((1, 7), (3, 12), (2, 60)):
        query = np.random.default_rng(L).normal(size=(1, L, 8)).astype(np.float32)
        merged = merge_topk([p.search(query, k)[0] for p in parts], k)
        scores, rows = full.search(query, k=k)
        assert [h["row"] for h in merged] == rows[0].tolist()
        np.testing.assert_allclose([h["score"] for h in merged], scores[0].numpy(), rtol=1e-6, atol=1e-6)
        _, exact = score(torch.from_numpy(query), torch.from_numpy(stored), "smooth_chamfer", topk=k)
        assert rows[0].tolist() == exact[0].tolist()
        for hit in merged[:3]:
            assert hit["matches"] == element_matches(query[0], stored[hit["row"]])["matches"]


def test_compressed_shards_keep_exact_scores_and_take_a_cache_bound(tmp_path: Path) -> None:
    """Few candidates (C = 4, one cell, rerank 4): not exhaustive, yet every merged score is the exact similarity of
    its row; ``cache_mb`` overrides the bound each shard's re-ranking cache was built with."""
    root = _saved_compressed(tmp_path, "ivf_pq", G=200, K=4, Dm=8, seed=0, exhaustive=False)
    parts = [ShardSearcher(root, "image", s, 3, cache_mb=0.01) for s in range(3)]
    assert all(p.index.cache.max_bytes == int(0.01 * 2**20) for p in parts)
    stored = torch.from_numpy(np.asarray(zarr.open_array(str(root / "emb.zarr"), mode="r")[:]))
    query = np.random.default_rng(9).normal(size=(1, 3, 8)).astype(np.float32)
    merged = merge_topk([p.search(query, 10)[0] for p in parts], 10)
    assert merged and [h["score"] for h in merged] == sorted((h["score"] for h in merged), reverse=True)
    own, _ = score(torch.from_numpy(query), stored[[h["row"] for h in merged]], "smooth_chamfer", topk=len(merged))
    np.testing.assert_allclose(sorted(h["score"] for h in merged), sorted(own[0].tolist()), rtol=1e-5, atol=1e-6)
    assert all(p.index.cache.nbytes <= int(0.01 * 2**20) for p in parts)
