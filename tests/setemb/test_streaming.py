"""Streaming training reads: block layout, block-shuffled orders, the bounded block cache, prefetch."""

from __future__ import annotations

import itertools
import time

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from setemb.streaming import StreamingTable, block_bounds, block_shuffled_order, prefetch
from setemb.training import CaptionIndex, FeatureTable, ImageCaptionBatches, make_batch


class CountingRows:
    """An array proxy that records every slice read and fails on any read longer than ``max_rows``."""

    def __init__(self, array: np.ndarray, max_rows: int) -> None:
        self.array, self.max_rows, self.reads = array, max_rows, []
        self.shape, self.dtype = array.shape, array.dtype

    def __getitem__(self, key):
        if not isinstance(key, slice) or key.step not in (None, 1):
            raise AssertionError(f"only contiguous slices may be read, got {key!r}")
        lo, hi, _ = key.indices(self.shape[0])
        if hi - lo > self.max_rows:
            raise AssertionError(f"read of {hi - lo} rows exceeds the block bound {self.max_rows}")
        self.reads.append((lo, hi))
        return self.array[key]


def ragged(rng: np.random.Generator, n: int, unit_size: int, max_len: int, dim: int | None):
    """Ragged rows laid out like the store: each unit's items contiguous, units separated by unused rows."""
    return layout(rng, rng.integers(0, max_len + 1, size=n), unit_size, dim)


def layout(rng: np.random.Generator, lengths: np.ndarray, unit_size: int, dim: int | None, gap: int = 3):
    starts = np.zeros(len(lengths), dtype=np.int64)
    row = 0
    for i, length in enumerate(lengths):
        if i % unit_size == 0 and i:
            row += gap  # the unused tail of a unit region
        starts[i] = row
        row += length
    shape = (row,) if dim is None else (row, dim)
    local = rng.integers(1, 1000, size=shape) if dim is None else rng.standard_normal(shape).astype(np.float16)
    return local, starts, np.asarray(lengths)


@settings(max_examples=40, deadline=None)
@given(n=st.integers(0, 300), block=st.integers(1, 40), unit=st.integers(1, 64))
def test_block_bounds_cover_items_without_crossing_units(n, block, unit):
    bounds = block_bounds(n, block, unit)
    assert bounds[0] == 0 and bounds[-1] == n
    sizes = np.diff(bounds)
    assert (sizes >= 1).all() and (sizes <= block).all()
    for lo, hi in itertools.pairwise(bounds):
        assert lo // unit == (hi - 1) // unit  # one unit per block


@settings(max_examples=30, deadline=None)
@given(n=st.integers(1, 400), block=st.integers(1, 30), window=st.integers(1, 8), seed=st.integers(0, 3))
def test_block_shuffled_order_is_a_permutation_local_to_windows(n, block, window, seed):
    bounds = block_bounds(n, block, 64)
    order = block_shuffled_order(bounds, window_blocks=window, seed=seed, epoch=2)
    assert np.array_equal(np.sort(order), np.arange(n))
    np.testing.assert_array_equal(order, block_shuffled_order(bounds, window_blocks=window, seed=seed, epoch=2))
    which = np.searchsorted(bounds, order, side="right") - 1
    # consecutive windows of the order draw on at most `window` blocks each
    pos = 0
    sizes = np.diff(bounds)
    blocks_seen: list[int] = []
    for b in which:
        if b not in blocks_seen:
            blocks_seen.append(b)
    for start in range(0, len(blocks_seen), window):
        group = blocks_seen[start : start + window]
        span = int(sizes[group].sum())
        assert set(which[pos : pos + span]) == set(group)
        pos += span


def test_block_shuffled_order_changes_with_epoch_and_mixes_blocks():
    bounds = block_bounds(1000, 10, 100)
    a = block_shuffled_order(bounds, window_blocks=4, seed=0, epoch=0)
    b = block_shuffled_order(bounds, window_blocks=4, seed=0, epoch=1)
    assert not np.array_equal(a, b)
    first_batch_blocks = np.unique(np.searchsorted(bounds, a[:32], side="right") - 1)
    assert len(first_batch_blocks) > 1  # a batch mixes several blocks, not one run of neighbours


@pytest.mark.parametrize("dim", [6, None])
@pytest.mark.parametrize("with_global", [True, False])
def test_streaming_gather_equals_in_memory_gather(dim, with_global):
    rng = np.random.default_rng(0)
    n, unit = 97, 16
    local, starts, lengths = ragged(rng, n, unit, max_len=5, dim=dim)
    glob = rng.standard_normal((n, 4)).astype(np.float16) if with_global else None
    bounds = block_bounds(n, 5, unit)
    reads = CountingRows(local, max_rows=int(5 * 5))
    streaming = StreamingTable(reads, starts, lengths, glob, bounds, cache_blocks=3)
    memory = FeatureTable(local, starts, lengths, glob)
    for _ in range(20):
        idx = rng.choice(n, size=rng.integers(1, 12), replace=False)
        got, want = streaming.gather(idx), memory.gather(idx)
        for key in ("local", "mask", "global"):
            if want[key] is None:
                assert got[key] is None
            else:
                assert got[key].dtype == want[key].dtype
                torch.testing.assert_close(got[key], want[key], rtol=0, atol=0)
    assert len(streaming._cache) <= 3
    assert streaming.blocks_read == len(reads.reads)
    assert (streaming.local_dim, streaming.global_dim, streaming.is_tokens) == (
        memory.local_dim,
        memory.global_dim,
        memory.is_tokens,
    )


def test_streaming_table_refuses_blocks_that_are_not_contiguous():
    local = np.arange(10, dtype=np.float32)[:, None]  # items at rows 0-1 and 5-6: a gap between them
    table = StreamingTable(local, np.array([0, 5]), np.array([2, 2]), None, np.array([0, 2]), cache_blocks=1)
    with pytest.raises(ValueError, match="contiguous"):
        table.gather([0])


def test_an_epoch_of_streamed_batches_reads_each_block_once_and_never_the_split():
    """The streaming property: every read is one block, the cache stays bounded, each block is read once per rank."""
    rng = np.random.default_rng(3)
    n_images, cpi, unit, block, window, P, W = 640, 5, 64, 16, 4, 8, 2
    img_local, img_starts, img_lengths = layout(rng, rng.integers(1, 5, size=n_images), unit, dim=3)
    c2i = np.repeat(np.arange(n_images), cpi)
    txt_lengths = rng.integers(1, 6, size=len(c2i))
    txt_local, txt_starts, txt_lengths = layout(rng, txt_lengths, unit * cpi, dim=None)
    img_bounds, txt_bounds = block_bounds(n_images, block, unit), block_bounds(len(c2i), block * cpi, unit * cpi)
    cache = 2 * window + 2
    seen: list[np.ndarray] = []
    for rank in range(W):
        img_rows = CountingRows(img_local, max_rows=block * 4)
        txt_rows = CountingRows(txt_local, max_rows=block * cpi * 5)
        images = StreamingTable(img_rows, img_starts, img_lengths, None, img_bounds, cache_blocks=cache)
        texts = StreamingTable(txt_rows, txt_starts, txt_lengths, None, txt_bounds, cache_blocks=cache)
        index = CaptionIndex(c2i, n_images)
        sampler = ImageCaptionBatches(
            n_images, P, seed=0, epoch=1, rank=rank, world_size=W, drop_last=False, bounds=img_bounds, window_blocks=4
        )
        memory_img = FeatureTable(img_local, img_starts, img_lengths)
        memory_txt = FeatureTable(txt_local, txt_starts, txt_lengths)
        for batch_images in sampler:
            got = make_batch(images, texts, index, batch_images)
            want = make_batch(memory_img, memory_txt, index, batch_images)
            torch.testing.assert_close(got[0]["local"], want[0]["local"], rtol=0, atol=0)
            torch.testing.assert_close(got[1]["local"], want[1]["local"], rtol=0, atol=0)
            seen.append(batch_images)
            assert len(images._cache) <= cache and len(texts._cache) <= cache
        # each rank reads about half of the blocks, each at most once
        assert len(set(img_rows.reads)) == len(img_rows.reads)
        assert len(set(txt_rows.reads)) == len(txt_rows.reads)
    everything = np.concatenate(seen)
    assert np.array_equal(np.sort(everything), np.arange(n_images))  # every image once per epoch, disjoint ranks


def test_sampler_with_bounds_is_deterministic_and_matches_full_shuffle_without():
    bounds = block_bounds(100, 10, 50)
    a = list(ImageCaptionBatches(100, 7, seed=3, epoch=0, drop_last=False, bounds=bounds, window_blocks=2))
    b = list(ImageCaptionBatches(100, 7, seed=3, epoch=0, drop_last=False, bounds=bounds, window_blocks=2))
    assert all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))
    full = ImageCaptionBatches(100, 7, seed=3, epoch=0, drop_last=False)
    np.testing.assert_array_equal(full.permutation(), np.random.default_rng([3, 0]).permutation(100))
    with pytest.raises(ValueError, match="bounds must end"):
        ImageCaptionBatches(100, 7, seed=3, epoch=0, bounds=block_bounds(90, 10))


def test_prefetch_keeps_order_and_raises_where_the_producer_failed():
    assert list(prefetch(range(50), depth=3)) == list(range(50))
    assert list(prefetch(range(5), depth=0)) == list(range(5))

    def failing():
        yield 1
        yield 2
        raise KeyError("boom")

    got = []
    with pytest.raises(KeyError, match="boom"):
        for x in prefetch(failing(), depth=2):
            got.append(x)
    assert got == [1, 2]


def test_prefetch_stops_its_thread_when_the_consumer_stops_early():
    start = time.perf_counter()
    for x in prefetch(itertools.count(), depth=2):
        if x == 3:
            break
    assert time.perf_counter() - start < 2.0


class Residency(CountingRows):
    """``CountingRows`` that also records how many blocks its table holds at each read (the one being read included)."""

    table: StreamingTable

    def __getitem__(self, key):
        self.resident.append(len(self.table._cache) + 1)
        return super().__getitem__(key)


@settings(max_examples=25, deadline=None)
@given(
    n=st.integers(24, 300), block=st.integers(1, 12), window=st.integers(1, 6), P=st.integers(2, 16),
    W=st.integers(1, 3), seed=st.integers(0, 3),
)  # fmt: skip
def test_an_announced_epoch_holds_at_most_one_window_of_blocks_in_the_store_dtype(n, block, window, P, W, seed):
    """The memory bound training relies on: with the epoch announced, a block keeps only this rank's items and
    leaves the cache after its last use, so at most ``window + 1`` blocks (float16, as stored) are resident at any
    read, and each is read once."""
    rng = np.random.default_rng(seed)
    unit = 32
    local, starts, lengths = layout(rng, rng.integers(1, 5, size=n), unit, dim=3)
    glob = rng.standard_normal((n, 2)).astype(np.float16)
    bounds = block_bounds(n, block, unit)
    memory = FeatureTable(local, starts, lengths, glob)
    block_bytes = int(max(lengths[lo:hi].sum() * 3 * 2 + (hi - lo) * 2 * 2 for lo, hi in itertools.pairwise(bounds)))
    cap = window * (1 + -(-P // (block * window)))  # the LRU bound of pipeline.train_data.streaming_tables
    for rank in range(W):
        rows = Residency(local, max_rows=block * 4)
        rows.resident = []
        table = StreamingTable(rows, starts, lengths, glob, bounds, cache_blocks=cap, store_dtype=True)
        rows.table = table
        sampler = ImageCaptionBatches(
            n, P, seed=seed, epoch=1, rank=rank, world_size=W, drop_last=False, bounds=bounds, window_blocks=window
        )
        plan = list(sampler)
        table.expect(plan)
        ours = np.concatenate(plan)
        for images in plan:
            got, want = table.gather(images), memory.gather(images)
            assert got["local"].dtype == torch.float16 and got["global"].dtype == torch.float16
            torch.testing.assert_close(got["local"].float(), want["local"], rtol=0, atol=0)
            torch.testing.assert_close(got["global"].float(), want["global"], rtol=0, atol=0)
            assert all(b.local.dtype == np.float16 for b in table._cache.values())
            assert table.cached_bytes <= window * block_bytes
            # what stays is only this rank's items of the blocks still in use
            mine = np.flatnonzero(np.isin(np.searchsorted(bounds, ours, side="right") - 1, list(table._cache)))
            assert table.cached_bytes == int(lengths[ours[mine]].sum()) * 3 * 2 + len(mine) * 2 * 2
        assert max(rows.resident) <= window + 1
        assert len(set(rows.reads)) == len(rows.reads)  # no block read twice
        assert table.cached_bytes == 0  # the epoch used every block it read: nothing stays behind


def test_announced_blocks_keep_only_the_announced_items_and_later_gathers_stay_correct():
    rng = np.random.default_rng(1)
    local, starts, lengths = layout(rng, rng.integers(1, 4, size=40), 8, dim=2)
    memory = FeatureTable(local, starts, lengths)
    table = StreamingTable(local, starts, lengths, None, block_bounds(40, 4, 8), cache_blocks=3)
    table.gather(np.arange(12))  # not announced: LRU, 3 whole blocks kept
    assert sorted(table._cache) == [0, 1, 2]
    table.expect([np.array([8, 9]), np.array([9, 20])])  # blocks 2 and 5; a new announcement empties the cache
    assert table._cache == {}
    table.gather(np.array([8, 9]))
    assert sorted(table._cache) == [2]  # still needed by the second batch, holding the rows of items 8 and 9 only
    assert table.cached_bytes == local[starts[8] : starts[9] + lengths[9]].nbytes
    got = table.gather(np.array([9, 20]))
    torch.testing.assert_close(got["local"], memory.gather(np.array([9, 20]))["local"], rtol=0, atol=0)
    assert table._cache == {} and table.cached_bytes == 0  # both blocks had their last use
    got = table.gather(np.array([10, 9]))  # beyond the announcement: correct, the whole block read and kept (LRU)
    torch.testing.assert_close(got["local"], memory.gather(np.array([10, 9]))["local"], rtol=0, atol=0)
    assert sorted(table._cache) == [2] and table.cached_bytes == local[starts[8] : starts[11] + lengths[11]].nbytes


def test_store_dtype_batches_become_the_float32_batch_on_the_device():
    from setemb.training import _to_device

    rng = np.random.default_rng(2)
    local, starts, lengths = layout(rng, rng.integers(0, 4, size=30), 10, dim=5)
    glob = rng.standard_normal((30, 3)).astype(np.float16)
    args = (local, starts, lengths, glob, block_bounds(30, 5, 10))
    idx = rng.permutation(30)[:9]
    half = StreamingTable(*args, cache_blocks=2, store_dtype=True).gather(idx)
    full = StreamingTable(*args, cache_blocks=2).gather(idx)
    assert half["local"].dtype == torch.float16 and full["local"].dtype == torch.float32
    moved = _to_device(half, torch.device("cpu"))
    for key in ("local", "global", "mask"):
        assert moved[key].dtype == full[key].dtype
        torch.testing.assert_close(moved[key], full[key], rtol=0, atol=0)
