"""Zarr embedding store: round trip, units written out of order, completion marker, refusals."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from setemb.embedding_store import EmbeddingStore, EmbeddingStoreWriter
from setemb.store import IncompleteStoreError


def test_embedding_store_round_trip(tmp_path):
    rng = np.random.default_rng(3)
    emb = torch.from_numpy(rng.normal(size=(7, 4, 6)).astype(np.float32))
    att = rng.random(size=(7, 4, 5)).astype(np.float32)
    w = EmbeddingStoreWriter(tmp_path / "e.zarr", attrs={"similarity": "smooth_chamfer"})
    img = w.require_set("test/image", ids=range(7), num_embeddings=4, embed_dim=6, attention_tokens=5, unit_size=3)
    txt = w.require_set("test/text", ids=["é", "b"], num_embeddings=4, embed_dim=6, caption_to_image=[0, 6])
    img.write_unit(2, emb[6:], att[6:])
    with pytest.raises(IncompleteStoreError, match="embedding store .* is incomplete .*`dvc repro embed`"):
        EmbeddingStore.open(tmp_path / "e.zarr")
    assert img.remaining_units() == [0, 1]
    img.write_all(emb, att)
    with pytest.raises(ValueError, match="units not written"):
        w.finalize()
    txt.write_all(emb[:2].numpy())
    w.finalize()

    store = EmbeddingStore.open(tmp_path / "e.zarr")
    assert store.names == ["test/image", "test/text"] and store.attrs["similarity"] == "smooth_chamfer"
    got = store["test/image"]
    assert torch.equal(got.embeddings, emb) and np.array_equal(got.attention.numpy(), att)
    assert got.ids == [str(i) for i in range(7)] and got.caption_to_image is None
    t = store.get("test/text")
    assert t.attention is None and t.ids == ["é", "b"] and t.caption_to_image.tolist() == [0, 6]
    assert torch.equal(t.embeddings, emb[:2])
    with pytest.raises(FileNotFoundError, match="`dvc repro embed`"):
        EmbeddingStore.open(tmp_path / "missing.zarr")
    with pytest.raises(ValueError, match="is not a setemb embedding store"):
        EmbeddingStore.open(tmp_path / "e.zarr" / "test")


def test_embeddings_are_sharded_by_unit_with_small_chunks_for_random_row_reads(tmp_path):
    """Each unit is one shard file (a writer owns whole files), and a random row read decodes one small chunk."""
    import zarr

    from setemb.embedding_store import ROWS_PER_CHUNK

    rng = np.random.default_rng(0)
    emb = rng.normal(size=(70, 2, 8)).astype(np.float32)
    w = EmbeddingStoreWriter(tmp_path / "e.zarr")
    w.require_set("a", ids=range(70), num_embeddings=2, embed_dim=8, unit_size=32).write_all(emb)
    w.require_set("b", ids=range(70), num_embeddings=2, embed_dim=8, unit_size=30).write_all(emb)  # 30 % 16 != 0
    w.finalize()
    a = zarr.open_group(str(tmp_path / "e.zarr"), mode="r")["a/embeddings"]
    assert a.shards == (32, 2, 8) and a.chunks == (ROWS_PER_CHUNK, 2, 8)
    b = zarr.open_group(str(tmp_path / "e.zarr"), mode="r")["b/embeddings"]
    assert b.shards == (30, 2, 8) and b.chunks == (15, 2, 8)  # the largest divisor of the unit <= ROWS_PER_CHUNK
    store = EmbeddingStore.open(tmp_path / "e.zarr")
    for name in ("a", "b"):
        assert np.array_equal(store[name].embeddings.numpy(), emb)
