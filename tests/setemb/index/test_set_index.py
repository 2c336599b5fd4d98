"""SetIndex building: incremental adds, streaming from a zarr store, input validation."""

from __future__ import annotations

import pytest
import torch
import zarr

from setemb.index import SetIndex
from tests.setemb.index.sets import D, K, clustered, recall_at_10, sets


@pytest.mark.parametrize("kind", ["flat", "ivf", "hnsw"])
def test_incremental_add_equals_full_build(kind: str) -> None:
    db, queries = clustered(600, 20)
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
        assert recall_at_10(i_inc, i_full) >= 0.95
    else:
        assert torch.equal(i_full, i_inc) and torch.equal(s_full, s_inc)


@pytest.mark.parametrize("keep_on_disk", [False, True])
def test_add_from_store_equals_add_from_memory(tmp_path, keep_on_disk: bool) -> None:
    db, queries = clustered(500, 12)
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


def test_shape_and_config_errors() -> None:
    index = SetIndex(D, K)
    with pytest.raises(ValueError, match=rf"expected \[n, K, D\] = \[n, {K}, {D}\], got shape \(3, 5, {D}\)"):
        index.add(sets(3, k=5))
    with pytest.raises(ValueError, match=r"got shape \(3, 4, 8\)"):
        index.add(sets(3, d=8))
    with pytest.raises(ValueError, match=r"got shape \(3, 16\)"):
        index.add(torch.zeros(3, D))
    with pytest.raises(ValueError, match=r"ids: expected shape \(3,\)"):
        index.add(sets(3), ids=[1, 2])
    index.add(sets(3))
    with pytest.raises(ValueError, match=rf"queries: expected \[Q, L, {D}\], got shape \(2, 4, 8\)"):
        index.search(sets(2, d=8))
    with pytest.raises(ValueError, match="k must be >= 1"):
        index.search(sets(2), k=0)
    with pytest.raises(ValueError, match="kind must be one of"):
        SetIndex(D, K, kind="lsh")
    with pytest.raises(ValueError, match="unknown similarity"):
        SetIndex(D, K, similarity="cosine_soup")
    with pytest.raises(ValueError, match="nlist"):
        SetIndex(D, K, kind="ivf", nlist=64).train(sets(3))
