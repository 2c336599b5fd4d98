"""SetIndex.save / SetIndex.load: the loaded index searches and grows exactly like the saved one."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from setemb.index import SetIndex
from tests.setemb.index.sets import K, clustered


@pytest.mark.parametrize("kind", ["flat", "ivf", "hnsw"])
@pytest.mark.parametrize("mmap", [True, False])
def test_save_load_round_trip(tmp_path, kind: str, mmap: bool) -> None:
    db, queries = clustered(400, 15)
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
