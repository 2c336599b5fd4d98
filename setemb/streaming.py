"""Training reads straight from the feature store: block-shuffled epoch orders and a bounded block cache.

A worker never copies a split into memory. The items of a split are cut into *blocks* of consecutive rows (never
crossing a store work unit, so each block is one contiguous slice of the Zarr arrays). An epoch visits the blocks in
a random order; consecutive runs of ``window_blocks`` blocks form a *window* whose items are shuffled together (the
bounded shuffle buffer). ``StreamingTable`` serves ``gather`` through an LRU cache of decoded blocks, so a worker
holds at most ``cache_blocks`` blocks, whatever the size of the split, and reads every block about once per epoch.
Blocks are cached as the store holds them (float16), and when a rank announces the batches it will gather
(``StreamingTable.expect``) a block keeps only the rows of that rank's items and leaves the cache right after its
last announced use, so a block-shuffled epoch keeps at most ``window_blocks + 1`` blocks resident (about one window's
share of this rank) instead of the LRU's full capacity.

How random this is: an epoch's order is a uniformly random order of blocks, then a uniform shuffle inside each
window; two items end up in one batch only if their blocks fall in the same (or an adjacent) window. With
``block_items=1`` and one window holding everything the order is a full uniform permutation (``shuffle="full"``,
which is what ``ImageCaptionBatches`` draws when it gets no block layout).
"""

from __future__ import annotations

import logging
import queue
import threading
from collections import OrderedDict
from collections.abc import Iterable, Iterator
from typing import Any

import numpy as np
import torch
from torch import Tensor

logger = logging.getLogger(__name__)

Batch = dict[str, Tensor | None]


def block_bounds(n_items: int, block_items: int, unit_size: int | None = None) -> np.ndarray:
    """Item boundaries of the blocks: ``[nb + 1]`` int64, ``bounds[b]:bounds[b + 1]`` are block b's items.

    Blocks hold ``block_items`` consecutive items and never cross a multiple of ``unit_size`` (a store work unit,
    whose rows are one contiguous region); the last block of each unit may be shorter.
    """
    if n_items < 0 or block_items < 1:
        raise ValueError(f"need n_items >= 0 and block_items >= 1, got {n_items}, {block_items}")
    if unit_size is None or unit_size < 1:
        unit_size = max(n_items, 1)
    per_unit = np.arange(0, unit_size, block_items)  # block starts inside one unit
    units = np.arange(0, n_items, unit_size)
    starts = (units[:, None] + per_unit[None, :]).ravel()
    starts = starts[starts < n_items]
    return np.append(starts, n_items).astype(np.int64)


def block_shuffled_order(bounds: np.ndarray, *, window_blocks: int, seed: int, epoch: int) -> np.ndarray:
    """One epoch's item order: blocks in random order, items shuffled within each window of ``window_blocks`` blocks.

    Args:
        bounds: ``[nb + 1]`` block boundaries (``block_bounds``).
        window_blocks: blocks per shuffle window (the shuffle buffer, in blocks).
        seed, epoch: the order is a function of these (and ``bounds``) only: the same on every rank and after a
            resume.

    Returns:
        ``[n_items]`` int64, a permutation of ``0 .. n_items - 1``.
    """
    bounds = np.asarray(bounds, dtype=np.int64)
    if window_blocks < 1:
        raise ValueError(f"window_blocks must be >= 1, got {window_blocks}")
    rng = np.random.default_rng([seed, epoch, 1])  # stream 1: the full shuffle uses default_rng([seed, epoch])
    nb = len(bounds) - 1
    blocks = rng.permutation(nb)
    parts = []
    for lo in range(0, nb, window_blocks):
        window = np.concatenate([np.arange(bounds[b], bounds[b + 1]) for b in blocks[lo : lo + window_blocks]])
        parts.append(rng.permutation(window))
    return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)


class RaggedTable:
    """What both feature tables (in memory: ``setemb.training.FeatureTable``; streamed: ``StreamingTable``) derive
    from their ``local`` rows, ``global_`` features and ``lengths``."""

    local: Any
    global_: Any | None
    lengths: np.ndarray

    def __len__(self) -> int:
        return len(self.lengths)

    @property
    def is_tokens(self) -> bool:
        """True when ``local`` holds token ids (``[R]`` integers) rather than feature rows."""
        return len(self.local.shape) == 1

    @property
    def local_dim(self) -> int | None:
        """D of the local rows; None for token ids."""
        return None if self.is_tokens else int(self.local.shape[1])

    @property
    def global_dim(self) -> int | None:
        """Dg of the global features; None when absent."""
        return None if self.global_ is None else int(self.global_.shape[1])

    @property
    def max_length(self) -> int:
        """The longest item (at least 1): N of a batch holding every item."""
        return max(1, int(self.lengths.max(initial=0)))


class _Block:
    """One decoded block: all its items' rows (``items`` None) or only those of ``items`` (sorted), whose rows start
    at ``row_of`` in ``local``."""

    __slots__ = ("first_item", "first_row", "local", "global_", "items", "row_of")

    def __init__(self, first_item, first_row, local, global_, items=None, row_of=None) -> None:
        self.first_item, self.first_row, self.local, self.global_ = first_item, first_row, local, global_
        self.items, self.row_of = items, row_of

    def locate(self, idx: np.ndarray, starts: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
        """``(first row in local [s], row in global_ [s])`` of items ``idx``; None if the block did not keep them."""
        if self.items is None:
            return starts[idx] - self.first_row, idx - self.first_item
        if len(self.items) == 0:
            return None
        at = np.minimum(np.searchsorted(self.items, idx), len(self.items) - 1)
        if (self.items[at] != idx).any():
            return None
        return self.row_of[at], at


class StreamingTable(RaggedTable):
    """The ragged features of one modality of one split, read block by block from the store (``FeatureTable``'s
    ``gather`` contract without holding the split).

    Args:
        local: ``[R, D]`` float rows or ``[R]`` token ids; anything sliceable as ``local[a:b]`` (a zarr array).
        starts, lengths: ``[S]`` int ragged index into ``local`` (small; kept in RAM).
        global_: ``[S, Dg]`` float, sliceable, or None.
        bounds: ``[nb + 1]`` block boundaries (``block_bounds``); the items of one block must be one contiguous row
            range of ``local`` (true inside a store work unit).
        cache_blocks: decoded blocks kept (LRU): the memory bound.
        store_dtype: float batches keep the dtype of ``local`` (float16 in the store) instead of float32; the
            consumer converts them (``setemb.training`` does, exactly), so read-ahead batches take half the memory.

    Attributes:
        blocks_read / rows_read: how much was read from ``local`` so far (every read is one block).
    """

    def __init__(
        self,
        local: Any,
        starts: np.ndarray,
        lengths: np.ndarray,
        global_: Any | None,
        bounds: np.ndarray,
        *,
        cache_blocks: int,
        store_dtype: bool = False,
    ) -> None:
        self.local, self.global_ = local, global_
        self.starts = np.asarray(starts, dtype=np.int64)
        self.lengths = np.asarray(lengths, dtype=np.int64)
        self.bounds = np.asarray(bounds, dtype=np.int64)
        (S,) = self.lengths.shape
        if self.starts.shape != (S,):
            raise ValueError(f"starts must be [{S}] like lengths, got {self.starts.shape}")
        if len(self.bounds) < 1 or self.bounds[0] != 0 or self.bounds[-1] != S or (np.diff(self.bounds) <= 0).any():
            raise ValueError(f"bounds must rise strictly from 0 to {S}, got {self.bounds[:3]}...{self.bounds[-3:]}")
        if cache_blocks < 1:
            raise ValueError(f"cache_blocks must be >= 1, got {cache_blocks}")
        self.cache_blocks, self.store_dtype = cache_blocks, store_dtype
        self._cache: OrderedDict[int, _Block] = OrderedDict()
        self._pending = np.zeros(len(self.bounds) - 1, dtype=np.int64)  # announced gathers still to touch block b
        self._wanted = np.zeros(S, dtype=bool)  # items of the announced gathers
        self._lock = threading.Lock()  # the prefetch thread and validation may gather concurrently
        self.blocks_read = self.rows_read = 0

    @classmethod
    def from_features(
        cls, features: Any, block_items: int, cache_blocks: int, *, store_dtype: bool = False
    ) -> StreamingTable:
        """A streaming view of a store's ``ModalityFeatures`` (``setemb.feature_store``): unit-aligned blocks of
        ``block_items`` items, the arrays read lazily."""
        bounds = block_bounds(len(features), block_items, int(features.attrs.get("unit_size", len(features))))
        return cls(
            features.local_rows,
            features.starts,
            features.lengths,
            features.global_rows,
            bounds,
            cache_blocks=cache_blocks,
            store_dtype=store_dtype,
        )

    def _blocks_of(self, idx: np.ndarray) -> np.ndarray:
        """``[B]`` block of each item index."""
        return np.searchsorted(self.bounds, idx, side="right") - 1

    def expect(self, batches: Iterable[Any]) -> None:
        """Announce the item index arrays the next gathers will ask for (one rank's epoch, in any order).

        Replaces the previous announcement and empties the cache. From then on a block read for an announced
        gather keeps only the rows of announced items (this rank's share of it), and leaves the cache right after
        the last announced gather that touches it (every gather touching a block counts as one of its uses), so
        the cache holds only rows still to be used. The LRU bound ``cache_blocks`` still applies; gathers beyond the
        announcement stay exact and keep whole blocks, as without one (at worst a block is read again).
        """
        pending = np.zeros(len(self.bounds) - 1, dtype=np.int64)
        wanted = np.zeros(len(self), dtype=bool)
        for indices in batches:
            idx = np.asarray(indices, dtype=np.int64)
            np.add.at(pending, np.unique(self._blocks_of(idx)), 1)
            wanted[idx] = True
        with self._lock:
            self._pending, self._wanted = pending, wanted
            self._cache.clear()

    @property
    def cached_bytes(self) -> int:
        """Bytes of the decoded blocks held now (in the store's dtype)."""
        with self._lock:
            blocks = list(self._cache.values())
        return sum(b.local.nbytes + (0 if b.global_ is None else b.global_.nbytes) for b in blocks)

    def _used(self, b: int) -> None:
        """One announced use of block ``b`` is done; the last one drops it from the cache."""
        with self._lock:
            if self._pending[b] > 0:
                self._pending[b] -= 1
                if self._pending[b] == 0:
                    self._cache.pop(b, None)

    def _block(self, b: int, need: np.ndarray) -> tuple[_Block, tuple[np.ndarray, np.ndarray]]:
        """Block ``b`` holding items ``need`` (read unless cached), and where they are in it (``_Block.locate``)."""
        with self._lock:
            block = self._cache.get(b)
            where = None if block is None else block.locate(need, self.starts)
            if where is not None:
                self._cache.move_to_end(b)
                return block, where
            lo, hi = int(self.bounds[b]), int(self.bounds[b + 1])
            ends = self.starts[lo:hi] + self.lengths[lo:hi]
            first, last = int(self.starts[lo:hi].min()), int(ends.max())
            if last - first != int(self.lengths[lo:hi].sum()):
                raise ValueError(f"items {lo}..{hi - 1} are not one contiguous row range; use unit-aligned blocks")
            local = np.asarray(self.local[first:last])
            glob = None if self.global_ is None else np.asarray(self.global_[lo:hi])
            self.blocks_read += 1
            self.rows_read += last - first
            keep = self._wanted[lo:hi].copy()
            keep[need - lo] = True
            if self._pending[b] > 0 and not keep.all():  # announced: keep only this rank's items
                items = lo + np.flatnonzero(keep)
                lens, offsets = self.lengths[items], self.starts[items] - first
                row_of = np.concatenate([[0], np.cumsum(lens)[:-1]]).astype(np.int64)
                rows = np.repeat(offsets - row_of, lens) + np.arange(int(lens.sum()))  # [kept rows]
                block = _Block(lo, first, local[rows], None if glob is None else glob[items - lo], items, row_of)
            else:
                block = _Block(lo, first, local, glob)
            del local, glob
            self._cache[b] = block
            while len(self._cache) > self.cache_blocks:
                self._cache.popitem(last=False)
            return block, block.locate(need, self.starts)

    def gather(self, indices: Any) -> Batch:
        """Padded batch of items, exactly as ``FeatureTable.gather`` returns it (float32 / int64, zeros padded;
        float rows in the store's dtype with ``store_dtype``)."""
        idx = np.asarray(indices, dtype=np.int64)
        if idx.ndim != 1:
            raise ValueError(f"indices must be 1-D, got shape {idx.shape}")
        if len(idx) and (idx.min() < 0 or idx.max() >= len(self)):
            raise ValueError(f"indices must lie in [0, {len(self)}), got range [{idx.min()}, {idx.max()}]")
        lens = self.lengths[idx]  # [B]
        B, N = len(idx), max(1, int(lens.max(initial=0)))
        pos = np.arange(N)
        mask = pos[None, :] < lens[:, None]  # [B, N]
        item_shape = () if self.is_tokens else (self.local_dim,)
        floats = np.dtype(self.local.dtype) if self.store_dtype else np.dtype(np.float32)
        padded = np.zeros((B, N, *item_shape), dtype=np.int64 if self.is_tokens else floats)
        glob = None
        if self.global_ is not None:
            glob = np.zeros((B, self.global_dim), dtype=np.dtype(self.global_.dtype) if self.store_dtype else floats)
        which = self._blocks_of(idx)  # [B] block of each item
        blocks = np.unique(which)
        with self._lock:  # blocks used for the last time first: each is dropped before the next one is read
            blocks = blocks[np.argsort(self._pending[blocks] != 1, kind="stable")]
        for b in blocks:
            sel = np.flatnonzero(which == b)
            block, (first_rows, global_rows) = self._block(int(b), idx[sel])
            m = mask[sel]  # [s, N]
            rows = first_rows[:, None] + pos[None, :]  # [s, N]
            part = padded[sel]
            part[m] = block.local[rows[m]]
            padded[sel] = part
            if glob is not None:
                glob[sel] = block.global_[global_rows]
            del block
            self._used(int(b))
        return {
            "local": torch.from_numpy(padded),
            "global": None if glob is None else torch.from_numpy(glob),
            "mask": torch.from_numpy(mask),
        }


def prefetch(items: Iterable[Any], depth: int) -> Iterator[Any]:
    """Iterate ``items`` in a background thread, ``depth`` ahead (Zarr decoding releases the GIL, so the next
    batches are read while the current one trains). ``depth=0`` iterates in the caller's thread.

    An exception in the producer is raised in the consumer, at the position it happened.
    """
    if depth <= 0:
        yield from items
        return
    done = object()
    q: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def put(entry: tuple[Any, BaseException | None]) -> bool:
        while not stop.is_set():
            try:
                q.put(entry, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def produce() -> None:
        try:
            for item in items:
                if not put((item, None)):
                    return
            put((done, None))
        except BaseException as error:  # noqa: BLE001 - handed to the consumer, which re-raises it
            put((done, error))

    thread = threading.Thread(target=produce, name="setemb-prefetch", daemon=True)
    thread.start()
    try:
        while True:
            item, error = q.get()
            if item is done:
                if error is not None:
                    raise error
                return
            yield item
    finally:
        stop.set()
        thread.join(timeout=5)
